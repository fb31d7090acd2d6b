//! Admin commands on every instance: the commands that act on live state (KILL, the immediate
//! disconnections of `SUSPEND ... FORCE` and `DROP TENANT`, PAUSE, RESUME, RELOAD) run on the
//! instance whose console took them, then go to every other instance as an [`Order`] by NOTIFY
//! on the registry's commands channel; each instance runs an order it hears from another one
//! (once: orders carry an id) and answers on the answers channel, and the issuing console waits
//! a few seconds for the answers of the instances that were live. Registry changes (a tenant's
//! state, plan, overrides) need none of this: their own NOTIFY reaches every instance.
//!
//! An order is authenticated only by where it comes from: whoever can NOTIFY in the registry
//! database can send one, as whoever can write there can suspend any tenant. Orders sent while
//! an instance's listener is disconnected are lost to it (the issuing console says it did not
//! answer). This module must not re-send an order it runs (an order runs locally only), nor run
//! a command's registry part (the issuing instance did that once).

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::AdminContext;
use super::exec::Progress;
use crate::registry::{ANSWERS_CHANNEL, COMMANDS_CHANNEL, PeerMessage, TenantSlug};

/// How long the issuing console waits for the other instances' answers (after its own part).
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// How long an instance running another's PAUSE waits for its clients to give their backends
/// back before it answers that it is still draining (the gate stays closed either way).
const REMOTE_DRAIN_WAIT: Duration = Duration::from_secs(60);

/// How many order ids an instance remembers, to run each once.
const REMEMBERED: usize = 256;

/// What another instance is asked to do on its own live state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(super) enum Order {
    /// KILL, SUSPEND ... FORCE, DROP TENANT: re-read the tenant and disconnect its clients.
    Disconnect { tenant: String },
    /// PAUSE [slug].
    Pause { tenant: Option<String> },
    /// RESUME [slug] (after PAUSE).
    Resume { tenant: Option<String> },
    /// RELOAD: the instance re-reads its own config file.
    Reload,
}

/// An order as it travels on the commands channel.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    id: String,
    from_instance: String,
    actor: String,
    #[serde(flatten)]
    order: Order,
}

/// An instance's answer to an order.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    id: String,
    instance: String,
    ok: bool,
    detail: String,
}

/// An order sent, whose answers can be collected.
pub(super) struct Sent {
    id: String,
    /// The other instances that were live when it was sent.
    expected: Vec<String>,
    answers: Receiver<PeerMessage>,
}

/// Sends `order` to every other instance. A registry that cannot be reached is said as a
/// NOTICE (this instance's part is done already) and gives `None`.
pub(super) async fn send(
    ctx: &AdminContext,
    actor: &str,
    order: Order,
    progress: &Progress,
) -> Option<Sent> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Subscribed before sending, so no answer can come first.
    let answers = ctx.directory.subscribe_peers();
    let ttl = ctx.config.get().instance.ttl();
    let expected = match ctx.registry.live_instances(ttl).await {
        Ok(live) => live
            .into_iter()
            .map(|i| i.id)
            .filter(|id| *id != ctx.instance_id)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing the instances for an admin command failed");
            Vec::new()
        }
    };
    let envelope = Envelope {
        id: format!(
            "{}-{}-{}",
            ctx.instance_id,
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ),
        from_instance: ctx.instance_id.clone(),
        actor: actor.to_owned(),
        order,
    };
    let sent = match serde_json::to_string(&envelope) {
        Ok(payload) => ctx.registry.notify(COMMANDS_CHANNEL, &payload).await,
        Err(e) => {
            tracing::error!(error = %e, "encoding an admin order failed");
            return None;
        }
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sending an admin command to the other instances failed");
        progress.say(format!(
            "done on this instance only: the registry did not take the command for the {} other \
             instance(s)",
            expected.len()
        ));
        return None;
    }
    Some(Sent {
        id: envelope.id,
        expected,
        answers,
    })
}

impl Sent {
    /// Waits up to a few seconds for the answers of the instances that were live, and says
    /// what they did. Returns how many did it.
    pub(super) async fn collect(mut self, progress: &Progress) -> usize {
        if self.expected.is_empty() {
            return 0;
        }
        let mut pending: HashSet<String> = self.expected.iter().cloned().collect();
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        while !pending.is_empty() {
            let message = match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Err(_) | Ok(Err(RecvError::Closed)) => break,
                Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Ok(message)) => message,
            };
            let PeerMessage::Answer(payload) = message else {
                continue;
            };
            let Ok(answer) = serde_json::from_str::<Answer>(&payload) else {
                continue;
            };
            if answer.id != self.id || !pending.remove(&answer.instance) {
                continue;
            }
            if answer.ok {
                done.push(format!("{} ({})", answer.instance, answer.detail));
            } else {
                failed.push(format!("{}: {}", answer.instance, answer.detail));
            }
        }
        let mut text = format!(
            "sent to {} other instance(s); done on {}",
            self.expected.len(),
            done.len()
        );
        if !done.is_empty() {
            let _ = write!(text, ": {}", done.join(", "));
        }
        if !failed.is_empty() {
            let _ = write!(text, "; failed on {}", failed.join(", "));
        }
        if !pending.is_empty() {
            let mut silent: Vec<String> = pending.into_iter().collect();
            silent.sort();
            let _ = write!(
                text,
                "; no answer within {} s from {}",
                ANSWER_WAIT.as_secs(),
                silent.join(", ")
            );
        }
        progress.say(text);
        done.len()
    }
}

/// Sends `order` to every other instance and collects their answers.
pub(super) async fn everywhere(
    ctx: &AdminContext,
    actor: &str,
    order: Order,
    progress: &Progress,
) -> usize {
    match send(ctx, actor, order, progress).await {
        Some(sent) => sent.collect(progress).await,
        None => 0,
    }
}

/// Starts the task that runs the orders other instances send, until `shutdown`.
pub fn spawn_runner(
    ctx: Arc<AdminContext>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut orders = ctx.directory.subscribe_peers();
    tokio::spawn(async move {
        let mut seen = VecDeque::with_capacity(REMEMBERED);
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = orders.recv() => message,
            };
            let payload = match message {
                Ok(PeerMessage::Command(payload)) => payload,
                Ok(PeerMessage::Answer(_) | PeerMessage::Budget(_)) => continue,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "admin orders from other instances were missed");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let envelope = match serde_json::from_str::<Envelope>(&payload) {
                Ok(envelope) => envelope,
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable admin order on the registry's commands channel");
                    continue;
                }
            };
            if envelope.from_instance == ctx.instance_id || seen.contains(&envelope.id) {
                continue;
            }
            if seen.len() == REMEMBERED {
                seen.pop_front();
            }
            seen.push_back(envelope.id.clone());
            // Each order in its own task: a PAUSE that waits must not hold a RESUME back.
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move { run(&ctx, envelope).await });
        }
    })
}

/// Runs one order on this instance and answers it.
async fn run(ctx: &AdminContext, envelope: Envelope) {
    tracing::info!(order = ?envelope.order, from = %envelope.from_instance, actor = %envelope.actor, "running an admin command from another instance");
    let result = match &envelope.order {
        Order::Disconnect { tenant } => match TenantSlug::parse(tenant) {
            Some(slug) => {
                // The registry change's own NOTIFY does this too; new logins must see it now.
                ctx.directory.invalidate(&slug).await;
                let n = ctx.clients.kill_tenant(&slug);
                Ok(format!("{n} client(s) disconnected"))
            }
            None => Err(format!("\"{tenant}\" is not a tenant slug")),
        },
        Order::Pause { tenant } => match parse_opt(tenant.as_deref()) {
            Ok(slug) => {
                ctx.pools.pause_gate().pause(slug.as_ref());
                drain(ctx, slug.as_ref()).await
            }
            Err(e) => Err(e),
        },
        Order::Resume { tenant } => match parse_opt(tenant.as_deref()) {
            Ok(slug) => ctx
                .pools
                .pause_gate()
                .resume(slug.as_ref())
                .map(|()| "resumed".to_owned())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        },
        Order::Reload => {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            drop(receiver);
            let actor = format!("{} (from {})", envelope.actor, envelope.from_instance);
            super::reload::reload_config(ctx, &actor, &Progress::new(sender))
                .await
                .map(|table| format!("{} change(s)", table.rows.len()))
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = &result {
        tracing::warn!(order = ?envelope.order, error = %e, "an admin command from another instance failed here");
    }
    let (ok, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    let answer = Answer {
        id: envelope.id,
        instance: ctx.instance_id.clone(),
        ok,
        detail,
    };
    match serde_json::to_string(&answer) {
        Ok(payload) => {
            if let Err(e) = ctx.registry.notify(ANSWERS_CHANNEL, &payload).await {
                tracing::warn!(error = %e, "answering an admin command failed");
            }
        }
        Err(e) => tracing::error!(error = %e, "encoding an admin answer failed"),
    }
}

fn parse_opt(tenant: Option<&str>) -> Result<Option<TenantSlug>, String> {
    tenant
        .map(|t| TenantSlug::parse(t).ok_or_else(|| format!("\"{t}\" is not a tenant slug")))
        .transpose()
}

/// Waits (bounded) until the paused tenants' clients gave their backends back.
async fn drain(ctx: &AdminContext, slug: Option<&TenantSlug>) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + REMOTE_DRAIN_WAIT;
    loop {
        let active = super::pause::active(ctx, slug).await;
        if active == 0 {
            return Ok("paused".to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "paused, but {active} client(s) still hold a backend after {} s",
                REMOTE_DRAIN_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_travel_as_json_with_their_command_named() {
        let envelope = Envelope {
            id: "a-1".to_owned(),
            from_instance: "a".to_owned(),
            actor: "root".to_owned(),
            order: Order::Pause {
                tenant: Some("acme".to_owned()),
            },
        };
        let text = serde_json::to_string(&envelope).unwrap();
        assert!(text.contains("\"command\":\"pause\""), "{text}");
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.order, envelope.order);
        let reload: Envelope = serde_json::from_str(
            r#"{"id":"x","from_instance":"b","actor":"r","command":"reload"}"#,
        )
        .unwrap();
        assert_eq!(reload.order, Order::Reload);
        assert!(serde_json::from_str::<Envelope>(r#"{"id":"x","command":"drop_all"}"#).is_err());
    }
}
