//! The older process's side of a handover (SIGUSR2): connect to the handover socket, make
//! sure a newer process answers there (not this one), then send each client that reaches a
//! point where it may leave, its socket with it, and answer the cancel requests the newer
//! process forwards for clients still here.
//!
//! It must not choose when a client leaves (its session does, between transactions) nor
//! touch the client's bytes.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;

use super::HandoverError;
use super::link::{Incoming, Link};
use super::message::{CarriedClient, Message};
use crate::session::{CancelMap, CancelOutcome};

/// How long the newer process has to answer the greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// The link to the newer process, for clients on their way.
pub struct Departures {
    link: Arc<Link>,
}

/// Connects to the newer process at `path` and greets it. Fails, changing nothing, when no
/// newer process answers (the socket is this process's own, or nobody listens).
pub(super) async fn connect(
    path: &Path,
    instance: u64,
    cancels: CancelMap,
) -> Result<Departures, HandoverError> {
    let stream = tokio::time::timeout(GREETING_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| HandoverError::Timeout)?
        .map_err(HandoverError::Connect)?;
    let link = Arc::new(Link::new(stream).map_err(HandoverError::Connect)?);
    let hello = Message::Hello {
        instance,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    link.send(&hello, None)
        .await
        .map_err(HandoverError::Connect)?;
    let answer = tokio::time::timeout(GREETING_TIMEOUT, link.recv())
        .await
        .map_err(|_| HandoverError::Timeout)?
        .map_err(HandoverError::Connect)?;
    match answer.map(|incoming| incoming.message) {
        Some(Message::Welcome { version, .. }) => {
            tracing::info!(
                newer_version = version,
                "a newer tenantgate takes this process's clients"
            );
        }
        Some(Message::Refused { reason }) => return Err(HandoverError::Refused(reason)),
        other => {
            return Err(HandoverError::Protocol(format!(
                "unexpected answer to the greeting: {other:?}"
            )));
        }
    }
    tokio::spawn(answer_cancels(Arc::clone(&link), cancels));
    Ok(Departures { link })
}

impl Departures {
    /// Sends a client and its socket. On failure the socket comes back, so the client can
    /// be told. Spawned by the caller's caller only if it may be cancelled: the client task
    /// awaits it to its end.
    pub async fn send(
        &self,
        client: CarriedClient,
        socket: OwnedFd,
    ) -> Result<(), (io::Error, OwnedFd)> {
        match self
            .link
            .send(&Message::Client(client), Some(&socket))
            .await
        {
            // Our copy of the descriptor closes here; the newer process holds its own.
            Ok(()) => Ok(()),
            Err(e) => Err((e, socket)),
        }
    }
}

/// Answers the newer process's forwarded cancel requests until the link closes.
async fn answer_cancels(link: Arc<Link>, cancels: CancelMap) {
    loop {
        match link.recv().await {
            Ok(Some(Incoming {
                message: Message::Cancel { id, pid, secret },
                ..
            })) => {
                let link = Arc::clone(&link);
                let cancels = cancels.clone();
                tokio::spawn(async move {
                    let outcome = cancels.cancel(pid, secret, Duration::from_secs(5)).await;
                    let known = outcome != CancelOutcome::UnknownKey;
                    if let Err(e) = link.send(&Message::Cancelled { id, known }, None).await {
                        tracing::debug!(error = %e, "answering a forwarded cancel failed");
                    }
                });
            }
            Ok(Some(other)) => {
                tracing::warn!(message = ?other.message, "unexpected message on the handover link");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "the handover link failed");
                return;
            }
        }
    }
}
