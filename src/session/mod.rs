//! A client's life after login: take backends from its tenant's pool, apply its settings,
//! greet it, relay, and give backends back clean or not at all.
//!
//! Moving parts: `start` (from a logged-in client to a ready [`Session`]), `settings` (startup
//! parameters → backend settings), `relay` (the byte pump), `cancel` (the cancel map). Setup
//! fails with a [`SetupError`]; a running session with a [`SessionError`]. Two pooling modes:
//! - session: the client keeps one backend until it leaves; the backend goes back only when the
//!   last ReadyForQuery said idle, nothing is owed in either direction and the reset (DISCARD
//!   ALL) succeeded; anything else closes it.
//! - transaction: the client holds a backend from its first message of a transaction to the
//!   ReadyForQuery that leaves it idle with nothing owed and both directions between
//!   messages. A backend is reset (DISCARD ALL) before any of the next client's messages can
//!   run, in the same write as them (`prepare_ahead`); one nobody takes is reset by its pool's
//!   sweeper within about 100 ms (`release`). So no client sees another's state, by any path. Named prepared statements follow the
//!   client from backend to backend (`statements`). A client that LISTENs is pinned to its
//!   backend until it leaves.
//!
//! This module must not decode row data.

pub mod cancel;
pub mod ceilings;
mod quiet;
pub mod relay;
mod relay_buffer;
pub mod settings;
mod start;
pub mod statements;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::{ClientFacing, ErrorKind};
use crate::pool::{
    BackendConn, BackendError, Lease, PoolError, PoolMap, PoolMode, ServerError, SetupOutcome,
    TenantPool,
};
use crate::protocol::{SqlState, messages};
use crate::registry::{TenantDirectory, TenantRecord, TenantSlug, TenantState};
use crate::stats::TenantStats;

pub use cancel::{CancelGuard, CancelMap, CancelOutcome, CancelTarget};
pub use ceilings::Ceilings;
use ceilings::{PhaseClock, Reached, Watchdog};
use quiet::Quiet;
pub use relay::{RelayBuffers, RelayEnd, RelayError, TxTracker};
pub use start::{Admission, Carried, Services, Session, resume, start};
pub use statements::StatementLimits;
use statements::{ClientStatements, Responses, StatementContext};

/// Watches the registry for this client's tenant leaving `active`. Its `must_go` future is
/// made once per session and polled by every `select!` of it, so a transaction registers no
/// waiter on the registry's change channel (shared by every client): the state it learns is
/// kept here, read between transactions without a borrow of that future.
struct Watch<'a> {
    /// Subscribed when the session starts; taken by the first `must_go`.
    changes: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<TenantSlug>>>,
    ctx: &'a SessionContext<'a>,
    /// The state the tenant left `active` for, and when the client must be gone (set once).
    leaving: std::sync::OnceLock<(TenantState, tokio::time::Instant)>,
    /// The tenant's record as last read after a change (None: the login's is current). The
    /// session's own lock: nobody else takes it.
    latest: std::sync::Mutex<Option<Arc<TenantRecord>>>,
}

impl<'a> Watch<'a> {
    fn new(ctx: &'a SessionContext<'a>) -> Watch<'a> {
        Watch {
            changes: std::sync::Mutex::new(Some(ctx.directory.subscribe())),
            ctx,
            leaving: std::sync::OnceLock::new(),
            latest: std::sync::Mutex::new(None),
        }
    }

    /// The tenant's record as the registry says now, as far as its changes were seen.
    fn tenant(&self) -> Arc<TenantRecord> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| Arc::clone(&self.ctx.tenant))
    }

    /// Known to have left `active`.
    fn left_active(&self) -> Option<TenantState> {
        self.leaving.get().map(|(state, _)| *state)
    }

    /// Resolves when the client must go: the tenant left `active` and the grace period
    /// passed. Make it once per session and poll it from every `select!` (it is not
    /// cancel-safe: a change being checked when it is dropped is checked again only by a
    /// later one).
    async fn must_go(&self) -> TenantState {
        let taken = self
            .changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut changes = taken.unwrap_or_else(|| self.ctx.directory.subscribe());
        loop {
            if let Some(&(state, deadline)) = self.leaving.get() {
                // Boxed: rare, and this future is part of every idle client's state.
                Box::pin(tokio::time::sleep_until(deadline)).await;
                return state;
            }
            match changes.recv().await {
                Ok(slug) if slug == self.ctx.tenant.slug => {}
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
            let state = match Box::pin(self.ctx.directory.tenant(&self.ctx.tenant.slug)).await {
                Ok(Some(record)) => {
                    // Reads can cross: an older row than the one held changes nothing.
                    if record.revision >= self.tenant().revision {
                        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(record);
                    }
                    self.tenant().state
                }
                Ok(None) => TenantState::Deleted,
                // The registry is away: keep serving; the next change checks again.
                Err(_) => TenantState::Active,
            };
            if state != TenantState::Active {
                tracing::info!(tenant = %self.ctx.tenant.slug, %state, "tenant left active; closing its clients after the grace period");
                // Set once: after this the loop only waits out the grace period.
                let _ = self
                    .leaving
                    .set((state, tokio::time::Instant::now() + self.ctx.suspend_grace));
            }
        }
    }
}

/// What a session needs besides its socket.
pub struct SessionContext<'a> {
    /// The tenant as it was at login (a session follows changes through its `Watch`).
    pub tenant: Arc<TenantRecord>,
    /// To learn when the tenant leaves `active`.
    pub directory: &'a TenantDirectory,
    /// How long a client of a suspended tenant may go on before it is disconnected.
    pub suspend_grace: Duration,
    pub pools: &'a PoolMap,
    pub mode: PoolMode,
    /// Unique per client connection; marks which client a backend last served.
    pub client_id: u64,
    pub cancels: &'a CancelMap,
    pub reset_timeout: Duration,
    pub max_client_message_bytes: usize,
    /// Transaction pooling: named statements a backend keeps before closing the least
    /// recently used (`pool.prepared_statement_cache_size`).
    pub statement_cache_size: usize,
    /// What one client may keep prepared (transaction pooling).
    pub statement_limits: StatementLimits,
    /// The plan's ceilings the client cannot raise.
    pub ceilings: Ceilings,
    /// Cancelled to end this session (KILL, shutdown).
    pub shutdown: CancellationToken,
    /// Cancelled when the process hands its clients to a newer one; None for a client whose
    /// socket cannot change hands (TLS).
    pub handover: Option<&'a CancellationToken>,
    /// The tenant's usage counters; the relay counts into them.
    pub stats: Arc<TenantStats>,
}

/// How a session ended, when it ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Relay(RelayEnd),
    Shutdown,
    /// The tenant left `active` in the registry and the grace period passed.
    TenantNotActive(TenantState),
    /// The backend closed the connection without a last ErrorResponse of its own (killed,
    /// an immediate shutdown, the network): the client is told, as libpq would tell it.
    BackendLost,
    /// Transaction pooling, during a handover: the client is between transactions with
    /// nothing of its held here, and its socket may go to the newer process.
    HandedOver,
}

/// Why a client's session could not be set up, or a backend not made ready for one of its
/// transactions: nothing of the client's ran.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("backend rejected the client's startup settings: {} {}", .0.code, .0.message)]
    SettingRejected(ServerError),
    #[error("preparing the backend failed")]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("writing to the client failed")]
    ClientIo(#[source] std::io::Error),
    /// A handed-over client's prepared statements break this process's limits.
    #[error(transparent)]
    CarriedStatements(statements::LimitExceeded),
}

impl ClientFacing for SetupError {
    fn sqlstate(&self) -> SqlState {
        match self {
            SetupError::SettingRejected(_) => SqlState::INVALID_PARAMETER_VALUE,
            SetupError::Backend(e) => e.sqlstate(),
            SetupError::Pool(e) => e.sqlstate(),
            SetupError::ClientIo(_) => SqlState::CONNECTION_FAILURE,
            SetupError::CarriedStatements(_) => SqlState::PROGRAM_LIMIT_EXCEEDED,
        }
    }

    fn client_message(&self) -> String {
        match self {
            SetupError::SettingRejected(e) => e.message.clone(),
            SetupError::Backend(e) => e.client_message(),
            SetupError::Pool(e) => e.client_message(),
            SetupError::ClientIo(_) => {
                "the connection to the tenant's database server was lost".to_owned()
            }
            SetupError::CarriedStatements(e) => e.to_string(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            SetupError::SettingRejected(_)
            | SetupError::ClientIo(_)
            | SetupError::CarriedStatements(_) => ErrorKind::Client,
            SetupError::Backend(_) => ErrorKind::Backend,
            SetupError::Pool(e) => e.kind(),
        }
    }
}

/// Why a running session ended in error.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A transaction's backend could not be made ready (transaction pooling).
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("relay failed")]
    Relay(#[from] RelayError),
    /// The reset sent ahead of the client's first messages failed (SQLSTATE and message);
    /// the server skipped them.
    #[error("the backend's reset before the client's transaction failed: {0}")]
    ResetFailed(String),
    /// The client sat idle inside a transaction past its plan's ceiling.
    #[error("idle in a transaction for longer than {0:?}")]
    IdleInTransactionTimeout(Duration),
    /// The client sat idle past its plan's ceiling.
    #[error("idle for longer than {0:?}")]
    ClientIdleTimeout(Duration),
}

impl ClientFacing for SessionError {
    fn sqlstate(&self) -> SqlState {
        match self {
            SessionError::Setup(e) => e.sqlstate(),
            SessionError::Relay(RelayError::ClientProtocol(_)) => SqlState::PROTOCOL_VIOLATION,
            SessionError::Relay(RelayError::Limit(_)) => SqlState::PROGRAM_LIMIT_EXCEEDED,
            SessionError::Relay(
                RelayError::Backend(_) | RelayError::BackendProtocol(_) | RelayError::Client(_),
            )
            | SessionError::ResetFailed(_) => SqlState::CONNECTION_FAILURE,
            SessionError::IdleInTransactionTimeout(_) => {
                SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            }
            SessionError::ClientIdleTimeout(_) => SqlState::IDLE_SESSION_TIMEOUT,
        }
    }

    fn client_message(&self) -> String {
        match self {
            SessionError::Setup(e) => e.client_message(),
            SessionError::ResetFailed(_) => "the pooled server connection could not be reset for this transaction, which did not run; reconnect and retry".to_owned(),
            SessionError::Relay(RelayError::ClientProtocol(e)) => {
                format!("invalid message from the client: {e}")
            }
            SessionError::Relay(RelayError::Limit(e)) => e.to_string(),
            SessionError::Relay(
                RelayError::Backend(_) | RelayError::BackendProtocol(_) | RelayError::Client(_),
            ) => {
                "the connection to the tenant's database server was lost".to_owned()
            }
            SessionError::IdleInTransactionTimeout(limit) => format!(
                "terminating connection due to idle-in-transaction timeout (the plan's \
                 max_idle_in_transaction_ms: {} ms)",
                limit.as_millis()
            ),
            SessionError::ClientIdleTimeout(limit) => format!(
                "terminating connection due to idle-session timeout (the plan's \
                 max_client_idle_ms: {} ms)",
                limit.as_millis()
            ),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::IdleInTransactionTimeout(_)
            | SessionError::ClientIdleTimeout(_)
            | SessionError::Relay(
                RelayError::Client(_) | RelayError::ClientProtocol(_) | RelayError::Limit(_),
            ) => ErrorKind::Client,
            SessionError::ResetFailed(_)
            | SessionError::Relay(RelayError::Backend(_) | RelayError::BackendProtocol(_)) => {
                ErrorKind::Backend
            }
            SessionError::Setup(e) => e.kind(),
        }
    }
}

impl Session<'_> {
    /// What a newer process needs to go on with this client after a handover: its cancel
    /// key and its named prepared statements.
    pub fn carried(&self) -> Carried {
        Carried {
            cancel_key: self.cancel.key(),
            statements: self.statements.export(),
        }
    }

    /// Relays for a client that [`start`] made ready, until it leaves. Ends with a FATAL
    /// to the client when the proxy ends the session (shutdown, the tenant no longer
    /// active, its backend lost).
    ///
    /// Takes `&mut self`, not `self`: the session's state is stored once, in the caller,
    /// and this future holds a reference (an idle client's task stays small, issue 12).
    pub async fn run<C>(&mut self, client: &mut C) -> Result<SessionEnd, SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = &self.ctx;
        let outcome = match self.backend.take() {
            // Boxed: a session-pooling client's relay state is larger than a transaction
            // client's idle state, which would otherwise be sized for it (issue 12).
            Some(lease) => {
                Box::pin(session_mode(
                    client,
                    *lease,
                    &mut self.buffers,
                    &self.cancel,
                    ctx,
                ))
                .await
            }
            None => {
                transaction_mode(
                    client,
                    &self.settings,
                    &mut self.buffers,
                    (&self.cancel, &mut self.statements),
                    ctx,
                    self.attached.pool(),
                )
                .await
            }
        };
        let farewell = match &outcome {
            Ok(SessionEnd::Shutdown) => Some((
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command".to_owned(),
            )),
            Ok(SessionEnd::TenantNotActive(state)) => Some((
                SqlState::CANNOT_CONNECT_NOW,
                format!(
                    "terminating connection: tenant \"{}\" is {state}",
                    ctx.tenant.slug
                ),
            )),
            Ok(SessionEnd::BackendLost) => Some((
                SqlState::CONNECTION_FAILURE,
                "the connection to the tenant's database server was lost".to_owned(),
            )),
            _ => None,
        };
        if let Some((code, text)) = farewell {
            let mut out = BytesMut::new();
            messages::error_response(&mut out, messages::Severity::Fatal, code, &text, None);
            drop(client.write_all(&out).await);
        }
        outcome
    }
}

/// A backend of the tenant's pool made ready for this client (reset, its settings).
async fn ready_backend(
    ctx: &SessionContext<'_>,
    settings: &[(String, String)],
) -> Result<Lease, SetupError> {
    let mut lease = checkout(ctx, &ctx.tenant, settings, None).await?;
    prepare(lease.conn(), ctx.client_id, settings, ctx.reset_timeout).await?;
    accepted(&lease, settings);
    Ok(lease)
}

/// Transaction pooling: the parameters to greet the client with, without holding a backend
/// when the pool already knows what a backend reports (a client must be able to log in while
/// every backend is busy: pgbench connects its clients from the thread that drives the
/// others' transactions). Otherwise from a backend made ready for it, given back at once.
async fn greeting_params(
    ctx: &SessionContext<'_>,
    settings: &[(String, String)],
) -> Result<Vec<(String, String)>, SetupError> {
    let known = match ctx.pools.get(&ctx.tenant.slug).await {
        Some(pool) => pool.base_params(settings),
        None => None,
    };
    if let Some(base) = known {
        return Ok(with_settings(&base, settings));
    }
    let mut lease = ready_backend(ctx, settings).await?;
    let params = lease.conn().params.clone();
    // Only setup queries ran, each answered through ReadyForQuery `I`.
    lease.reusable();
    Ok(params)
}

/// Session pooling: one backend for the client's whole life.
async fn session_mode<C>(
    client: &mut C,
    mut lease: Lease,
    buffers: &mut RelayBuffers,
    cancel: &CancelGuard,
    ctx: &SessionContext<'_>,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut tracker = TxTracker::default();
    let backend = lease.conn();
    let watch = Watch::new(ctx);
    let ends = session_ends(&watch, &ctx.shutdown);
    tokio::pin!(ends);
    let mut ends = Quiet::new(ends);
    let clock = PhaseClock::watching(!ctx.ceilings.is_empty());
    let watchdog = Watchdog::new(ctx.ceilings, &clock);
    let outcome = loop {
        break tokio::select! {
            end = relay::relay(client, &mut backend.stream, buffers, &mut tracker, None, &ctx.stats, &clock) => end.map(SessionEnd::Relay).map_err(SessionError::from),
            end = &mut ends => Ok(end),
            reached = watchdog.next() => match Box::pin(ceiling_reached(reached, cancel, ctx)).await {
                Some(err) => Err(err),
                None => continue,
            },
        };
    };
    cancel.detach().await;
    let outcome = outcome.map(|end| lost_or(end, &tracker));
    let client_left_cleanly = matches!(
        outcome,
        Ok(SessionEnd::Relay(
            RelayEnd::ClientTerminated | RelayEnd::ClientClosed
        ))
    );
    if client_left_cleanly && tracker.is_clean() && buffers.at_message_boundary() {
        release_clean(&mut lease, ctx.reset_timeout).await;
    }
    outcome
}

/// What a transaction-pooling client keeps from one transaction to the next.
struct TxState<'s> {
    tracker: TxTracker,
    client_statements: &'s mut ClientStatements,
    /// The pool has been told once that a backend took this client's settings.
    settings_accepted: bool,
    /// Reused for every transaction: no allocation per transaction once warm.
    responses: Responses,
    /// The pool the client is attached to: its checkouts go there without a map lookup
    /// while it stands for the tenant (`PoolMap::checkout_attached`).
    pool: Arc<TenantPool>,
}

/// Transaction pooling: a backend per transaction, none in between.
async fn transaction_mode<C>(
    client: &mut C,
    settings: &[(String, String)],
    buffers: &mut RelayBuffers,
    (cancel, client_statements): (&CancelGuard, &mut ClientStatements),
    ctx: &SessionContext<'_>,
    pool: &Arc<TenantPool>,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut tx = TxState {
        pool: Arc::clone(pool),
        tracker: TxTracker {
            release_at_idle: true,
            ..TxTracker::default()
        },
        client_statements,
        settings_accepted: false,
        responses: Responses::default(),
    };
    tx.client_statements.limits = ctx.statement_limits;
    let watch = Watch::new(ctx);
    let clock = PhaseClock::watching(!ctx.ceilings.is_empty());
    let watchdog = Watchdog::new(ctx.ceilings, &clock);
    // What ends the session whatever it is doing: made once, polled by the selects between
    // and during transactions (no waiter registered and dropped per transaction).
    // Polled only when they have news: each `select!` polls all its branches at every wake-up.
    let ends = session_ends(&watch, &ctx.shutdown);
    let handover = handover_requested(ctx.handover);
    tokio::pin!(ends, handover);
    let (mut ends, mut handover) = (Quiet::new(ends), Quiet::new(handover));
    loop {
        // Between transactions: idle (a pinned client's idle time is counted by its relay).
        clock.observe(ceilings::Phase::Idle);
        // A handover takes the client here, once nothing of it is held in this process (a
        // message read in part waits for its transaction, which frees the buffers).
        let handing_over = ctx.handover.is_some_and(CancellationToken::is_cancelled);
        if handing_over && buffers.holds_nothing() && !tx.client_statements.needs_pin {
            return Ok(SessionEnd::HandedOver);
        }
        let waited = tokio::select! {
            waited = buffers.wait_for_client(client, &ctx.stats) => waited?,
            // Once it resolved, `handing_over` holds and it is not polled again.
            () = &mut handover, if !handing_over => continue,
            end = &mut ends => return Ok(end),
            reached = watchdog.next() => match Box::pin(ceiling_reached(reached, cancel, ctx)).await {
                Some(err) => return Err(err),
                None => continue,
            },
        };
        if let Some(end) = waited {
            return Ok(SessionEnd::Relay(end));
        }
        if let Some(state) = watch.left_active() {
            // No new transactions for a tenant that is no longer active.
            return Ok(SessionEnd::TenantNotActive(state));
        }
        let served = Box::pin(serve_transaction(
            client,
            settings,
            buffers,
            cancel,
            ctx,
            &mut tx,
            (&watch, Pin::new(&mut ends)),
            (&clock, &watchdog),
        ))
        .await?;
        if let Some(end) = served {
            return Ok(end);
        }
    }
}

/// What ends a session whatever it is doing: shutdown (or KILL), or its tenant leaving
/// `active`. Made once per session and polled, through a [`Quiet`], by each of its selects.
async fn session_ends(watch: &Watch<'_>, shutdown: &CancellationToken) -> SessionEnd {
    tokio::select! {
        () = shutdown.cancelled() => SessionEnd::Shutdown,
        state = watch.must_go() => SessionEnd::TenantNotActive(state),
    }
}

/// Resolves when a handover starts; never for a client that cannot be handed over.
async fn handover_requested(handover: Option<&CancellationToken>) {
    match handover {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// One transaction (or a pinned client's run of them): a backend, its setup sent ahead, the
/// relay until the backend is idle, the release. Boxed by the caller, so a client between
/// transactions holds none of this state (issue 12: an idle client costs its socket and a
/// small struct). `Ok(None)`: the backend went back and the client may send more.
#[allow(
    clippy::too_many_arguments,
    reason = "the transaction loop's state, lent for one turn"
)]
async fn serve_transaction<C, E>(
    client: &mut C,
    settings: &[(String, String)],
    buffers: &mut RelayBuffers,
    cancel: &CancelGuard,
    ctx: &SessionContext<'_>,
    tx: &mut TxState<'_>,
    (watch, mut ends): (&Watch<'_>, Pin<&mut E>),
    (clock, watchdog): (&PhaseClock, &Watchdog<'_>),
) -> Result<Option<SessionEnd>, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    E: Future<Output = SessionEnd>,
{
    let TxState {
        tracker,
        client_statements,
        settings_accepted,
        responses,
        pool,
    } = tx;
    // The tenant as the registry says now (a long-lived client must follow a moved
    // database or a rotated password), not as it was at login.
    let tenant = &*watch.tenant();
    // Declared before the lease: it drops after the lease went back (or closed), so a cancel
    // is never sent to a backend serving another client.
    let _underway = cancel.underway();
    let mut lease = checkout(ctx, tenant, settings, Some(pool)).await?;
    responses.clear();
    prepare_ahead(lease.conn(), ctx, settings, buffers, responses).await?;
    if !*settings_accepted {
        accepted(&lease, settings);
        *settings_accepted = true;
    }
    let backend = lease.conn();
    cancel.attach(cancel_target(backend));
    backend.statements.capacity = ctx.statement_cache_size;
    let outcome = loop {
        let statements = StatementContext {
            client: client_statements,
            backend: &mut backend.statements,
            responses,
        };
        let outcome = tokio::select! {
            end = relay::relay(client, &mut backend.stream, buffers, tracker, Some(statements), &ctx.stats, clock) => end.map(SessionEnd::Relay).map_err(SessionError::from),
            end = ends.as_mut() => Ok(end),
            reached = watchdog.next() => match Box::pin(ceiling_reached(reached, cancel, ctx)).await {
                Some(err) => Err(err),
                None => continue,
            },
        };
        // Idle, but part of a message went one way and not the rest (a client that sent
        // half a CopyData): this backend stays with this client until it is whole.
        if matches!(outcome, Ok(SessionEnd::Relay(RelayEnd::Idle)))
            && !buffers.at_message_boundary()
        {
            continue;
        }
        break outcome;
    };
    cancel.detach().await;
    if let Some(failure) = responses.reset_failure() {
        if failure.starts_with(SqlState::QUERY_CANCELED.code())
            && cancel.delivered()
            && buffers.forget_backend_input()
        {
            tracing::debug!(
                backend_pid = backend.pid,
                "a client's cancel hit the reset sent ahead of its statement; closing the backend"
            );
            cancelled_before_it_began(client, tracker).await?;
            return Ok(None);
        }
        // Nothing of the client's ran; its first messages were spent on this backend.
        tracing::warn!(
            backend_pid = backend.pid,
            reason = failure,
            "the reset before a client's transaction failed; closing the backend and the client"
        );
        return Err(SessionError::ResetFailed(failure.to_owned()));
    }
    let outcome = outcome.map(|end| lost_or(end, tracker));
    tracing::trace!(?outcome, ?tracker, "transaction relay ended");
    backend.needs_reset |= responses.statements_suspect();
    backend.reported_since_reset |= std::mem::take(&mut tracker.parameter_reported);
    // A reset sent ahead and not answered yet (the client asked for nothing the backend
    // answers) leaves answers owed: the backend is not between requests.
    let at_boundary =
        tracker.is_clean() && buffers.at_message_boundary() && !responses.reset_in_flight();
    match outcome {
        Ok(SessionEnd::Relay(RelayEnd::Idle)) if at_boundary => {
            release(&mut lease).await;
            Ok(None)
        }
        Ok(SessionEnd::Relay(end @ (RelayEnd::ClientTerminated | RelayEnd::ClientClosed)))
            if at_boundary =>
        {
            if tracker.pinned {
                // Named statements, LISTEN: a pinned backend is reset like a session's.
                release_clean(&mut lease, ctx.reset_timeout).await;
            } else {
                release_resetting(&mut lease).await;
            }
            Ok(Some(SessionEnd::Relay(end)))
        }
        // Left mid-transaction or mid-message, backend gone, shutdown or error: the lease
        // drops unproven and the backend is closed.
        other => {
            tracing::debug!(outcome = ?other, ?tracker, at_boundary, "transaction relay ended without a clean backend");
            other.map(Some)
        }
    }
}

/// The client's own cancel hit the reset sent ahead of its statement (the server then skipped
/// everything up to the client's first Sync): its statement is cancelled, as it asked, with
/// what PostgreSQL answers a cancelled request (ErrorResponse 57014, ReadyForQuery), and it
/// goes on with another backend. Whatever it sent after that request waits in the relay's
/// buffer for the next one.
async fn cancelled_before_it_began<C>(
    client: &mut C,
    tracker: &mut TxTracker,
) -> Result<(), SessionError>
where
    C: AsyncWrite + Unpin,
{
    *tracker = TxTracker {
        release_at_idle: true,
        ..TxTracker::default()
    };
    let mut out = BytesMut::with_capacity(128);
    messages::error_response(
        &mut out,
        messages::Severity::Error,
        SqlState::QUERY_CANCELED,
        "canceling statement due to user request",
        None,
    );
    messages::ready_for_query(&mut out, b'I');
    let io = |e| SessionError::Relay(RelayError::Client(e));
    client.write_all(&out).await.map_err(io)?;
    client.flush().await.map_err(io)
}

/// A backend of the tenant's pool that can take `settings`: one opened with other startup
/// settings cannot (a reset brings those back, and nothing takes a startup value away), so it
/// is closed and another is taken; the pool stops opening backends with settings. In
/// transaction pooling one opened without settings, from before the pool knew its clients'
/// common ones, is closed too: the one that replaces it carries them, and then a switch
/// between clients needs only the reset (which goes with the next client's first messages,
/// without a round trip).
async fn checkout(
    ctx: &SessionContext<'_>,
    tenant: &TenantRecord,
    settings: &[(String, String)],
    attached: Option<&Arc<TenantPool>>,
) -> Result<Lease, SetupError> {
    loop {
        let mut lease = match attached {
            Some(pool) => ctx.pools.checkout_attached(pool, tenant).await?,
            // Once per session-pooling client: boxed, out of every transaction's checkout.
            None => Box::pin(ctx.pools.checkout(tenant)).await?,
        };
        let startup = &lease.conn().startup_settings;
        if startup.as_slice() == settings {
            return Ok(lease);
        }
        if startup.is_empty() {
            let stale = ctx.mode == PoolMode::Transaction
                && lease.pool().is_some_and(|pool| pool.opens_with(settings));
            if !stale {
                return Ok(lease);
            }
            tracing::debug!(
                backend_pid = lease.conn().pid,
                "backend opened before its pool knew its clients' settings; closing it"
            );
        } else {
            tracing::debug!(
                backend_pid = lease.conn().pid,
                "backend opened with other clients' settings; closing it"
            );
            accepted(&lease, settings);
        }
        drop(lease);
    }
}

/// Tells the lease's pool that a backend accepted (or will be given) these settings.
fn accepted(lease: &Lease, settings: &[(String, String)]) {
    if let Some(pool) = lease.pool() {
        pool.settings_accepted(settings);
    }
}

/// `BackendLost` for a backend that closed without its own last word (an ErrorResponse).
/// Acts on a ceiling: a statement past `max_statement_ms` is cancelled on its backend (the
/// client gets 57014 from the server, and the relay goes on: `None`); an idle ceiling ends
/// the session with its error.
async fn ceiling_reached(
    reached: Reached,
    cancel: &CancelGuard,
    ctx: &SessionContext<'_>,
) -> Option<SessionError> {
    match reached {
        Reached::Statement => {
            let (pid, secret) = cancel.key();
            tracing::info!(tenant = %ctx.tenant.slug, "statement past the plan's max_statement_ms; cancelling it");
            ctx.cancels
                .cancel(pid, secret, Duration::from_secs(5))
                .await;
            None
        }
        Reached::IdleInTransaction(limit) => Some(SessionError::IdleInTransactionTimeout(limit)),
        Reached::ClientIdle(limit) => Some(SessionError::ClientIdleTimeout(limit)),
    }
}

fn lost_or(end: SessionEnd, tracker: &TxTracker) -> SessionEnd {
    match end {
        SessionEnd::Relay(RelayEnd::BackendClosed) if !tracker.backend_error_last => {
            SessionEnd::BackendLost
        }
        other => other,
    }
}

fn cancel_target(backend: &BackendConn) -> CancelTarget {
    CancelTarget {
        addr: backend.addr,
        tls: backend.cancel_tls.clone(),
        backend_pid: backend.pid,
        backend_secret: backend.secret,
    }
}

/// What makes `backend` ready for `client_id`: nothing if it served this client last (and
/// nothing made its statements suspect); otherwise `DISCARD ALL` if a client used it since
/// its last reset, then this client's settings unless the session has them already (a
/// backend opened with the client's settings in its startup packet has them after the reset
/// too).
///
/// Every switch between clients resets: no detection of what a client left behind can see
/// every path (set_config() in a SELECT, a DO block, a trigger, temp tables made by a
/// function, advisory locks, LISTEN inside EXECUTE), so none is tried (issue 11). DISCARD ALL
/// is one utility statement, cheaper on the server than `SELECT 1` and several times cheaper
/// than the list of resets it stands for without `DEALLOCATE ALL` (measured with pgbench on
/// PostgreSQL 15: 150k/s against 23k/s), and only it also drops SQL-level `PREPARE`d
/// statements and cursors WITH HOLD. It drops the shared `tg_` statements too: the
/// backend's statement cache is emptied with it and they are prepared again when used.
fn needed_setup(
    backend: &BackendConn,
    client_id: u64,
    settings: &[(String, String)],
) -> Option<Setup> {
    if backend.owner == client_id && !backend.needs_reset {
        return None;
    }
    let reset = backend.owner != 0 || backend.needs_reset;
    let in_effect: &[(String, String)] = if reset {
        &backend.startup_settings
    } else {
        &backend.applied
    };
    let settings = in_effect != settings && !settings.is_empty();
    (reset || settings).then_some(Setup { reset, settings })
}

/// What a backend needs before it serves a client: see [`needed_setup`].
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// `DISCARD ALL` first.
    reset: bool,
    /// Then the client's settings.
    settings: bool,
}

/// Records on `backend` that the setup of `needed_setup` was sent (or ran).
fn setup_done(
    backend: &mut BackendConn,
    client_id: u64,
    settings: &[(String, String)],
    reset: bool,
) {
    if reset {
        backend.statements.clear();
        backend.needs_reset = false;
        // A reset sent ahead goes only where nothing was reported since the last one; a
        // round trip absorbed its reports.
        backend.reported_since_reset = false;
    }
    settings.clone_into(&mut backend.applied);
    backend.owner = client_id;
}

/// Transaction pooling: makes `backend` ready for this client without a round trip when
/// only a reset is needed. The reset goes in the same write as the client's first messages
/// ([`statements::RESET_AHEAD`]), and if it fails the server skips them: the relay ends with
/// `ResetFailed` and nothing of the client's ran. Settings (rare: clients of one tenant with
/// different startup settings) still take a round trip ([`prepare`]).
async fn prepare_ahead(
    backend: &mut BackendConn,
    ctx: &SessionContext<'_>,
    settings: &[(String, String)],
    buffers: &mut RelayBuffers,
    responses: &mut Responses,
) -> Result<(), SetupError> {
    match needed_setup(backend, ctx.client_id, settings) {
        None => {
            backend.owner = ctx.client_id;
            Ok(())
        }
        Some(Setup {
            reset: true,
            settings: false,
        }) if backend.reset_ahead_ok
            && !backend.reported_since_reset
            && buffers.prepend_to_backend(statements::RESET_AHEAD) =>
        {
            responses.reset_sent();
            setup_done(backend, ctx.client_id, settings, true);
            Ok(())
        }
        // Rare (a round trip): boxed, out of every transaction's future.
        Some(_) => Box::pin(prepare(backend, ctx.client_id, settings, ctx.reset_timeout)).await,
    }
}

/// Makes `backend` ready for `client_id`, a round trip per query, before any byte of the
/// client's goes to it: the reset (and the settings) either succeeded or the backend is
/// closed and the client gets the error, never its query run in someone else's session.
async fn prepare(
    backend: &mut BackendConn,
    client_id: u64,
    settings: &[(String, String)],
    timeout: Duration,
) -> Result<(), SetupError> {
    let Some(setup) = needed_setup(backend, client_id, settings) else {
        // Nothing to send, but the backend now serves this client: the next one resets it.
        backend.owner = client_id;
        return Ok(());
    };
    if setup.reset {
        if let SetupOutcome::Failed(err) = backend.run_setup_query("DISCARD ALL", timeout).await? {
            backend.broken = true;
            return Err(SetupError::Backend(BackendError::Refused(err)));
        }
    }
    if let Some(sql) = settings::settings_query(settings).filter(|_| setup.settings) {
        if let SetupOutcome::Failed(err) = backend.run_setup_query(&sql, timeout).await? {
            // The backend may now carry part of the settings: never reuse it.
            backend.broken = true;
            return Err(SetupError::SettingRejected(err));
        }
    }
    setup_done(backend, client_id, settings, setup.reset);
    Ok(())
}

/// A fresh backend's parameters as this client's settings change them: reported parameters
/// the client set take its values.
fn with_settings(
    base: &[(String, String)],
    settings: &[(String, String)],
) -> Vec<(String, String)> {
    base.iter()
        .map(|(name, value)| {
            let set = settings
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or(value, |(_, v)| v);
            (name.clone(), set.clone())
        })
        .collect()
}

/// Sends the client what PostgreSQL sends after AuthenticationOk: every ParameterStatus,
/// BackendKeyData and ReadyForQuery, after `owed` (the end of the authentication exchange,
/// emptied here), in one write.
async fn greet<C>(
    client: &mut C,
    owed: &mut BytesMut,
    params: &[(String, String)],
    (pid, secret): (i32, i32),
) -> Result<(), SetupError>
where
    C: AsyncWrite + Unpin,
{
    let mut out = std::mem::take(owed);
    out.reserve(512);
    for (name, value) in params {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, pid, secret);
    messages::ready_for_query(&mut out, b'I');
    client.write_all(&out).await.map_err(SetupError::ClientIo)?;
    client.flush().await.map_err(SetupError::ClientIo)?;
    Ok(())
}

/// Transaction pooling: releases a backend the client left idle and at a message boundary,
/// unreset: the next checkout sends the reset in the same write as its client's first
/// messages ([`prepare_ahead`]), this client's included (its own session state is gone by
/// its next transaction too, whichever backend serves it). One the next client cannot take
/// that way (a ParameterStatus reached this client, or a server that runs an extended-protocol
/// DISCARD ALL inside the next transaction) is reset now instead. A backend nobody takes is
/// reset by its pool's sweeper within about [`crate::pool::SWEEP_EVERY`], so what this client
/// left (a session advisory lock) does not outlast it for long. Either way no state of this
/// client reaches the next.
async fn release(lease: &mut Lease) {
    let backend = lease.conn();
    if backend.reset_ahead_ok && !backend.reported_since_reset {
        backend.needs_reset = true;
        lease.reusable_unreset();
        return;
    }
    release_resetting(lease).await;
}

/// Releases a backend with its reset on the way (`BackendConn::start_reset`).
async fn release_resetting(lease: &mut Lease) {
    if lease.conn().start_reset().await.is_ok() {
        lease.reusable();
    }
}

/// Resets a backend the client left idle and proves it reusable; on any failure it is
/// closed instead. DISCARD ALL also releases session advisory locks and LISTENs.
async fn release_clean(lease: &mut Lease, timeout: Duration) {
    let backend = lease.conn();
    match backend.run_setup_query("DISCARD ALL", timeout).await {
        Ok(SetupOutcome::Done) => {
            backend.owner = 0;
            backend.applied.clear();
            backend.statements.clear();
            backend.needs_reset = false;
            backend.reported_since_reset = false;
            lease.reusable();
        }
        Ok(SetupOutcome::Failed(e)) => {
            tracing::warn!(code = %e.code, message = %e.message, "backend reset failed; closing it");
        }
        Err(e) => {
            tracing::warn!(error = %e, "backend reset failed; closing it");
        }
    }
}
