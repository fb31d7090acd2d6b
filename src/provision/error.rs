//! [`ProvisionError`]: what can go wrong while provisioning, migrating or dropping a tenant,
//! worded for the operator who asked, and how it maps to a SQLSTATE for the admin console.
//! It must not carry secrets (passwords never appear in a variant).

use crate::crypto::CryptoError;
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;
use crate::registry::{RegistryError, TenantSlug, TenantState};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "{0:?} is not a valid tenant slug: use 1 to 63 lowercase letters, digits and hyphens, not starting with a hyphen"
    )]
    BadSlug(String),
    #[error(
        "{0:?} is the admin console's database name ([admin] database): clients asking for it reach the console, never a tenant"
    )]
    ReservedSlug(String),
    #[error(
        "database name {0:?} is longer than PostgreSQL's 63 bytes: use a shorter slug or database_pattern"
    )]
    NameTooLong(String),
    #[error("tenant {0} already exists")]
    Exists(TenantSlug),
    #[error("tenant {0} does not exist")]
    NoSuchTenant(TenantSlug),
    #[error("tenant {0} is already deleted")]
    AlreadyDeleted(TenantSlug),
    #[error(
        "tenant {slug} is {from}: only active and suspended tenants can be suspended or resumed (not made {to})"
    )]
    StateChange {
        slug: TenantSlug,
        from: TenantState,
        to: TenantState,
    },
    #[error("tenant {slug} is {state}: only active and suspended tenants are migrated")]
    NotMigratable {
        slug: TenantSlug,
        state: TenantState,
    },
    #[error("server {0:?} is not in the config")]
    UnknownServer(String),
    #[error("no password for server {0:?}: set admin_password or admin_password_env")]
    NoServerPassword(String),
    #[error(
        "backend server {server}: no connection free in its budget of {max} (max_connections) after waiting {waited_ms} ms"
    )]
    BudgetExhausted {
        server: String,
        max: u32,
        waited_ms: u64,
    },
    #[error("backend server {server}: {what}")]
    Backend {
        server: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("backend server {server}: {source}")]
    BackendTls {
        server: String,
        #[source]
        source: crate::pool::BackendTlsSetupError,
    },
    #[error("the tenant's database cannot be reached with the given role and password")]
    CannotConnect(#[source] tokio_postgres::Error),
    #[error("tenant {slug}: its backend password cannot be decrypted with this master key")]
    Decrypt {
        slug: TenantSlug,
        #[source]
        source: CryptoError,
    },
    #[error("user name must not be empty")]
    EmptyUser,
    #[error("role {role} has {attribute}: a tenant's role must reach only its own database")]
    PowerfulRole {
        role: String,
        attribute: &'static str,
    },
    #[error("database {database} on server {server} already belongs to tenant {owner}")]
    DatabaseTaken {
        database: String,
        server: String,
        owner: TenantSlug,
    },
    #[error("user name {0:?} is longer than PostgreSQL's 63 bytes")]
    UserNameTooLong(String),
    /// A verifier given for a user (e.g. copied from `pg_authid`) is not a valid one.
    #[error("the verifier given for user {user:?} is not a SCRAM-SHA-256 verifier: {reason}")]
    BadVerifier {
        user: String,
        reason: crate::auth::VerifierError,
    },
    /// The server's admin role may not read `pg_authid` (`user import --from-server`).
    #[error(
        "server {server}: its admin_user {role} may not read pg_authid (a superuser can); nothing imported"
    )]
    CannotReadAuthid { server: String, role: String },
    /// Some of the roles to import cannot be; nothing was.
    #[error("nothing imported: {0}")]
    NotImported(super::ImportProblems),
    #[error("tenant {slug} has no user {user:?}")]
    NoSuchUser { slug: TenantSlug, user: String },
    #[error("cannot read the tenant migrations directory {dir}")]
    MigrationsDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    MigrationFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "migration file {file:?} is not named NNNN_name.sql (a version number, an underscore, a name)"
    )]
    BadMigrationName { file: String },
    #[error("migration files {first} and {second} have the same version {version}")]
    DuplicateMigration {
        version: i32,
        first: String,
        second: String,
    },
    #[error(
        "tenant {slug}: migration {file} was changed after it was applied (checksum recorded {recorded}, file now {current}); nothing was applied"
    )]
    ChecksumMismatch {
        slug: TenantSlug,
        file: String,
        recorded: String,
        current: String,
    },
    #[error(
        "tenant {slug}: migration {version} ({name}) was applied but its file is missing from {dir}; nothing was applied"
    )]
    MigrationMissing {
        slug: TenantSlug,
        version: i32,
        name: String,
        dir: String,
    },
    #[error("tenant {slug}: migration {file} failed: {message}")]
    MigrationFailed {
        slug: TenantSlug,
        file: String,
        message: String,
    },
    #[error(
        "tenant {slug}: migration {file} was applied but recording it in the registry failed; record it by hand or the next run applies it again"
    )]
    NotRecorded {
        slug: TenantSlug,
        file: String,
        #[source]
        source: RegistryError,
    },
    #[error("cannot read the seed file {path}")]
    SeedFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tenant {slug}: seed file {file} failed: {message}")]
    SeedFailed {
        slug: TenantSlug,
        file: String,
        message: String,
    },
    #[error(
        "tenant {slug} is marked deleted, but dropping database {database} and role {role} failed; drop them by hand"
    )]
    DropFailed {
        slug: TenantSlug,
        database: String,
        role: String,
        #[source]
        source: Box<ProvisionError>,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// An error and its causes on one line, for the registry's `error_message` and the log.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The admin console's client is the operator who asked: every message names the tenant, file
/// or server involved (never a host, a password or an I/O error's text, which stay in the
/// source chain for the log).
impl ClientFacing for ProvisionError {
    fn sqlstate(&self) -> SqlState {
        match self {
            ProvisionError::ReservedSlug(_) => SqlState::RESERVED_NAME,
            ProvisionError::BadSlug(_)
            | ProvisionError::NameTooLong(_)
            | ProvisionError::UnknownServer(_)
            | ProvisionError::EmptyUser
            | ProvisionError::BadVerifier { .. }
            | ProvisionError::NotImported(_)
            | ProvisionError::PowerfulRole { .. } => SqlState::INVALID_PARAMETER_VALUE,
            ProvisionError::CannotReadAuthid { .. } => SqlState::INSUFFICIENT_PRIVILEGE,
            ProvisionError::UserNameTooLong(_) => SqlState::NAME_TOO_LONG,
            ProvisionError::Exists(_) | ProvisionError::DatabaseTaken { .. } => {
                SqlState::DUPLICATE_OBJECT
            }
            ProvisionError::NoSuchTenant(_) | ProvisionError::NoSuchUser { .. } => {
                SqlState::UNDEFINED_OBJECT
            }
            ProvisionError::AlreadyDeleted(_)
            | ProvisionError::NotMigratable { .. }
            | ProvisionError::StateChange { .. }
            | ProvisionError::NoServerPassword(_)
            | ProvisionError::ChecksumMismatch { .. }
            | ProvisionError::MigrationMissing { .. } => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            ProvisionError::BudgetExhausted { .. } => SqlState::TOO_MANY_CONNECTIONS,
            ProvisionError::Backend { .. }
            | ProvisionError::CannotConnect(_)
            | ProvisionError::BackendTls { .. } => SqlState::CONNECTION_FAILURE,
            ProvisionError::Decrypt { .. }
            | ProvisionError::MigrationsDir { .. }
            | ProvisionError::MigrationFile { .. }
            | ProvisionError::BadMigrationName { .. }
            | ProvisionError::DuplicateMigration { .. }
            | ProvisionError::MigrationFailed { .. }
            | ProvisionError::NotRecorded { .. }
            | ProvisionError::SeedFile { .. }
            | ProvisionError::SeedFailed { .. }
            | ProvisionError::DropFailed { .. } => SqlState::INTERNAL_ERROR,
            ProvisionError::Registry(e) => e.sqlstate(),
        }
    }

    fn client_message(&self) -> String {
        match self {
            ProvisionError::Registry(e) => e.client_message(),
            ProvisionError::BadSlug(_)
            | ProvisionError::ReservedSlug(_)
            | ProvisionError::NameTooLong(_)
            | ProvisionError::Exists(_)
            | ProvisionError::NoSuchTenant(_)
            | ProvisionError::AlreadyDeleted(_)
            | ProvisionError::NotMigratable { .. }
            | ProvisionError::StateChange { .. }
            | ProvisionError::UnknownServer(_)
            | ProvisionError::NoServerPassword(_)
            | ProvisionError::BudgetExhausted { .. }
            | ProvisionError::Backend { .. }
            | ProvisionError::BackendTls { .. }
            | ProvisionError::CannotConnect(_)
            | ProvisionError::Decrypt { .. }
            | ProvisionError::EmptyUser
            | ProvisionError::UserNameTooLong(_)
            | ProvisionError::BadVerifier { .. }
            | ProvisionError::CannotReadAuthid { .. }
            | ProvisionError::NotImported(_)
            | ProvisionError::PowerfulRole { .. }
            | ProvisionError::DatabaseTaken { .. }
            | ProvisionError::NoSuchUser { .. }
            | ProvisionError::MigrationsDir { .. }
            | ProvisionError::MigrationFile { .. }
            | ProvisionError::BadMigrationName { .. }
            | ProvisionError::DuplicateMigration { .. }
            | ProvisionError::ChecksumMismatch { .. }
            | ProvisionError::MigrationMissing { .. }
            | ProvisionError::MigrationFailed { .. }
            | ProvisionError::NotRecorded { .. }
            | ProvisionError::SeedFile { .. }
            | ProvisionError::SeedFailed { .. }
            | ProvisionError::DropFailed { .. } => self.to_string(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            ProvisionError::BadSlug(_)
            | ProvisionError::ReservedSlug(_)
            | ProvisionError::NameTooLong(_)
            | ProvisionError::Exists(_)
            | ProvisionError::NoSuchTenant(_)
            | ProvisionError::AlreadyDeleted(_)
            | ProvisionError::NotMigratable { .. }
            | ProvisionError::StateChange { .. }
            | ProvisionError::UnknownServer(_)
            | ProvisionError::EmptyUser
            | ProvisionError::UserNameTooLong(_)
            | ProvisionError::BadVerifier { .. }
            | ProvisionError::CannotReadAuthid { .. }
            | ProvisionError::NotImported(_)
            | ProvisionError::PowerfulRole { .. }
            | ProvisionError::DatabaseTaken { .. }
            | ProvisionError::NoSuchUser { .. } => ErrorKind::Client,
            ProvisionError::BudgetExhausted { .. } => ErrorKind::Limit,
            ProvisionError::Backend { .. }
            | ProvisionError::CannotConnect(_)
            | ProvisionError::MigrationFailed { .. }
            | ProvisionError::SeedFailed { .. }
            | ProvisionError::DropFailed { .. } => ErrorKind::Backend,
            ProvisionError::NoServerPassword(_)
            | ProvisionError::BackendTls { .. }
            | ProvisionError::Decrypt { .. }
            | ProvisionError::MigrationsDir { .. }
            | ProvisionError::MigrationFile { .. }
            | ProvisionError::BadMigrationName { .. }
            | ProvisionError::DuplicateMigration { .. }
            | ProvisionError::ChecksumMismatch { .. }
            | ProvisionError::MigrationMissing { .. }
            | ProvisionError::NotRecorded { .. }
            | ProvisionError::SeedFile { .. } => ErrorKind::Internal,
            ProvisionError::Registry(e) => e.kind(),
        }
    }
}
