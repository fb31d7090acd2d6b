//! Backend TLS (issue 6): tenantgate's own connections to a backend server with `[[server]]
//! tls` = disable, prefer, require, verify-ca, verify-full. These tests' own cluster runs with
//! `ssl = on` and a certificate for `localhost` (only: so `127.0.0.1` is a host name the
//! certificate does not carry) signed by a CA made here, and its pg_hba accepts tenant roles and
//! the provisioning role only over TLS (`hostnossl ... reject`); only the harness's superuser
//! (registry, setup) may use plaintext. Plaintext fallback of `prefer` is in
//! `backend_auth`, on the shared cluster, which has no TLS.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::activity::until_running;
use common::certs::TestCa;
use common::forward::{Opening, forwarder};
use common::wire::{CANCEL_REQUEST, SSL_REQUEST};
use common::{TestEnv, eventually, unique};
use tenantgate::config::Config;
use tenantgate::crypto::Secret;
use tenantgate::pool::{
    BackendConn, BackendError, BackendTarget, BackendTls, BackendTlsError, BackendTlsMode,
};
use tenantgate::server::Proxy;
use tokio::sync::OnceCell;
use tokio_postgres::error::SqlState;

/// A superuser that may log in over TLS only: provisioning runs as it, so a tenant created
/// proves provisioning went over TLS.
const PROVISIONER: &str = "tg_provisioner";
const PROVISIONER_PASSWORD: &str = "provisioner-secret";

/// Files the proxy reads: the CA that signed the cluster's certificate, and another CA.
struct Cas {
    dir: PathBuf,
}

impl Cas {
    fn right(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn wrong(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }
}

static SETUP: OnceCell<Cas> = OnceCell::const_new();

/// The cluster these tests reconfigure (TLS on, plaintext refused to all but the superuser).
fn cluster() -> &'static tenantgate::localpg::LocalPg {
    common::named_cluster("backend-tls")
}

/// Writes a file in the data directory owned by the server's OS user, mode 0600 (what
/// PostgreSQL demands of a key file).
fn server_write(data_dir: &std::path::Path, name: &str, bytes: &[u8]) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let owner = std::fs::metadata(data_dir).unwrap();
    let path = data_dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
}

/// Once: certificate, key, `ssl = on`, TLS-only pg_hba, the provisioning role.
async fn setup() -> &'static Cas {
    SETUP
        .get_or_init(|| async {
            let pg = cluster();
            let dir = pg
                .data_dir()
                .parent()
                .expect("cluster dir")
                .join("backend-tls");
            std::fs::create_dir_all(&dir).unwrap();
            let ca = TestCa::new("tenantgate backend test CA");
            let other_ca = TestCa::new("some other CA");
            let server = ca.server(&["localhost"]);
            std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
            std::fs::write(dir.join("other-ca.crt"), &other_ca.pem).unwrap();

            let admin = common::admin_client_on(cluster(), "postgres").await;
            let data = pg.data_dir();
            server_write(data, "server.crt", server.cert.as_bytes());
            server_write(data, "server.key", server.key.as_bytes());
            let old = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
            let hba = format!(
                "hostnossl all {superuser} 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all all 127.0.0.1/32 reject\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n{old}",
                superuser = pg.superuser()
            );
            server_write(data, "pg_hba.conf", hba.as_bytes());
            for sql in [
                "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
                "ALTER SYSTEM SET ssl_key_file = 'server.key'",
                "ALTER SYSTEM SET ssl = on",
            ] {
                admin.batch_execute(sql).await.unwrap();
            }
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {PROVISIONER} SUPERUSER LOGIN PASSWORD '{PROVISIONER_PASSWORD}'"
                ))
                .await
                .unwrap();
            let reloaded: bool = admin
                .query_one("SELECT pg_reload_conf()", &[])
                .await
                .unwrap()
                .get(0);
            assert!(reloaded);
            // The postmaster rereads its files asynchronously: wait until new sessions see it.
            assert!(
                eventually(Duration::from_secs(10), || async {
                    let c = common::admin_client_on(cluster(), "postgres").await;
                    let ssl: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
                    ssl == "on"
                })
                .await,
                "the cluster did not turn ssl on"
            );
            Cas { dir }
        })
        .await
}

/// A proxy whose only server uses `tls` (and `ca_file`) at `host`, provisioning as the
/// TLS-only role.
async fn start(tls: BackendTlsMode, ca_file: Option<PathBuf>, host: &str) -> TestEnv {
    setup().await;
    let host = host.to_owned();
    TestEnv::start_on(cluster(), move |c| tweak(c, tls, ca_file, &host)).await
}

fn tweak(config: &mut Config, tls: BackendTlsMode, ca_file: Option<PathBuf>, host: &str) {
    let server = &mut config.servers[0];
    server.tls = tls;
    server.ca_file = ca_file;
    host.clone_into(&mut server.host);
    PROVISIONER.clone_into(&mut server.admin_user);
    server.admin_password = Some(Secret::new(PROVISIONER_PASSWORD));
}

/// Whether the tenant session's backend runs over TLS, as the server sees it.
async fn backend_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn verify_full_reaches_the_tenant_over_tls_and_provisions_over_tls() {
    let cas = setup().await;
    let env = start(BackendTlsMode::VerifyFull, Some(cas.right()), "localhost").await;
    // Provisioning (role, database, migrations as the tenant's role) went over TLS: both
    // roles are refused in plaintext.
    let t = env.tenant_with_user("vf").await;
    let client = env.app(t.slug.as_str()).await;
    assert!(backend_ssl(&client).await);
    assert_eq!(
        client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        t.backend_role
    );
    // CREATE TENANT through the admin console too.
    let admin = env.admin().await;
    let slug = unique("vfadmin");
    admin
        .simple_query(&format!("CREATE TENANT {slug}"))
        .await
        .expect("CREATE TENANT over backend TLS");
    admin
        .simple_query(&format!(
            "CREATE USER app FOR TENANT {slug} PASSWORD 'secret'"
        ))
        .await
        .unwrap();
    let other = env.app(&slug).await;
    assert!(backend_ssl(&other).await);
}

#[tokio::test]
async fn require_and_verify_ca_do_not_check_the_host_name() {
    let cas = setup().await;
    // The certificate names localhost only; 127.0.0.1 is fine without a name check.
    let env = start(BackendTlsMode::Require, None, "127.0.0.1").await;
    let t = env.tenant_with_user("req").await;
    assert!(backend_ssl(&env.app(t.slug.as_str()).await).await);
    drop(env);
    let env = start(BackendTlsMode::VerifyCa, Some(cas.right()), "127.0.0.1").await;
    let t = env.tenant_with_user("vca").await;
    assert!(backend_ssl(&env.app(t.slug.as_str()).await).await);
}

#[tokio::test]
async fn prefer_is_the_default_and_uses_tls_when_offered() {
    setup().await;
    let env = TestEnv::start_on(cluster(), |c| {
        let server = &mut c.servers[0];
        assert_eq!(server.tls, BackendTlsMode::Prefer);
        PROVISIONER.clone_into(&mut server.admin_user);
        server.admin_password = Some(Secret::new(PROVISIONER_PASSWORD));
    })
    .await;
    let t = env.tenant_with_user("pref").await;
    assert!(backend_ssl(&env.app(t.slug.as_str()).await).await);
}

/// Provisions a tenant with a working config, then starts a second proxy on the same registry
/// whose server settings are `bad`, and returns the error a client of that tenant gets and
/// how long it took.
async fn refused_with(bad: impl FnOnce(&mut Config)) -> (tokio_postgres::Error, Duration, String) {
    let cas = setup().await;
    let env = start(BackendTlsMode::VerifyFull, Some(cas.right()), "localhost").await;
    let t = env.tenant_with_user("bad").await;
    let mut config = env.config.clone();
    bad(&mut config);
    let proxy = Proxy::start(config).await.expect("second proxy");
    let port = proxy.local_addr().port();
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(port)
        .user("app")
        .password("secret")
        .dbname(t.slug.as_str())
        .connect_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let e = pg
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("the backend connection must fail");
    let took = started.elapsed();
    let message = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    proxy.shutdown(Duration::from_secs(1)).await;
    (e, took, message)
}

#[tokio::test]
async fn verify_full_with_the_wrong_ca_fails_quickly_and_says_why() {
    let cas = setup().await;
    let wrong = cas.wrong();
    let (e, took, message) = refused_with(move |c| c.servers[0].ca_file = Some(wrong)).await;
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    assert!(message.contains("certificate verify failed"), "{message}");
    assert!(message.contains("server local"), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn verify_full_with_a_host_the_certificate_does_not_name_fails() {
    let (e, took, message) = refused_with(|c| "127.0.0.1".clone_into(&mut c.servers[0].host)).await;
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    assert!(message.contains("certificate verify failed"), "{message}");
    assert!(message.contains("does not name"), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn disable_against_a_tls_only_server_gets_the_servers_refusal() {
    let (e, took, message) = refused_with(|c| c.servers[0].tls = BackendTlsMode::Disable).await;
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    // PostgreSQL's own words: "pg_hba.conf rejects connection ... no encryption".
    assert!(message.contains("refused"), "{message}");
    assert!(message.contains("no encryption"), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// The backend module itself: a TLS login uses SCRAM-SHA-256-PLUS (channel binding), and the
/// errors carry the reason.
#[tokio::test]
async fn backend_login_over_tls_uses_channel_binding() {
    let cas = setup().await;
    let role = unique("cb_role_");
    common::admin_client_on(cluster(), "postgres")
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'cb-secret'"))
        .await
        .unwrap();
    let target = |tls: BackendTlsMode, ca: Option<PathBuf>| {
        let mut server: tenantgate::pool::ServerConfig =
            toml::from_str("name = \"local\"\nhost = \"localhost\"\n").unwrap();
        server.port = cluster().port();
        server.tls = tls;
        server.ca_file = ca;
        BackendTarget {
            server: server.name.clone(),
            host: server.host.clone(),
            port: server.port,
            database: "postgres".to_owned(),
            role: role.clone(),
            password: Secret::new("cb-secret"),
            tls: Arc::new(BackendTls::from_server(&server).unwrap()),
        }
    };
    let timeout = Duration::from_secs(5);
    let conn = BackendConn::connect(
        &target(BackendTlsMode::VerifyFull, Some(cas.right())),
        timeout,
    )
    .await
    .unwrap();
    assert!(conn.is_tls());
    assert_eq!(conn.sasl_mechanism(), Some("SCRAM-SHA-256-PLUS"));
    drop(conn);

    let e = BackendConn::connect(
        &target(BackendTlsMode::VerifyFull, Some(cas.wrong())),
        timeout,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, BackendError::Tls(BackendTlsError::Handshake { reason, .. }) if reason.contains("unknown issuer")),
        "{e}"
    );
    let e = BackendConn::connect(&target(BackendTlsMode::Disable, None), timeout)
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Refused(_)), "{e}");
}

/// Opening bytes of every connection a [`Recorder`] forwarded.
type Openings = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A forwarder in front of the cluster that keeps the first 8 bytes each connection sent.
async fn recorder(upstream: u16) -> (u16, Openings) {
    let openings = Openings::default();
    let seen = Arc::clone(&openings);
    let port = forwarder(upstream, move |opening| {
        seen.lock().unwrap().push(opening.to_vec());
        Opening::Forward
    })
    .await;
    (port, openings)
}

/// A cancel for a query on a TLS backend connection goes over TLS too: the cancel key never
/// crosses the network in the clear, and the query is still cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_for_a_tls_backend_goes_over_tls() {
    let cas = setup().await;
    let (port, openings) = recorder(cluster().port()).await;
    let env = TestEnv::start_on(cluster(), move |c| {
        tweak(
            c,
            BackendTlsMode::VerifyFull,
            Some(cas.right()),
            "localhost",
        );
        c.servers[0].port = port;
    })
    .await;
    let t = env.tenant_with_user("tlscancel").await;
    let client = env.app(t.slug.as_str()).await;
    assert!(backend_ssl(&client).await);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(30)").await });
    assert!(
        until_running(cluster(), &[&t.database], "SELECT pg_sleep(30)", 1).await,
        "the query to cancel never ran"
    );
    let before = openings.lock().unwrap().len();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the cancel must stop the query")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");

    let openings = openings.lock().unwrap().clone();
    assert!(openings.len() > before, "the cancel reached the server");
    assert!(
        openings.iter().all(|o| o[..] == SSL_REQUEST),
        "every connection to the server began with SSLRequest: {openings:?}"
    );
    assert!(!openings.iter().any(|o| o[..] == CANCEL_REQUEST));
}
