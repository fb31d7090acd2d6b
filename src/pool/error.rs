//! Why a checkout failed, and what a client is told: the pool's errors and their SQLSTATEs in
//! one place. It decides nothing about pools.

use std::sync::Arc;
use std::time::Duration;

use super::BackendError;
use crate::crypto::CryptoError;
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;
use crate::registry::TenantSlug;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("tenant {slug} names server {server:?}, which is not in the config")]
    UnknownServer { slug: TenantSlug, server: String },
    #[error("tenant {slug}'s backend password cannot be decrypted")]
    Secret {
        slug: TenantSlug,
        #[source]
        source: CryptoError,
    },
    #[error("no backend connection for tenant {slug} within {waited:?}")]
    CheckoutTimeout { slug: TenantSlug, waited: Duration },
    #[error("tenant {slug} has its {limit} client connections already")]
    TooManyClients { slug: TenantSlug, limit: u32 },
    /// A pool-building error shared by every client that waited on the same build.
    #[error(transparent)]
    Shared(Arc<PoolError>),
    #[error("backend connection for tenant {slug} failed")]
    Backend {
        slug: TenantSlug,
        #[source]
        source: Arc<BackendError>,
    },
}

impl ClientFacing for PoolError {
    fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::UnknownServer { .. } | PoolError::Secret { .. } => {
                SqlState::CANNOT_CONNECT_NOW
            }
            PoolError::CheckoutTimeout { .. } | PoolError::TooManyClients { .. } => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            PoolError::Backend { source, .. } => source.sqlstate(),
            PoolError::Shared(inner) => inner.sqlstate(),
        }
    }

    fn client_message(&self) -> String {
        match self {
            PoolError::UnknownServer { slug, .. } | PoolError::Secret { slug, .. } => {
                format!("tenant \"{slug}\" is misconfigured in tenantgate; ask the operator")
            }
            PoolError::CheckoutTimeout { slug, waited } => format!(
                "no backend connection for tenant \"{slug}\" became free within {} ms (pool is full)",
                waited.as_millis()
            ),
            PoolError::TooManyClients { slug, limit } => {
                format!("sorry, too many clients already for tenant \"{slug}\" (limit {limit})")
            }
            PoolError::Backend { source, .. } => source.client_message(),
            PoolError::Shared(inner) => inner.client_message(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::UnknownServer { .. } | PoolError::Secret { .. } => ErrorKind::Internal,
            PoolError::CheckoutTimeout { .. } | PoolError::TooManyClients { .. } => {
                ErrorKind::Limit
            }
            PoolError::Backend { .. } => ErrorKind::Backend,
            PoolError::Shared(inner) => inner.kind(),
        }
    }
}
