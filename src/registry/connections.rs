//! The registry's connection pool: bb8 over tokio-postgres, testing each connection on
//! check-out so one the registry closed while it sat idle (a restart, an idle-session kill) is
//! dropped and replaced, never used.
//!
//! bb8 does not return connect errors from `get`: a caller would wait out the whole timeout
//! while the registry is down. So [`RegistryManager`] broadcasts its own connect failures and
//! [`connection`] fails the callers waiting at once. Only those: when a pooled connection fails
//! its check-out test, bb8 drops it and goes on to another or a new one, and that error (like
//! every error bb8 reports) goes to [`LogErrors`], which only logs. Issue 11: both used to go to
//! one sink that failed every waiter, so after a registry restart clients were refused while
//! bb8 was already opening fresh connections.

use std::sync::Arc;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio::sync::broadcast;
use tokio_postgres::NoTls;

use super::RegistryError;

/// A registry connection's error, shared: the callers waiting for a connection and bb8's
/// sink (which logs it) both get it.
pub(super) type SharedError = Arc<tokio_postgres::Error>;

pub(super) type RegistryConn<'a> = bb8::PooledConnection<'a, RegistryManager>;

/// The pool and the channel its connect failures are announced on.
#[derive(Clone)]
pub(super) struct RegistryPool {
    pool: bb8::Pool<RegistryManager>,
    connect_failures: broadcast::Sender<SharedError>,
}

impl RegistryPool {
    /// Up to `size` connections, opened lazily; `timeout` bounds a wait for one.
    pub(super) async fn new(
        config: tokio_postgres::Config,
        size: u32,
        timeout: Duration,
    ) -> Result<RegistryPool, RegistryError> {
        let connect_failures = broadcast::channel(4).0;
        let manager = RegistryManager {
            inner: PostgresConnectionManager::new(config, NoTls),
            connect_failures: connect_failures.clone(),
        };
        let pool = bb8::Pool::builder()
            .error_sink(Box::new(LogErrors))
            .max_size(size.max(1))
            .min_idle(Some(0))
            .test_on_check_out(true)
            .connection_timeout(timeout)
            .retry_connection(false)
            .build(manager)
            .await
            .map_err(RegistryError::ConnectFailed)?;
        Ok(RegistryPool {
            pool,
            connect_failures,
        })
    }

    /// A live registry connection, or the reason none can be had: bb8's timeout, or the
    /// failure of a connect attempt made while this caller waited (the registry is down:
    /// fail now, not after the timeout).
    pub(super) async fn get(&self) -> Result<RegistryConn<'_>, RegistryError> {
        let mut failures = self.connect_failures.subscribe();
        tokio::select! {
            biased;
            conn = self.pool.get() => Ok(conn?),
            Ok(e) = failures.recv() => Err(RegistryError::ConnectFailed(e)),
        }
    }
}

/// Opens registry connections and tells the waiting callers when opening one fails.
pub(super) struct RegistryManager {
    inner: PostgresConnectionManager<NoTls>,
    connect_failures: broadcast::Sender<SharedError>,
}

impl bb8::ManageConnection for RegistryManager {
    type Connection = tokio_postgres::Client;
    type Error = SharedError;

    async fn connect(&self) -> Result<tokio_postgres::Client, SharedError> {
        self.inner.connect().await.map_err(|e| {
            let e = Arc::new(e);
            // Nobody waiting is fine.
            drop(self.connect_failures.send(Arc::clone(&e)));
            e
        })
    }

    async fn is_valid(&self, conn: &mut tokio_postgres::Client) -> Result<(), SharedError> {
        self.inner.is_valid(conn).await.map_err(Arc::new)
    }

    fn has_broken(&self, conn: &mut tokio_postgres::Client) -> bool {
        // The connection task ended: the server closed it or the socket broke.
        conn.is_closed()
    }
}

/// bb8's error sink: connect failures and connections that failed their check-out test. It
/// only logs; waiters learn of connect failures from [`RegistryManager`].
#[derive(Debug, Clone, Copy)]
struct LogErrors;

impl bb8::ErrorSink<SharedError> for LogErrors {
    fn sink(&self, error: SharedError) {
        // Either a connect that failed or a pooled connection found closed (bb8 replaces it).
        tracing::warn!(error = %error, "registry connection failed or found closed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<SharedError>> {
        Box::new(*self)
    }
}
