//! The server's side of an upgrade's handover: a client whose session ended `HandedOver`
//! leaves (its socket and state go over the link to the newer process), and a client an
//! older process sent is resumed here: its tenant checked as a login would, its session set
//! up without a greeting, served like any other.
//!
//! The link itself is `crate::handover`'s; sessions decide when a client may leave. This file
//! must not authenticate (the client did, at the older process) nor relay.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::State;
use super::client::{CloseReason, Ready, Who, fail, fail_setup, serve_session, services};
use super::login::LoginError;
use crate::handover::{Arrival, CarriedClient, CarriedStatement};
use crate::protocol::{SqlState, messages};
use crate::registry::{TenantSlug, TenantState};
use crate::session::{self, Admission, Carried};

/// Sends a client that left its session to the newer process. If the link fails, the client
/// is told why (57P01) rather than dropped silently.
pub(super) async fn depart(
    state: &State,
    socket: TcpStream,
    who: Who,
    carried: Carried,
) -> CloseReason {
    let Some(departures) = state.handover.departures() else {
        return CloseReason::Shutdown;
    };
    let socket = match socket.into_std() {
        Ok(socket) => OwnedFd::from(socket),
        Err(e) => {
            tracing::warn!(error = %e, "a client's socket could not be taken for the handover");
            return CloseReason::Shutdown;
        }
    };
    let client = CarriedClient {
        tenant: who.tenant,
        user: who.user,
        settings: who.settings,
        peer: who.peer,
        cancel_key: carried.cancel_key,
        statements: carried
            .statements
            .into_iter()
            .map(|(name, parse)| CarriedStatement::new(name, &parse))
            .collect(),
    };
    match departures.send(client, socket).await {
        Ok(()) => {
            state.stats.process().handed_over(true);
            CloseReason::HandedOver
        }
        Err((e, socket)) => {
            state.stats.process().handed_over(false);
            tracing::warn!(error = %e, "handing a client over failed; closing it");
            tell_restarting(socket).await;
            CloseReason::Error(SqlState::ADMIN_SHUTDOWN)
        }
    }
}

/// The client of a failed handover gets what a restart without handover would give it.
async fn tell_restarting(socket: OwnedFd) {
    let Ok(mut stream) = TcpStream::from_std(std::net::TcpStream::from(socket)) else {
        return;
    };
    let mut out = BytesMut::new();
    messages::error_response(
        &mut out,
        messages::Severity::Fatal,
        SqlState::ADMIN_SHUTDOWN,
        "terminating connection: tenantgate is restarting and could not hand this connection to its new process; reconnect",
        None,
    );
    drop(tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(&out)).await);
}

/// Takes the clients older processes hand over, a task each, until the intake closes.
pub(super) async fn resume_arrivals(
    mut arrivals: mpsc::UnboundedReceiver<Arrival>,
    state: Arc<State>,
    stop_sessions: CancellationToken,
    tasks: TaskTracker,
) {
    while let Some(arrival) = arrivals.recv().await {
        let id = state.next_client_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "client",
            id,
            peer = tracing::field::Empty,
            tenant = arrival.client.tenant.as_str(),
            user = arrival.client.user.as_str(),
            resumed = true,
        );
        if let Some(peer) = arrival.client.peer {
            span.record("peer", tracing::field::display(peer));
        }
        let state = Arc::clone(&state);
        let stop = stop_sessions.clone();
        tasks.spawn(
            async move {
                let reason = resume(&state, id, arrival, &stop).await;
                reason.log();
            }
            .instrument(span),
        );
    }
}

/// One handed-over client, from its socket to the end of its session here.
async fn resume(
    state: &State,
    client_id: u64,
    Arrival { client, socket }: Arrival,
    shutdown: &CancellationToken,
) -> CloseReason {
    let Ok(mut stream) = TcpStream::from_std(std::net::TcpStream::from(socket)) else {
        tracing::warn!("a handed-over socket could not be registered; closed");
        return CloseReason::Error(SqlState::CONNECTION_FAILURE);
    };
    // Counted among the connected clients like any other, past the limit too: turning it
    // away would disconnect a client that never asked to leave.
    let permit = Arc::clone(&state.client_slots).try_acquire_owned().ok();
    let Some(slug) = TenantSlug::parse(&client.tenant) else {
        tracing::warn!("a handed-over client names no valid tenant; closed");
        return CloseReason::Error(SqlState::PROTOCOL_VIOLATION);
    };
    let tenant = match tenant_of(state, slug).await {
        Ok(tenant) => tenant,
        Err(e) => return fail(&mut stream, &e).await,
    };
    tracing::debug!("resuming a client handed over by an older process");
    state.stats.process().taken_over();
    let statements = client
        .statements
        .into_iter()
        .filter_map(CarriedStatement::decode)
        .collect();
    let admission = Admission {
        client_id,
        tenant,
        user: client.user.clone(),
        settings: client.settings.clone(),
        peer: client.peer,
        tls: String::new(),
    };
    let who = Who {
        tenant: client.tenant,
        user: client.user,
        settings: client.settings,
        peer: client.peer,
    };
    let carried = Carried {
        cancel_key: client.cancel_key,
        statements,
    };
    let services = services(state, shutdown, true);
    let session = match Box::pin(session::resume(services, admission, carried)).await {
        Ok(session) => session,
        Err(e) => return fail_setup(&mut stream, &e).await,
    };
    let who = state.handover.is_configured().then_some(who);
    let reason = serve_session(
        state,
        Ready {
            stream,
            session,
            who,
        },
    )
    .await;
    drop(permit);
    reason
}

/// The handed-over client's tenant, as a login would find it: it must still be active.
async fn tenant_of(
    state: &State,
    slug: TenantSlug,
) -> Result<Arc<crate::registry::TenantRecord>, LoginError> {
    let not_active = |slug: TenantSlug, state| LoginError::TenantNotActive { slug, state };
    match state.directory.tenant(&slug).await? {
        Some(record) if record.state == TenantState::Active => Ok(record),
        Some(record) => Err(not_active(slug, record.state)),
        None => Err(not_active(slug, TenantState::Deleted)),
    }
}
