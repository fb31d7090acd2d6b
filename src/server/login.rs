//! Startup, routing and authentication of one client, after the encryption decision: the
//! startup packet, protocol version, the tenant the database name or TLS server name (SNI,
//! custom domain) designates, the failed-login throttle, and the authentication each user's
//! method asks for. Every way a login fails is a [`LoginError`], mapped here to its SQLSTATE;
//! every login that named a user gets one audit line.
//!
//! Routing with TLS: when the client's SNI is exactly a tenant's custom domain
//! (`tenant_domains`), or `tls.sni_base_domain` is set and the SNI is `<tenant>.<base>`, the
//! SNI names the tenant and the database name is not used for routing
//! (even the admin database name: the console is reached only without a tenant SNI). After
//! authentication, a database name that is another existing tenant is refused (28000), so a
//! client cannot believe it reached one tenant while it reached another; checking only after
//! authentication keeps unauthenticated clients from probing which tenants exist.
//!
//! This module must not write to the client except through the authentication exchange and
//! the version negotiation; failures go back to `client`, which sends them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::State;
use super::login_slot::{LoginSlot, NoSlot};
use super::proxy_header::ProxyHeaderError;
use crate::auth::method::{Proof, authenticate_by_method};
use crate::auth::throttle::{LoginThrottle, Target, Throttled};
use crate::auth::{self, AuthError, Credential, ScramSecret};
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::startup::{self, FirstPacket, StartupError, StartupMessage};
use crate::protocol::{SqlState, messages};
use crate::registry::{
    AuthMethod, MAX_NAME_BYTES, RegistryError, TenantRecord, TenantSlug, TenantState,
    normalize_domain,
};
use crate::session::CancelOutcome;
use crate::session::settings::{self, SettingsError};
use crate::stats::LoginOutcome;
use crate::tls::{TlsInfo, TlsMode, TlsServer};

/// Everything that can stop a client before its session starts.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    ProxyHeader(#[from] ProxyHeaderError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("no user name in the startup packet")]
    NoUser,
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("tenant {slug} is {state}")]
    TenantNotActive {
        slug: TenantSlug,
        state: TenantState,
    },
    #[error(transparent)]
    Throttled(#[from] Throttled),
    #[error("no login slot free within {waited:?}{}", if *per_source { " for its address" } else { "" })]
    TooManyLogins {
        waited: Duration,
        /// The client's address had all its own slots taken.
        per_source: bool,
    },
    #[error("login did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0} is not an admin user")]
    NotAdmin(String),
    #[error("plaintext login refused: tls.mode is require")]
    TlsRequired,
    #[error("SSLRequest or GSSENCRequest over an encrypted connection")]
    EncryptionRequestOverTls,
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    #[error("database {database:?} is another tenant than SNI {server_name:?} (tenant {tenant:?})")]
    SniMismatch {
        server_name: String,
        tenant: String,
        database: String,
    },
}

impl From<NoSlot> for LoginError {
    fn from(NoSlot { waited, per_source }: NoSlot) -> Self {
        LoginError::TooManyLogins { waited, per_source }
    }
}

impl ClientFacing for LoginError {
    fn sqlstate(&self) -> SqlState {
        match self {
            LoginError::ProxyHeader(e) => e.sqlstate(),
            LoginError::Startup(e) => e.sqlstate(),
            LoginError::NoUser
            | LoginError::NotAdmin(_)
            | LoginError::TlsRequired
            | LoginError::SniMismatch { .. } => SqlState::INVALID_AUTHORIZATION,
            LoginError::EncryptionRequestOverTls | LoginError::DirectTlsWithoutAlpn => {
                SqlState::PROTOCOL_VIOLATION
            }
            LoginError::Settings(SettingsError::Replication) => SqlState::FEATURE_NOT_SUPPORTED,
            LoginError::Settings(_) | LoginError::Timeout(_) => SqlState::PROTOCOL_VIOLATION,
            LoginError::Auth(e) => e.sqlstate(),
            LoginError::Registry(e) => e.sqlstate(),
            LoginError::TenantNotActive { .. } => SqlState::CANNOT_CONNECT_NOW,
            LoginError::Throttled(_) | LoginError::TooManyLogins { .. } => {
                SqlState::TOO_MANY_CONNECTIONS
            }
        }
    }

    fn client_message(&self) -> String {
        match self {
            LoginError::ProxyHeader(e) => e.client_message(),
            LoginError::Startup(e) => e.client_message(),
            LoginError::NoUser => "no PostgreSQL user name specified in startup packet".to_owned(),
            LoginError::Settings(e) => e.to_string(),
            LoginError::Auth(e) => e.client_message(),
            LoginError::Registry(e) => e.client_message(),
            LoginError::TenantNotActive { slug, state } => {
                format!("tenant \"{slug}\" is {state} and does not accept connections")
            }
            LoginError::Timeout(_) => "canceling authentication due to timeout".to_owned(),
            LoginError::TooManyLogins {
                per_source: true, ..
            } => "sorry, too many logins in progress from your address; try again later".to_owned(),
            LoginError::TooManyLogins { .. } => {
                "sorry, too many logins in progress; try again later".to_owned()
            }
            LoginError::Throttled(t) => format!(
                "too many failed login attempts; try again later (in {} seconds)",
                t.retry_after.as_secs().max(1)
            ),
            LoginError::NotAdmin(user) => format!(
                "user \"{user}\" is not an admin user: only admin users may connect to the admin database"
            ),
            LoginError::TlsRequired => "this server requires TLS: connect with sslmode=require \
                 (or verify-ca, verify-full)"
                .to_owned(),
            LoginError::EncryptionRequestOverTls => {
                "SSLRequest or GSSENCRequest received over an encrypted connection".to_owned()
            }
            LoginError::DirectTlsWithoutAlpn => "received direct SSL connection request \
                 without ALPN protocol negotiation extension"
                .to_owned(),
            LoginError::SniMismatch {
                server_name,
                tenant,
                database,
            } => format!(
                "database \"{database}\" does not match tenant \"{tenant}\" named by the TLS \
                 server name \"{server_name}\": connect to {server_name} without a database name, \
                 or with database \"{tenant}\""
            ),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            LoginError::ProxyHeader(e) => e.kind(),
            LoginError::Startup(e) => e.kind(),
            LoginError::NoUser
            | LoginError::Settings(_)
            | LoginError::Timeout(_)
            | LoginError::NotAdmin(_)
            | LoginError::TlsRequired
            | LoginError::EncryptionRequestOverTls
            | LoginError::DirectTlsWithoutAlpn
            | LoginError::SniMismatch { .. } => ErrorKind::Client,
            LoginError::Auth(e) => e.kind(),
            LoginError::Registry(e) => e.kind(),
            LoginError::TenantNotActive { .. }
            | LoginError::Throttled(_)
            | LoginError::TooManyLogins { .. } => ErrorKind::Limit,
        }
    }
}

/// Who tried to log in, as far as the startup packet said: for the audit line.
#[derive(Debug, Default)]
pub(super) struct LoginAttempt {
    /// The admin console rather than a tenant.
    pub(super) admin: bool,
    /// The tenant (database name or SNI tenant) asked for.
    pub(super) tenant: String,
    pub(super) user: String,
}

/// How a login ended, for `tenantgate_logins_total`; `None` for a CancelRequest.
pub(super) fn login_outcome(result: &Result<Login, LoginError>) -> Option<LoginOutcome> {
    Some(match result {
        Ok(Login::Cancel) => return None,
        Ok(Login::Tenant { .. } | Login::Admin { .. }) => LoginOutcome::Ok,
        Err(
            LoginError::Auth(
                AuthError::Failed { .. }
                | AuthError::CertificateRequired { .. }
                | AuthError::CertificateMismatch { .. }
                | AuthError::CertificateForElsewhere { .. },
            )
            | LoginError::NotAdmin(_),
        ) => LoginOutcome::AuthFailed,
        Err(
            LoginError::Auth(AuthError::ClientLeft | AuthError::Abandoned)
            | LoginError::Startup(StartupError::Eof),
        ) => LoginOutcome::Abandoned,
        Err(LoginError::Throttled(_)) => LoginOutcome::Throttled,
        Err(LoginError::TenantNotActive { .. }) => LoginOutcome::TenantUnavailable,
        Err(LoginError::TooManyLogins { .. }) => LoginOutcome::TooManyLogins,
        Err(LoginError::Timeout(_)) => LoginOutcome::Timeout,
        Err(_) => LoginOutcome::Refused,
    })
}

/// The audit line of one login (target `tenantgate::audit`, info): who, from where, and how it
/// ended. No secret is in any of these fields.
pub(super) fn audit_login(
    peer: Option<SocketAddr>,
    who: &LoginAttempt,
    result: &Result<Login, LoginError>,
) {
    let (outcome, reason) = match (login_outcome(result), result) {
        (None, _) => return,
        (Some(LoginOutcome::Ok), _) => ("ok", String::new()),
        (Some(LoginOutcome::AuthFailed), _) => ("failed auth", String::new()),
        (Some(LoginOutcome::Abandoned), _) => ("abandoned", String::new()),
        (_, Err(e)) => ("refused", format!("{} {e}", e.sqlstate().code())),
        (_, Ok(_)) => ("refused", String::new()),
    };
    audit_line(peer, who, outcome, &reason);
}

pub(super) fn audit_line(
    peer: Option<SocketAddr>,
    who: &LoginAttempt,
    outcome: &str,
    reason: &str,
) {
    tracing::info!(
        target: "tenantgate::audit",
        event = "login",
        kind = if who.admin { "admin" } else { "tenant" },
        tenant = %who.tenant,
        user = %who.user,
        source = %peer.map(|p| p.to_string()).unwrap_or_default(),
        outcome,
        reason,
        "login"
    );
}

/// What the login phase produced.
pub(super) enum Login {
    /// A CancelRequest, already handled.
    Cancel,
    /// An authenticated client of an active tenant.
    Tenant {
        record: Arc<TenantRecord>,
        user: String,
        settings: Vec<(String, String)>,
        /// The exchange's last messages, AuthenticationOk last, not sent yet: they go in the
        /// same write as the greeting (`auth::authenticate`).
        owed: BytesMut,
    },
    /// An authenticated admin user, for the admin console.
    Admin {
        user: String,
        /// As for `Tenant`: sent before the console's first message.
        owed: BytesMut,
    },
}

/// A client socket after the encryption decision, with what the login path needs to know.
pub(super) struct Conn<S> {
    pub(super) stream: S,
    pub(super) peer: Option<SocketAddr>,
    /// Present when the client speaks TLS.
    pub(super) tls: Option<TlsInfo>,
    /// The TLS setup current when the client connected (a reload does not change it midway).
    pub(super) tls_setup: Arc<TlsServer>,
}

/// Startup, routing and authentication, bounded by the caller's login deadline.
pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    conn: &mut Conn<S>,
    first: Option<FirstPacket>,
    who: &mut LoginAttempt,
    slot: &mut LoginSlot,
) -> Result<Login, LoginError> {
    let stream = &mut conn.stream;
    let packet = match first {
        Some(packet) => packet,
        None => {
            startup::read_first_packet(stream, state.config.get().proxy.max_startup_packet_bytes)
                .await?
        }
    };
    let startup = match packet {
        FirstPacket::Startup(message) => message,
        // A cancel carries its own secret; PostgreSQL accepts it in the clear whatever the
        // encryption policy.
        FirstPacket::Cancel { pid, secret } => {
            cancel(state, conn.peer.map(|p| p.ip()), pid, secret).await;
            return Ok(Login::Cancel);
        }
        // Another instance's, for a key of ours (crate::instance): never forwarded again.
        FirstPacket::ForwardedCancel { pid, secret, mac } => {
            match state.instances.accept_forward(pid, secret, &mac).await {
                Some(outcome) => crate::instance::answer_forward(stream, outcome).await,
                None => {
                    if let Some(source) = conn.peer.map(|p| p.ip()) {
                        state.throttle.unknown_cancel_key(source).await;
                    }
                }
            }
            return Ok(Login::Cancel);
        }
        FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
            return Err(LoginError::EncryptionRequestOverTls);
        }
    };
    // Before any authentication request, so no password travels in the clear.
    if conn.tls.is_none() && conn.tls_setup.mode == TlsMode::Require {
        return Err(LoginError::TlsRequired);
    }
    negotiate_version(stream, &startup).await?;
    let user = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or(LoginError::NoUser)?;
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    tracing::Span::current().record("user", user);
    user.clone_into(&mut who.user);
    database.clone_into(&mut who.tenant);
    let settings = settings::client_settings(&startup.params)?;
    let source = conn.peer.map(|p| p.ip());
    let server_name = conn.tls.as_ref().and_then(|t| t.server_name.as_deref());
    // A certificate must be for the database asked for (the admin console's name, or a
    // tenant's slug); a tenant reached by TLS server name is scoped below.
    let mut proof = Proof {
        channel_binding: conn.tls.as_ref().and_then(|t| t.channel_binding.as_deref()),
        client_cn: conn.tls.as_ref().and_then(|t| t.client_cn.as_deref()),
        client_ou: conn.tls.as_ref().and_then(|t| t.client_ou.as_deref()),
        scope: database,
    };
    let sni_tenant = match server_name {
        Some(name) => tenant_for_server_name(state, &conn.tls_setup, name).await?,
        None => None,
    };
    let Some(sni_tenant) = sni_tenant else {
        if database == state.config.get().admin.database {
            who.admin = true;
            let owed = authenticate_admin(state, stream, user, proof, (source, slot)).await?;
            return Ok(Login::Admin {
                user: user.to_owned(),
                owed,
            });
        }
        let (record, owed) =
            authenticate(state, stream, database, user, proof, (source, slot)).await?;
        return tenant_login(stream, record, user, settings, owed).await;
    };
    who.tenant.clone_from(&sni_tenant);
    proof.scope = &sni_tenant;
    let (record, owed) =
        authenticate(state, stream, &sni_tenant, user, proof, (source, slot)).await?;
    if database != sni_tenant {
        if let Some(other) = TenantSlug::parse(database) {
            if state.directory.tenant(&other).await?.is_some() {
                send_owed(stream, &owed).await?;
                return Err(LoginError::SniMismatch {
                    server_name: server_name.unwrap_or_default().to_owned(),
                    tenant: sni_tenant,
                    database: database.to_owned(),
                });
            }
        }
    }
    tenant_login(stream, record, user, settings, owed).await
}

/// The tenant a TLS server name designates: a custom domain of a tenant (`tenant_domains`)
/// when it is exactly one, else `<tenant>.<sni_base_domain>`.
async fn tenant_for_server_name(
    state: &State,
    tls_setup: &TlsServer,
    server_name: &str,
) -> Result<Option<String>, LoginError> {
    let by_base_domain = tls_setup.tenant_from_sni(server_name);
    if let Some(domain) = normalize_domain(server_name) {
        match state.directory.tenant_for_domain(&domain).await {
            Ok(Some(slug)) => return Ok(Some(slug.as_str().to_owned())),
            Ok(None) => {}
            // The base-domain rule needs no registry: a tenant it names stays reachable while
            // the registry is away (its record may be cached).
            Err(e) if by_base_domain.is_some() => {
                tracing::warn!(error = %e, "custom domain lookup failed; using sni_base_domain");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(by_base_domain)
}

async fn tenant_login<S: AsyncWrite + Unpin>(
    stream: &mut S,
    record: Arc<TenantRecord>,
    user: &str,
    settings: Vec<(String, String)>,
    owed: BytesMut,
) -> Result<Login, LoginError> {
    if record.state != TenantState::Active {
        send_owed(stream, &owed).await?;
        return Err(LoginError::TenantNotActive {
            slug: record.slug.clone(),
            state: record.state,
        });
    }
    Ok(Login::Tenant {
        record,
        user: user.to_owned(),
        settings,
        owed,
    })
}

/// Sends the exchange's last messages ahead of an error found after authentication: the
/// client hears it was authenticated, then why it may not go on, as from PostgreSQL.
async fn send_owed<S: AsyncWrite + Unpin>(stream: &mut S, owed: &[u8]) -> Result<(), LoginError> {
    stream
        .write_all(owed)
        .await
        .map_err(|e| LoginError::Startup(StartupError::Io(e)))
}

/// SCRAM against an admin user's verifier (or a mock one). Tenant users are not admin
/// users: the two live in different registry tables.
async fn authenticate_admin<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    stream: &mut S,
    user: &str,
    proof: Proof<'_>,
    (source, slot): (Option<IpAddr>, &mut LoginSlot),
) -> Result<BytesMut, LoginError> {
    let attempt = begin_attempt(state, source, Target::Admin, slot).await?;
    let login = if user.len() <= MAX_NAME_BYTES {
        state.directory.registry().admin_login(user).await?
    } else {
        None
    };
    let method = login.as_ref().map_or(AuthMethod::Scram, |l| l.method);
    let mock = || ScramSecret::mock(&state.mock_key, &format!("\0admin\0{user}"));
    let credential = match login.as_ref().and_then(|l| ScramSecret::parse(&l.verifier)) {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: mock(),
            is_mock: true,
        },
    };
    // A `cert` admin without a certificate fails as a non-admin does (auth::method explains).
    let is_admin = !(credential.is_mock || method == AuthMethod::Cert && proof.client_cn.is_none());
    let attempt = arm(attempt);
    let result = authenticate_by_method(stream, user, method, credential, mock(), proof).await;
    end_attempt(state, attempt, &result);
    match result {
        // The exchange ran in full either way; only then is a non-admin told why.
        Err(AuthError::Failed { .. }) if !is_admin => Err(LoginError::NotAdmin(user.to_owned())),
        other => Ok(other?),
    }
}

/// Forwards a CancelRequest unless its source is locked out for guessing keys: to our
/// backend if this process issued the key, else to an older process handing its clients over
/// (an upgrade), else to the instance that issued it (`crate::instance`). A key nobody holds
/// counts against the source.
async fn cancel(state: &State, source: Option<IpAddr>, pid: i32, secret: i32) {
    if let Some(source) = source {
        if !state.throttle.cancel_allowed(source).await {
            tracing::debug!(%source, "cancel request dropped: too many unknown keys from its source");
            return;
        }
    }
    let mut outcome = state
        .cancels
        .cancel(pid, secret, Duration::from_secs(5))
        .await;
    if outcome == CancelOutcome::UnknownKey
        && state.handover.forward_cancel(pid, secret).await == Some(true)
    {
        // During an upgrade the key may be a client's still on the older process.
        outcome = CancelOutcome::Delivered;
    }
    let unknown = outcome == CancelOutcome::UnknownKey
        && state
            .instances
            .forward_cancel(pid, secret)
            .await
            .unknown_key();
    if let (true, Some(source)) = (unknown, source) {
        state.throttle.unknown_cancel_key(source).await;
    }
}

/// A client asking for protocol 3.x (x > 0) or `_pq_.` options is told what we speak: 3.0 and
/// none of the options.
async fn negotiate_version<S: AsyncWrite + Unpin>(
    stream: &mut S,
    startup: &StartupMessage,
) -> Result<(), LoginError> {
    let unrecognized: Vec<String> = startup
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if startup.minor_version == 0 && unrecognized.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    messages::negotiate_protocol_version(&mut out, 0, &unrecognized);
    stream
        .write_all(&out)
        .await
        .map_err(|e| LoginError::Startup(StartupError::Io(e)))
}

/// SCRAM against the stored verifier of (tenant, user), or against a mock one, so unknown
/// tenants, unknown users and wrong passwords fail alike.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    stream: &mut S,
    database: &str,
    user: &str,
    proof: Proof<'_>,
    (source, slot): (Option<IpAddr>, &mut LoginSlot),
) -> Result<(Arc<TenantRecord>, BytesMut), LoginError> {
    let attempt = begin_attempt(state, source, Target::Tenant(database), slot).await?;
    let slug = TenantSlug::parse(database);
    let record = match &slug {
        Some(slug) => state.directory.tenant(slug).await?,
        None => None,
    };
    // The user is looked up for a tenant that does not exist too, so that an unknown tenant
    // costs what an unknown user of a real one does (timing tells them apart no more than
    // the answer does). A name longer than any user's can be (63 bytes) is not looked up, nor
    // cached: it is known not to exist.
    let login = match &slug {
        Some(slug) if user.len() <= MAX_NAME_BYTES => {
            state.directory.user_login(slug, user).await?
        }
        _ => None,
    };
    let login = login.filter(|_| record.is_some());
    let method = login.as_ref().map_or(AuthMethod::Scram, |l| l.method);
    let mock = || ScramSecret::mock(&state.mock_key, &format!("{database}\0{user}"));
    let real = login.as_ref().and_then(|l| ScramSecret::parse(&l.verifier));
    let credential = match real {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: mock(),
            is_mock: true,
        },
    };
    let attempt = arm(attempt);
    let result = authenticate_by_method(stream, user, method, credential, mock(), proof).await;
    end_attempt(state, attempt, &result);
    let owed = result?;
    let record = record.ok_or_else(|| {
        LoginError::Auth(AuthError::Failed {
            user: user.to_owned(),
        })
    })?;
    Ok((record, owed))
}

/// Asks the failed-login throttle whether this attempt may go on, and waits out its delay
/// (an async sleep in this client's task, with its login slot given back: nobody else
/// waits). Before any registry lookup or SCRAM work, so a locked-out source costs us almost
/// nothing.
async fn begin_attempt(
    state: &State,
    source: Option<IpAddr>,
    target: Target<'_>,
    slot: &mut LoginSlot,
) -> Result<Option<auth::throttle::Attempt>, LoginError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let attempt = state.throttle.begin(source, target).await?;
    if !attempt.delay.is_zero() {
        tracing::debug!(
            delay_ms = attempt.delay.as_millis(),
            "login attempt delayed"
        );
        if let Err(full) = slot.sleep_without(attempt.delay).await {
            // Nothing was tried: the attempt neither failed nor succeeded.
            LoginThrottle::refund(attempt);
            return Err(full.into());
        }
    }
    Ok(Some(attempt))
}

/// The exchange starts: an attempt dropped from here on without a report (the login timed
/// out) counts as a failure.
fn arm(attempt: Option<auth::throttle::Attempt>) -> Option<auth::throttle::Attempt> {
    attempt.map(|mut attempt| {
        attempt.arm();
        attempt
    })
}

/// Tells the throttle how the exchange ended.
fn end_attempt<T>(
    state: &State,
    attempt: Option<auth::throttle::Attempt>,
    result: &Result<T, AuthError>,
) {
    let Some(attempt) = attempt else {
        return;
    };
    match result {
        Ok(_) => state.throttle.succeeded(attempt),
        // Nothing was tried: psql, for one, hangs up to prompt for a password. A client that
        // leaves after reading the salt is `Abandoned`, a failure.
        Err(AuthError::ClientLeft) => LoginThrottle::refund(attempt),
        Err(_) => LoginThrottle::failed(attempt),
    }
}
