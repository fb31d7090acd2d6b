//! A client's session on one backend: apply its settings, greet it, relay, then release the
//! backend clean or not at all.
//!
//! Moving parts: `settings` (startup parameters → backend settings), `relay` (the byte pump),
//! `cancel` (the cancel map). In session mode a backend goes back to its pool only when the last
//! ReadyForQuery said idle, nothing is owed and the reset (advisory unlock, DISCARD ALL)
//! succeeded; anything else closes it. This module must not decode row data.

pub mod cancel;
pub mod relay;
pub mod settings;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::{ClientFacing, ErrorKind};
use crate::pool::{BackendError, Lease, ServerError, SetupOutcome};
use crate::protocol::{SqlState, messages};

pub use cancel::{CancelMap, CancelTarget};
pub use relay::{RelayBuffers, RelayEnd, RelayError, TxTracker};

/// What a session needs besides its sockets.
pub struct SessionContext<'a> {
    pub cancels: &'a CancelMap,
    pub reset_timeout: Duration,
    pub max_client_message_bytes: usize,
    pub shutdown: &'a CancellationToken,
}

/// How a session ended, when it ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Relay(RelayEnd),
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("backend rejected the client's startup settings: {} {}", .0.code, .0.message)]
    SettingRejected(ServerError),
    #[error("preparing the backend failed")]
    Backend(#[from] BackendError),
    #[error("relay failed")]
    Relay(#[from] RelayError),
    #[error("writing to the client failed")]
    ClientIo(#[source] std::io::Error),
}

impl ClientFacing for SessionError {
    fn sqlstate(&self) -> SqlState {
        match self {
            SessionError::SettingRejected(_) => SqlState::INVALID_PARAMETER_VALUE,
            SessionError::Backend(e) => e.sqlstate(),
            SessionError::Relay(RelayError::ClientProtocol(_)) => SqlState::PROTOCOL_VIOLATION,
            SessionError::Relay(
                RelayError::Backend(_) | RelayError::BackendProtocol(_) | RelayError::Client(_),
            )
            | SessionError::ClientIo(_) => SqlState::CONNECTION_FAILURE,
        }
    }

    fn client_message(&self) -> String {
        match self {
            SessionError::SettingRejected(e) => e.message.clone(),
            SessionError::Backend(e) => e.client_message(),
            SessionError::Relay(RelayError::ClientProtocol(e)) => {
                format!("invalid message from the client: {e}")
            }
            SessionError::Relay(
                RelayError::Backend(_) | RelayError::BackendProtocol(_) | RelayError::Client(_),
            )
            | SessionError::ClientIo(_) => {
                "the connection to the tenant's database server was lost".to_owned()
            }
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::SettingRejected(_)
            | SessionError::ClientIo(_)
            | SessionError::Relay(RelayError::Client(_) | RelayError::ClientProtocol(_)) => {
                ErrorKind::Client
            }
            SessionError::Backend(_)
            | SessionError::Relay(RelayError::Backend(_) | RelayError::BackendProtocol(_)) => {
                ErrorKind::Backend
            }
        }
    }
}

/// Runs a whole session-mode session on `lease` and releases the backend.
pub async fn run<C>(
    client: &mut C,
    mut lease: Lease,
    settings: &[(String, String)],
    ctx: &SessionContext<'_>,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let cancel_guard = greet(client, &mut lease, settings, ctx).await?;
    let mut buffers = RelayBuffers::new(ctx.max_client_message_bytes);
    let mut tracker = TxTracker::default();
    let backend = lease.conn();
    let outcome = tokio::select! {
        end = relay::relay(client, &mut backend.stream, &mut buffers, &mut tracker) => end.map(SessionEnd::Relay),
        () = ctx.shutdown.cancelled() => Ok(SessionEnd::Shutdown),
    };
    drop(cancel_guard);
    let client_left_cleanly = matches!(
        outcome,
        Ok(SessionEnd::Relay(
            RelayEnd::ClientTerminated | RelayEnd::ClientClosed
        ))
    );
    if client_left_cleanly && tracker.is_clean() {
        release_clean(&mut lease, ctx.reset_timeout).await;
    } else {
        lease.conn().broken = true;
    }
    if outcome
        .as_ref()
        .is_ok_and(|end| *end == SessionEnd::Shutdown)
    {
        let mut out = BytesMut::new();
        messages::error_response(
            &mut out,
            messages::Severity::Fatal,
            SqlState::ADMIN_SHUTDOWN,
            "terminating connection because tenantgate is shutting down",
            None,
        );
        drop(client.write_all(&out).await);
    }
    Ok(outcome?)
}

/// Applies the client's settings to the backend and sends the client what PostgreSQL sends
/// after AuthenticationOk: every ParameterStatus, BackendKeyData and ReadyForQuery.
async fn greet<C>(
    client: &mut C,
    lease: &mut Lease,
    settings: &[(String, String)],
    ctx: &SessionContext<'_>,
) -> Result<cancel::CancelGuard, SessionError>
where
    C: AsyncWrite + Unpin,
{
    let backend = lease.conn();
    if let Some(sql) = settings::settings_query(settings) {
        if let SetupOutcome::Failed(err) = backend.run_setup_query(&sql, ctx.reset_timeout).await? {
            // The backend may now carry part of the settings: never reuse it.
            backend.broken = true;
            return Err(SessionError::SettingRejected(err));
        }
    }
    let guard = ctx.cancels.register(CancelTarget {
        addr: backend.addr,
        backend_pid: backend.pid,
        backend_secret: backend.secret,
    });
    let (pid, secret) = guard.key();
    let mut out = BytesMut::with_capacity(512);
    for (name, value) in &backend.params {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, pid, secret);
    messages::ready_for_query(&mut out, b'I');
    client
        .write_all(&out)
        .await
        .map_err(SessionError::ClientIo)?;
    client.flush().await.map_err(SessionError::ClientIo)?;
    Ok(guard)
}

/// Resets a backend the client left idle; on any failure it is closed instead.
async fn release_clean(lease: &mut Lease, timeout: Duration) {
    let backend = lease.conn();
    for sql in ["SELECT pg_catalog.pg_advisory_unlock_all()", "DISCARD ALL"] {
        match backend.run_setup_query(sql, timeout).await {
            Ok(SetupOutcome::Done) => {}
            Ok(SetupOutcome::Failed(e)) => {
                tracing::warn!(code = %e.code, message = %e.message, "backend reset failed; closing it");
                backend.broken = true;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend reset failed; closing it");
                backend.broken = true;
                return;
            }
        }
    }
}
