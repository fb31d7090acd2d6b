//! Test harness: one private PostgreSQL cluster for the whole test binary (started on first
//! use, stopped by its watchdog when the binary exits), private clusters by name for the tests
//! that reconfigure their server, and per test a fresh registry database and a fresh proxy on
//! a free port. Helpers create tenants and users through the same provisioning code the CLI
//! uses, and connect through the proxy with tokio-postgres. Every other helper the areas share
//! lives in a module here, one concept each.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "not every helper is used by every area"
)]

pub mod activity;
pub mod certs;
pub mod forward;
pub mod psql;
pub mod query;
pub mod serve;
pub mod wire;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tenantgate::config::Config;
use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::provision::{self, CreateTenant};
use tenantgate::registry::{Registry, TenantRecord, TenantSlug};
use tenantgate::server::Proxy;
use tokio_postgres::NoTls;

static CLUSTER: OnceLock<LocalPg> = OnceLock::new();
static NAMED: OnceLock<Mutex<HashMap<&'static str, &'static LocalPg>>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cluster every test shares. Tests must not change its configuration (pg_hba.conf lines
/// for their own roles aside): a test that does takes a `named_cluster`.
pub fn cluster() -> &'static LocalPg {
    CLUSTER.get_or_init(start_cluster)
}

/// A cluster of its own for the tests that name it (e.g. one that turns on `ssl` and makes
/// pg_hba.conf demand TLS), started on first use and kept for the binary's life.
pub fn named_cluster(name: &'static str) -> &'static LocalPg {
    let clusters = NAMED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut clusters = clusters
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    clusters
        .entry(name)
        .or_insert_with(|| Box::leak(Box::new(start_cluster())))
}

fn start_cluster() -> LocalPg {
    let base = std::env::temp_dir();
    remove_stale_dirs(&base);
    let dir = base.join(format!(
        "tenantgate-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut options = LocalPgOptions::new(dir.join("pgdata"));
    options.max_connections = 400;
    LocalPg::start(options).expect("start the test PostgreSQL cluster")
}

/// Removes data directories left by earlier test runs whose process is gone.
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tenantgate-test-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !Path::new("/proc").join(pid).exists() {
            drop(std::fs::remove_dir_all(entry.path()));
        }
    }
}

/// A free loopback port (bound, then released).
/// Runs the cluster's `pgbench` with `args`: (succeeded, stdout, stderr).
pub fn pgbench<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = std::process::Command::new(cluster().bindir().join("pgbench"))
        .args(args)
        .output()
        .expect("run pgbench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// A unique name for this process: `prefix` plus a counter.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Connects directly to the cluster as the superuser.
pub async fn admin_client(dbname: &str) -> tokio_postgres::Client {
    admin_client_on(cluster(), dbname).await
}

/// Connects directly to `pg` as the superuser.
pub async fn admin_client_on(pg: &LocalPg, dbname: &str) -> tokio_postgres::Client {
    connect_str(&pg.connection_string(dbname))
        .await
        .expect("admin connection")
}

pub async fn connect_str(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::from_str(conn)?
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(client)
}

/// One test's world: its own registry database, master key, config and running proxy.
pub struct TestEnv {
    pub config: Config,
    pub registry: Registry,
    pub key: MasterKey,
    pub proxy: Option<Proxy>,
    pub dir: PathBuf,
}

impl TestEnv {
    /// A proxy with default settings.
    pub async fn start() -> TestEnv {
        TestEnv::start_with(|_| {}).await
    }

    /// A proxy whose config `tweak` may change before start.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestEnv {
        TestEnv::start_on(cluster(), tweak).await
    }

    /// A proxy whose registry and `[[server]]` are on `pg` instead of the shared cluster.
    pub async fn start_on(pg: &'static LocalPg, tweak: impl FnOnce(&mut Config)) -> TestEnv {
        // TEST_LOG=tenantgate=debug shows the proxy's log for a failing test.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            drop(
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_test_writer()
                    .try_init(),
            );
        }
        let registry_db = unique("registry_");
        admin_client_on(pg, "postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {registry_db}"))
            .await
            .expect("create registry database");
        let dir = pg
            .data_dir()
            .parent()
            .expect("cluster dir")
            .join(unique("env-"));
        std::fs::create_dir_all(&dir).expect("env dir");
        std::fs::write(dir.join("master.key"), MasterKey::generate_encoded()).expect("key file");
        let text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
shutdown_grace_seconds = 1
log_level = "warn"

[registry]
url = "{registry}"

[secrets]
master_key_env = "TENANTGATE_TEST_KEY_IS_IN_THE_FILE"
master_key_file = "{dir}/master.key"

[pool]
pool_size = 10

[admin]
bootstrap_user = "root"
bootstrap_password = "root-secret"

[[server]]
name = "local"
host = "127.0.0.1"
port = {port}
admin_user = "{user}"
admin_password = "{password}"
"#,
            registry = pg.connection_string(&registry_db),
            dir = dir.display(),
            port = pg.port(),
            user = pg.superuser(),
            password = pg.password(),
        );
        let mut config = Config::parse(&text, "test").expect("test config");
        tweak(&mut config);
        let key = MasterKey::load(&config.secrets).expect("master key");
        let proxy = Proxy::start(config.clone()).await.expect("start proxy");
        let registry = Registry::connect(&config.registry).await.expect("registry");
        TestEnv {
            config,
            registry,
            key,
            proxy: Some(proxy),
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.proxy
            .as_ref()
            .expect("proxy running")
            .local_addr()
            .port()
    }

    /// Provisions a tenant with a unique slug starting with `prefix`.
    pub async fn tenant(&self, prefix: &str) -> TenantRecord {
        let slug = unique(prefix);
        provision::create_tenant(
            self.config.provisioning(),
            &self.registry,
            &self.key,
            &slug,
            &CreateTenant::default(),
        )
        .await
        .expect("create tenant")
    }

    /// A tenant with one user `app` / `secret`.
    pub async fn tenant_with_user(&self, prefix: &str) -> TenantRecord {
        let t = self.tenant(prefix).await;
        self.add_user(t.slug.as_str(), "app", "secret").await;
        t
    }

    pub async fn add_user(&self, slug: &str, user: &str, password: &str) {
        provision::add_user(&self.registry, slug, user, &Secret::new(password))
            .await
            .expect("add user");
    }

    /// tokio-postgres config for a client of `slug` through the proxy.
    pub fn client_config(&self, slug: &str, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port())
            .user(user)
            .password(password)
            .dbname(slug)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// A URI for psql/pgbench.
    pub fn uri(&self, slug: &str, user: &str, password: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{slug}",
            self.port()
        )
    }

    pub async fn connect(
        &self,
        slug: &str,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self
            .client_config(slug, user, password)
            .connect(NoTls)
            .await?;
        tokio::spawn(async move {
            drop(connection.await);
        });
        Ok(client)
    }

    /// Points `slug` in the registry at `target`'s database, with that database's role and
    /// password, as an operator moving a tenant would.
    pub async fn move_tenant(&self, slug: &TenantSlug, target: &TenantRecord) {
        // As an operator does: the password in plain, encrypted again for this tenant's row
        // (a ciphertext copied from another row does not decrypt here).
        let password = self
            .key
            .decrypt(
                &target.backend_password_enc,
                &Binding::backend_password(target.slug.as_str()),
            )
            .expect("the target's backend password");
        let encrypted = self
            .key
            .encrypt(&password, &Binding::backend_password(slug.as_str()));
        self.registry
            .set_target(slug, &target.database, &target.backend_role, &encrypted)
            .await
            .expect("move the tenant in the registry");
    }

    /// The name of this proxy's registry database.
    pub fn registry_database(&self) -> String {
        let parsed: tokio_postgres::Config =
            self.config.registry.url.parse().expect("registry url");
        parsed.get_dbname().expect("registry dbname").to_owned()
    }

    /// Connects to the admin console as the bootstrap admin.
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.connect(&self.config.admin.database, "root", "root-secret")
            .await
            .expect("connect to the admin console")
    }

    /// Connects as `app`/`secret`.
    pub async fn app(&self, slug: &str) -> tokio_postgres::Client {
        self.connect(slug, "app", "secret")
            .await
            .expect("connect through the proxy")
    }

    /// Stops the proxy.
    pub async fn stop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// A tracing writer that appends the log to a shared buffer, for tests that read it.
pub struct LogWriter(pub std::sync::Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(timeout, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `check` until it returns something, and returns that (e.g. the client that finally
/// saw a change, to go on using it); None if `timeout` passes first.
pub async fn eventually_some<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (10 s at most) until `n` clients of `slug` wait for a backend, as the admin
/// console's `pools` table (`SHOW POOLS`) reports it; `admin` is a console session.
pub async fn until_waiting(admin: &tokio_postgres::Client, slug: &str, n: i64) {
    let seen = eventually(Duration::from_secs(10), || async {
        admin
            .query_one("SELECT waiting FROM pools WHERE tenant = $1", &[&slug])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == n)
    })
    .await;
    assert!(seen, "{n} clients of {slug} never waited for a backend");
}

/// A TCP connection to `env`'s proxy from `source`, a loopback address (Linux answers all of
/// 127.0.0.0/8 without setup): how a test plays several client hosts.
pub async fn connect_from(env: &TestEnv, source: std::net::Ipv4Addr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], env.port())))
        .await
        .unwrap()
}

/// Logs in as `user` of `database` with `password` from `source` (see [`connect_from`]).
pub async fn login_from(
    env: &TestEnv,
    source: std::net::Ipv4Addr,
    database: &str,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    login_over(
        env,
        connect_from(env, source).await,
        database,
        user,
        password,
    )
    .await
}

/// Logs in as `user` of `database` with `password` over `stream`, a connection to `env`'s
/// proxy that may already carry bytes of its own (a PROXY protocol header).
pub async fn login_over(
    env: &TestEnv,
    stream: tokio::net::TcpStream,
    database: &str,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = env
        .client_config(database, user, password)
        .connect_raw(stream, NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}
