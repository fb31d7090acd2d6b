//! Errors of the admin console and their SQLSTATEs, in one place. An admin is an operator:
//! messages say what failed and why (a provisioning error names the step and PostgreSQL's
//! message), but never a secret. Every match names every variant (no catch-all arm), so a new
//! error cannot silently get another's SQLSTATE, kind, message or hint.

use crate::auth::PasswordError;
use crate::error::{ClientFacing, ErrorKind};
use crate::pool::OverrideError;
use crate::protocol::SqlState;
use crate::provision::ProvisionError;
use crate::registry::RegistryError;
use crate::rekey::RekeyError;

/// What the console supports, listed in the hint of an unsupported command.
pub(super) const SUPPORTED: &str = "supported: SHOW HELP|TENANTS|TENANT slug|POOLS|CLIENTS|SERVERS|STATS|CONFIG|\
VERSION|ACTIVITY [slug]|MIGRATIONS [slug]|INSTANCES; SELECT ... FROM tenants|pools|clients|servers|stats|\
activity|migrations|config|domains|plans|instances; CREATE TENANT; REGISTER TENANT; CREATE|ALTER|DROP USER ... FOR \
TENANT [PASSWORD '...'] [AUTH scram|cert|cert+scram]; CREATE|ALTER ADMIN USER; ALTER TENANT slug \
ADD|DROP DOMAIN 'name'; ALTER TENANT slug SET PLAN 'name' | SET (key = value, ...) | RESET (key, ...) | \
RESET ALL; SHOW PLANS; SHOW DOMAINS [slug]; SUSPEND|RESUME|DROP TENANT; MIGRATE TENANT slug; \
MIGRATE ALL TENANTS; KILL slug; PAUSE|RESUME [slug]; RELOAD; ROTATE MASTER KEY; RETIRE OLD MASTER KEYS";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("unsupported admin command: {0}")]
    Unsupported(String),
    #[error("table \"{0}\" does not exist")]
    NoSuchTable(String),
    #[error("column \"{0}\" does not exist")]
    NoSuchColumn(String),
    #[error("{0}")]
    BadValue(String),
    #[error("there is no parameter ${0}")]
    MissingParameter(usize),
    #[error("tenant \"{0}\" does not exist")]
    NoSuchTenant(String),
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    Duplicate(String),
    /// A plan name that is neither in the config nor the default plan.
    #[error("plan \"{plan}\" does not exist (plans: {known})")]
    UnknownPlan { plan: String, known: String },
    /// A plan setting or value ALTER TENANT ... SET/RESET refused.
    #[error(transparent)]
    Override(#[from] OverrideError),
    /// A password given to CREATE/ALTER (ADMIN) USER that cannot be stored (a malformed
    /// SCRAM verifier, an md5 hash).
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Rekey(#[from] RekeyError),
}

impl ClientFacing for AdminError {
    fn sqlstate(&self) -> SqlState {
        match self {
            AdminError::Syntax(_) => SqlState::SYNTAX_ERROR,
            AdminError::Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            AdminError::NoSuchTable(_) => SqlState::UNDEFINED_TABLE,
            AdminError::NoSuchColumn(_) => SqlState::UNDEFINED_COLUMN,
            AdminError::BadValue(_) | AdminError::MissingParameter(_) => {
                SqlState::INVALID_PARAMETER_VALUE
            }
            AdminError::NoSuchTenant(_) => SqlState::UNDEFINED_OBJECT,
            AdminError::WrongState(_) => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            AdminError::Duplicate(_) => SqlState::DUPLICATE_OBJECT,
            AdminError::UnknownPlan { .. }
            | AdminError::Password(_)
            | AdminError::Override(
                OverrideError::UnknownKey(_)
                | OverrideError::OutOfRange { .. }
                | OverrideError::BadMode(_),
            ) => SqlState::INVALID_PARAMETER_VALUE,
            AdminError::Override(OverrideError::NotANumber { .. }) => {
                SqlState::INVALID_TEXT_REPRESENTATION
            }
            AdminError::Provision(e) => e.sqlstate(),
            AdminError::Registry(e) => e.sqlstate(),
            AdminError::Rekey(e) => match e {
                RekeyError::EnvSource { .. }
                | RekeyError::NoKeyFile
                | RekeyError::NotCurrent { .. }
                | RekeyError::Undecryptable { .. } => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                RekeyError::Crypto(_) => SqlState::INTERNAL_ERROR,
                RekeyError::Registry(r) => r.sqlstate(),
            },
        }
    }

    fn client_message(&self) -> String {
        match self {
            AdminError::Provision(e) => with_causes(e),
            AdminError::Registry(e) | AdminError::Rekey(RekeyError::Registry(e)) => {
                e.client_message()
            }
            AdminError::Syntax(_)
            | AdminError::Unsupported(_)
            | AdminError::NoSuchTable(_)
            | AdminError::NoSuchColumn(_)
            | AdminError::BadValue(_)
            | AdminError::MissingParameter(_)
            | AdminError::NoSuchTenant(_)
            | AdminError::WrongState(_)
            | AdminError::Duplicate(_)
            | AdminError::UnknownPlan { .. }
            | AdminError::Override(_)
            | AdminError::Password(_)
            | AdminError::Rekey(
                RekeyError::EnvSource { .. }
                | RekeyError::NoKeyFile
                | RekeyError::NotCurrent { .. }
                | RekeyError::Undecryptable { .. }
                | RekeyError::Crypto(_),
            ) => self.to_string(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            AdminError::Provision(e) => e.kind(),
            AdminError::Registry(_) | AdminError::Rekey(RekeyError::Registry(_)) => {
                ErrorKind::Registry
            }
            AdminError::Rekey(RekeyError::Crypto(_)) => ErrorKind::Internal,
            AdminError::Syntax(_)
            | AdminError::Unsupported(_)
            | AdminError::NoSuchTable(_)
            | AdminError::NoSuchColumn(_)
            | AdminError::BadValue(_)
            | AdminError::MissingParameter(_)
            | AdminError::NoSuchTenant(_)
            | AdminError::WrongState(_)
            | AdminError::Duplicate(_)
            | AdminError::UnknownPlan { .. }
            | AdminError::Override(_)
            | AdminError::Password(_)
            | AdminError::Rekey(
                RekeyError::EnvSource { .. }
                | RekeyError::NoKeyFile
                | RekeyError::NotCurrent { .. }
                | RekeyError::Undecryptable { .. },
            ) => ErrorKind::Client,
        }
    }
}

impl AdminError {
    /// The hint sent with the error, if any.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            AdminError::Unsupported(_) | AdminError::NoSuchTable(_) => Some(SUPPORTED),
            AdminError::Syntax(_)
            | AdminError::NoSuchColumn(_)
            | AdminError::BadValue(_)
            | AdminError::MissingParameter(_)
            | AdminError::NoSuchTenant(_)
            | AdminError::WrongState(_)
            | AdminError::Duplicate(_)
            | AdminError::UnknownPlan { .. }
            | AdminError::Override(_)
            | AdminError::Password(_)
            | AdminError::Provision(_)
            | AdminError::Registry(_)
            | AdminError::Rekey(_) => None,
        }
    }
}

/// The error with its causes (PostgreSQL's own message included): an operator needs to know
/// why `CREATE ROLE` failed, not only that it did. Registry trouble keeps its short message.
fn with_causes(e: &ProvisionError) -> String {
    if let ProvisionError::Registry(r) = e {
        return r.client_message();
    }
    crate::provision::error_chain(e)
}
