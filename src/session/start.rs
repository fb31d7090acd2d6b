//! From a logged-in client to a ready [`Session`]: its tenant's limits, its place on the
//! client roster and in the tenant's counters, its tenant's pool attached, a backend made
//! ready (session pooling) or the parameters a backend reports (transaction pooling), and the
//! greeting (ParameterStatus, BackendKeyData, ReadyForQuery). Every step a session needs
//! before its first message is here, in order; [`Session::run`] takes it ready and only
//! relays.
//!
//! [`resume`] does the same for a client another tenantgate process handed over (an upgrade),
//! without the greeting it already had.
//!
//! It does not authenticate (the server's login did) and does not relay. Its errors are
//! [`SetupError`]s, sent to the client as a FATAL before any query ran.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::cancel::{CancelGuard, CancelMap};
use super::ceilings::Ceilings;
use super::relay::RelayBuffers;
use super::statements::{ClientStatements, StatementLimits};
use super::{SessionContext, SetupError, cancel_target, greet, greeting_params, ready_backend};
use crate::clients::{ClientEntry, ClientRoster, RosterGuard};
use crate::pool::{Lease, PoolMap, PoolMode, PoolUse};
use crate::registry::{TenantDirectory, TenantRecord};
use crate::stats::{ClientGuard, Stats};

/// What sessions use of the proxy, shared by every client.
pub struct Services<'a> {
    pub directory: &'a TenantDirectory,
    pub pools: &'a PoolMap,
    pub cancels: &'a CancelMap,
    pub clients: &'a ClientRoster,
    pub stats: &'a Stats,
    /// How long a client of a suspended tenant may go on before it is disconnected.
    pub suspend_grace: Duration,
    /// The largest message a client may send.
    pub max_client_message_bytes: usize,
    /// Shutdown of the proxy's sessions; each session ends through a child of it (KILL).
    pub shutdown: &'a CancellationToken,
    /// Cancelled when this process hands its clients to a newer one (an upgrade); only for
    /// clients whose socket can change hands (plaintext TCP).
    pub handover: Option<&'a CancellationToken>,
}

/// Who logged in, as the login established it.
pub struct Admission {
    pub client_id: u64,
    pub tenant: Arc<TenantRecord>,
    pub user: String,
    /// The client's startup settings (application_name, DateStyle, ...).
    pub settings: Vec<(String, String)>,
    pub peer: Option<SocketAddr>,
    /// TLS protocol version and cipher suite; empty for a plaintext client.
    pub tls: String,
}

/// A client ready for its first message: greeted, counted, on the roster, its pool attached
/// (and in session pooling, its backend ready). Dropping it takes the client off the roster
/// and the counters.
pub struct Session<'a> {
    pub(super) ctx: SessionContext<'a>,
    pub(super) settings: Vec<(String, String)>,
    pub(super) cancel: CancelGuard,
    pub(super) buffers: RelayBuffers,
    /// Session pooling: the client's backend for its whole life (boxed: most sessions are
    /// transaction-pooled and carry only the pointer).
    pub(super) backend: Option<Box<Lease>>,
    /// Transaction pooling: the client's named prepared statements (boxed away from the
    /// relay's state so a handover can carry them).
    pub(super) statements: ClientStatements,
    /// Keeps the tenant's pool (and so its limits) in place while this client is connected.
    pub(super) attached: PoolUse,
    pub(super) _on_roster: RosterGuard,
    pub(super) _counted: ClientGuard,
}

/// Sets up the session of a client that logged in, and greets it. `owed` is what the login
/// left unsent (the end of the authentication exchange, AuthenticationOk last): it goes in
/// the same write as the greeting, or ahead of the error when the session cannot start.
pub async fn start<'a, C>(
    client: &mut C,
    services: Services<'a>,
    admission: Admission,
    owed: BytesMut,
) -> Result<Session<'a>, SetupError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut owed = owed;
    let started = greeted_session(client, services, admission, &mut owed).await;
    if started.is_err() && !owed.is_empty() {
        // Not greeted: the client hears it was authenticated, then the error (the caller's).
        drop(client.write_all(&owed).await);
    }
    started
}

/// [`start`]'s work: `owed` is emptied once it went out with the greeting.
async fn greeted_session<'a, C>(
    client: &mut C,
    services: Services<'a>,
    admission: Admission,
    owed: &mut BytesMut,
) -> Result<Session<'a>, SetupError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let opened = open(services, admission).await?;
    let ctx = &opened.ctx;
    let (cancel, backend) = match ctx.mode {
        PoolMode::Session => {
            let mut lease = ready_backend(ctx, &opened.settings).await?;
            let cancel = ctx.cancels.register(cancel_target(lease.conn()));
            greet(client, owed, &lease.conn().params, cancel.key()).await?;
            (cancel, Some(Box::new(lease)))
        }
        PoolMode::Transaction => {
            let cancel = ctx.cancels.register_detached();
            let params = greeting_params(ctx, &opened.settings).await?;
            greet(client, owed, &params, cancel.key()).await?;
            (cancel, None)
        }
    };
    Ok(opened.into_session(cancel, backend, ClientStatements::default()))
}

/// What a client handed over by another tenantgate process (an upgrade) brings besides its
/// login: the cancel key it was given, and its named prepared statements.
pub struct Carried {
    pub cancel_key: (i32, i32),
    /// (name, Parse body after the name), as `ClientStatements::export` gave them.
    pub statements: Vec<(String, Bytes)>,
}

/// Sets up the session of a client another process served until now, without greeting it
/// (it was greeted there): the same steps as [`start`], its cancel key and its prepared
/// statements kept. Its next message is read from its socket as if nothing happened.
pub async fn resume(
    services: Services<'_>,
    admission: Admission,
    carried: Carried,
) -> Result<Session<'_>, SetupError> {
    let opened = open(services, admission).await?;
    let ctx = &opened.ctx;
    let mut statements = ClientStatements::default();
    statements.limits = ctx.statement_limits;
    statements
        .import(carried.statements)
        .map_err(SetupError::CarriedStatements)?;
    let cancel = ctx
        .cancels
        .register_carried(carried.cancel_key)
        .unwrap_or_else(|| {
            tracing::warn!("a client of this process holds the handed-over client's cancel key; it gets a new one it cannot learn");
            ctx.cancels.register_detached()
        });
    let backend = match ctx.mode {
        PoolMode::Session => {
            let mut lease = ready_backend(ctx, &opened.settings).await?;
            cancel.attach(cancel_target(lease.conn()));
            Some(Box::new(lease))
        }
        PoolMode::Transaction => None,
    };
    Ok(opened.into_session(cancel, backend, statements))
}

/// A session set up up to its backend and greeting.
struct Opened<'a> {
    ctx: SessionContext<'a>,
    settings: Vec<(String, String)>,
    attached: PoolUse,
    on_roster: RosterGuard,
    counted: ClientGuard,
}

impl<'a> Opened<'a> {
    fn into_session(
        self,
        cancel: CancelGuard,
        backend: Option<Box<Lease>>,
        statements: ClientStatements,
    ) -> Session<'a> {
        Session {
            buffers: RelayBuffers::new(self.ctx.max_client_message_bytes),
            ctx: self.ctx,
            settings: self.settings,
            cancel,
            backend,
            statements,
            attached: self.attached,
            _on_roster: self.on_roster,
            _counted: self.counted,
        }
    }
}

/// The tenant's limits, the roster, the counters, the session's context and its pool
/// attached: everything before a backend.
async fn open(services: Services<'_>, admission: Admission) -> Result<Opened<'_>, SetupError> {
    let Admission {
        client_id,
        tenant,
        user,
        mut settings,
        peer,
        tls,
    } = admission;
    let limits = services.pools.limits_for(&tenant);
    // KILL and shutdown end the session through this token.
    let stop = services.shutdown.child_token();
    let on_roster = services.clients.join(ClientEntry {
        id: client_id,
        tenant: Some(tenant.slug.clone()),
        user,
        addr: peer,
        application_name: settings
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        mode: limits.mode.as_str(),
        connected_at: chrono::Utc::now(),
        tls,
        stop: stop.clone(),
    });
    if let Some(ms) = limits.statement_timeout_ms {
        // The plan's statement_timeout, unless the client chose its own.
        if !settings
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("statement_timeout"))
        {
            settings.insert(0, ("statement_timeout".to_owned(), format!("{ms}ms")));
            settings.shrink_to_fit();
        }
    }
    // Counted from here until the session is dropped, however it ends.
    let stats = services.stats.for_tenant(&tenant.slug);
    let counted = stats.client_connected();
    let pool_config = services.pools.config();
    let ctx = SessionContext {
        tenant,
        directory: services.directory,
        suspend_grace: services.suspend_grace,
        pools: services.pools,
        mode: limits.mode,
        client_id,
        cancels: services.cancels,
        reset_timeout: Duration::from_millis(pool_config.reset_timeout_ms),
        max_client_message_bytes: services.max_client_message_bytes,
        statement_cache_size: pool_config.prepared_statement_cache_size,
        statement_limits: StatementLimits {
            count: pool_config.max_prepared_statements_per_client,
            bytes: pool_config.max_prepared_statement_bytes_per_client,
        },
        ceilings: Ceilings {
            statement: limits.max_statement_ms.map(Duration::from_millis),
            idle_in_transaction: limits.max_idle_in_transaction_ms.map(Duration::from_millis),
            client_idle: limits.max_client_idle_ms.map(Duration::from_millis),
        },
        shutdown: stop,
        handover: services.handover,
        stats,
    };
    let attached = ctx.pools.attach(&ctx.tenant).await?;
    if ctx.mode == PoolMode::Transaction {
        // Every change of client resets; backends opened with the clients' settings
        // need nothing more. (A session-mode backend serves one client for long: it is
        // opened bare, for any client, until clients are known to share settings.)
        attached.pool().expect_settings(&settings);
    }
    Ok(Opened {
        ctx,
        settings,
        attached,
        on_roster,
        counted,
    })
}
