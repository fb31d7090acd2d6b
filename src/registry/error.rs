//! What can go wrong talking to the registry, and what a client is told about it: always the
//! same 57P03 sentence, never a registry host, query or error text. This module must not log
//! (callers do, with the full cause chain).

use super::connections::SharedError;
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry connection string is invalid")]
    BadUrl(#[source] tokio_postgres::Error),
    #[error("registry query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("registry unavailable")]
    Unavailable(#[source] bb8::RunError<SharedError>),
    #[error("connecting to the registry failed")]
    ConnectFailed(#[source] SharedError),
    #[error("registry row for tenant {slug} is invalid: {what}")]
    BadRow { slug: String, what: String },
    #[error("registry migration {version} ({name}) was changed after it was applied")]
    MigrationChanged { version: i32, name: String },
    /// Internal to the cache: the slug is not in the registry. Never shown to a client.
    #[error("no such tenant")]
    NoSuchTenant,
    /// A lookup error shared by every caller that waited on the same cache load.
    #[error(transparent)]
    Shared(std::sync::Arc<RegistryError>),
}

impl ClientFacing for RegistryError {
    fn sqlstate(&self) -> SqlState {
        match self {
            RegistryError::BadUrl(_)
            | RegistryError::Query(_)
            | RegistryError::Unavailable(_)
            | RegistryError::ConnectFailed(_)
            | RegistryError::BadRow { .. }
            | RegistryError::MigrationChanged { .. }
            | RegistryError::NoSuchTenant
            | RegistryError::Shared(_) => SqlState::CANNOT_CONNECT_NOW,
        }
    }

    fn client_message(&self) -> String {
        match self {
            RegistryError::BadUrl(_)
            | RegistryError::Query(_)
            | RegistryError::Unavailable(_)
            | RegistryError::ConnectFailed(_)
            | RegistryError::BadRow { .. }
            | RegistryError::MigrationChanged { .. }
            | RegistryError::NoSuchTenant
            | RegistryError::Shared(_) => {
                "the tenant registry is not available; try again shortly".to_owned()
            }
        }
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Registry
    }
}

impl From<bb8::RunError<SharedError>> for RegistryError {
    fn from(e: bb8::RunError<SharedError>) -> Self {
        RegistryError::Unavailable(e)
    }
}
