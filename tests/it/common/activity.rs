//! What the server says its sessions are doing (`pg_stat_activity`), and what a superuser does
//! to them: count a database's backends, sample their peak under load, wait until a query is
//! running (and cancel it then), terminate backends, and lock a database out and let it in.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tenantgate::localpg::LocalPg;

use super::{admin_client, connect_str, eventually};

/// Backend connections the shared cluster has open to a database.
pub async fn backend_count(database: &str) -> i64 {
    connections_to(&[database.to_owned()]).await
}

/// Which rows of `pg_stat_activity` are connections, to any of the databases in `$1`: client
/// backends only. Autovacuum workers (and parallel workers) show the database they work in
/// too, and a busy tenant database gets an autovacuum worker now and then: counting those as
/// the proxy's connections made a pool of 5 "peak at 6". (A backend the proxy closed still
/// counts until it exits, as it should: the proxy keeps its pool slot until the server closes
/// the socket, which comes after the row has gone.)
const CONNECTIONS_TO: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = ANY($1) AND backend_type = 'client backend'";

/// Backend connections (client backends) the shared cluster has open to any of `databases`.
pub async fn connections_to(databases: &[String]) -> i64 {
    admin_client("postgres")
        .await
        .query_one(CONNECTIONS_TO, &[&databases])
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Rows of `pg`'s `pg_stat_activity` matching the SQL condition `filter`.
pub async fn activity_on(pg: &LocalPg, filter: &str) -> i64 {
    connect_str(&pg.connection_string("postgres"))
        .await
        .expect("direct connection")
        .query_one(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}"),
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Polls `pg` until `n` sessions in `databases` are running exactly `query` (state `active`);
/// false if that does not happen within 10 s.
pub async fn until_running(pg: &LocalPg, databases: &[&str], query: &str, n: i64) -> bool {
    let direct = connect_str(&pg.connection_string("postgres"))
        .await
        .expect("direct connection");
    eventually(Duration::from_secs(10), || async {
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND query = $1 AND datname = ANY($2)",
                &[&query, &databases],
            )
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == n)
    })
    .await
}

/// Runs `SELECT pg_sleep(30)` on `client` in the background, waits until the shared cluster
/// shows it running in `database`, cancels it with the client's cancel token, and returns the
/// client with what the query ended in (which must come within 10 s of the cancel).
pub async fn cancel_a_running_sleep(
    client: tokio_postgres::Client,
    database: &str,
) -> (tokio_postgres::Client, Result<(), tokio_postgres::Error>) {
    const SLEEP: &str = "SELECT pg_sleep(30)";
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = client.batch_execute(SLEEP).await;
        (client, result)
    });
    assert!(
        until_running(super::cluster(), &[database], SLEEP, 1).await,
        "the query to cancel never ran"
    );
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send the cancel");
    tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancel must stop the query")
        .expect("the sleeper task")
}

/// Terminates the shared cluster's sessions in `database` (only those of `role`, if given);
/// returns how many it terminated.
pub async fn terminate_backends(database: &str, role: Option<&str>) -> i64 {
    admin_client("postgres")
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND ($2::text IS NULL OR usename = $2) \
             AND pid <> pg_backend_pid()",
            &[&database, &role],
        )
        .await
        .expect("pg_terminate_backend")
        .get(0)
}

/// Terminates every session in `database` and waits (5 s at most) until none is left.
pub async fn terminate_all_and_wait(database: &str) {
    terminate_backends(database, None).await;
    let gone = eventually(Duration::from_secs(5), || async {
        backend_count(database).await == 0
    })
    .await;
    assert!(
        gone,
        "the terminated backends of {database} are still there"
    );
}

/// Refuses new connections to `database` and terminates those it has (only those whose
/// application_name is `application`, if given).
pub async fn lock_out(database: &str, application: Option<&str>) {
    let admin = admin_client("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
        ))
        .await
        .expect("lock the database out");
    admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND ($2::text IS NULL OR application_name = $2)",
            &[&database, &application],
        )
        .await
        .expect("pg_terminate_backend");
}

/// Lets connections to `database` in again after [`lock_out`].
pub async fn let_in(database: &str) {
    admin_client("postgres")
        .await
        .batch_execute(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .await
        .expect("let the database in");
}

/// Samples, on one direct connection, how many backend connections (client backends) the
/// shared cluster has open to some databases, until stopped or dropped; keeps the peak and the
/// number of samples.
pub struct PeakBackends {
    peak: Arc<AtomicI64>,
    samples: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakBackends {
    /// Starts sampling `databases` every `every`.
    pub async fn start(databases: Vec<String>, every: Duration) -> PeakBackends {
        let direct = admin_client("postgres").await;
        let peak = Arc::new(AtomicI64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let task = {
            let (peak, samples) = (Arc::clone(&peak), Arc::clone(&samples));
            tokio::spawn(async move {
                loop {
                    let n: i64 = direct
                        .query_one(CONNECTIONS_TO, &[&databases])
                        .await
                        .expect("pg_stat_activity")
                        .get(0);
                    peak.fetch_max(n, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(every).await;
                }
            })
        };
        PeakBackends {
            peak,
            samples,
            task,
        }
    }

    /// Stops sampling; returns the peak.
    pub fn stop(&self) -> i64 {
        self.task.abort();
        self.peak.load(Ordering::Relaxed)
    }

    /// How many samples were taken.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }
}

impl Drop for PeakBackends {
    fn drop(&mut self) {
        self.task.abort();
    }
}
