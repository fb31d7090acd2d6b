//! Client TLS (issue 6): SSLRequest and direct TLS, `tls.mode`, SNI routing and
//! SCRAM-SHA-256-PLUS, from tokio-postgres (rustls), psql and a raw TLS client.

use crate::common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::TestEnv;
use common::certs::{self, CertDir, TestCa};
use common::psql::Psql;
use common::query::current_database;
use common::wire::{self, RawClient};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tenantgate::config::Config;
use tenantgate::tls::{TlsConfig, TlsMode};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use tokio_postgres::config::{ChannelBinding as PgChannelBinding, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const BASE: &str = "db.example.test";

/// A CA and a server certificate it signed, as files.
struct Certs {
    ca: TestCa,
    files: CertDir,
}

impl Certs {
    fn new() -> Certs {
        let ca = TestCa::new("tenantgate test CA");
        let files = CertDir::new("tls");
        files.write("ca.crt", &ca.pem);
        files.write_pair(
            "server",
            &ca.server(&["localhost", "127.0.0.1", &format!("*.{BASE}")]),
        );
        Certs { ca, files }
    }

    fn ca_file(&self) -> PathBuf {
        self.files.path("ca.crt")
    }

    fn tls_config(&self, mode: TlsMode, sni: bool) -> TlsConfig {
        TlsConfig {
            mode,
            cert_file: Some(self.files.path("server.crt")),
            key_file: Some(self.files.path("server.key")),
            sni_base_domain: sni.then(|| BASE.to_owned()),
            client_ca_file: None,
        }
    }

    fn rustls_client(&self, alpn: bool) -> rustls::ClientConfig {
        let mut config = certs::rustls_client(&[&self.ca], None);
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        config
    }
}

async fn start(certs: &Certs, mode: TlsMode, sni: bool) -> TestEnv {
    let tls = certs.tls_config(mode, sni);
    TestEnv::start_with(move |c| c.tls = tls).await
}

/// tokio-postgres over rustls, verifying the server against the test CA.
async fn connect_tls(
    env: &TestEnv,
    certs: &Certs,
    host: &str,
    dbname: &str,
    channel_binding: PgChannelBinding,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tls_config(env, host, dbname, "app", "secret");
    config.channel_binding(channel_binding);
    let (client, connection) = config
        .connect(MakeRustlsConnect::new(certs.rustls_client(false)))
        .await?;
    tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(client)
}

/// tokio-postgres config for `host` (the TLS server name) at 127.0.0.1.
fn tls_config(
    env: &TestEnv,
    host: &str,
    dbname: &str,
    user: &str,
    password: &str,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .hostaddr(IpAddr::from([127, 0, 0, 1]))
        .port(env.port())
        .user(user)
        .password(password)
        .dbname(dbname)
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(10));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_each_sslmode_and_channel_binding() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Require, false).await;
    let t = env.tenant_with_user("tls-psql").await;
    let port = env.port();
    let ca = certs.ca_file();
    let base = format!(
        "host=localhost port={port} user=app dbname={}",
        t.slug.as_str()
    );
    let cases = [
        format!("{base} sslmode=require"),
        format!("{base} sslmode=verify-ca sslrootcert={}", ca.display()),
        format!("{base} sslmode=verify-full sslrootcert={}", ca.display()),
        format!(
            "{base} sslmode=verify-full sslrootcert={} channel_binding=require",
            ca.display()
        ),
        format!("{base} sslmode=require channel_binding=disable"),
        format!(
            "host=127.0.0.1 port={port} user=app dbname={} sslmode=verify-full sslrootcert={}",
            t.slug.as_str(),
            ca.display()
        ),
    ];
    for conninfo in cases {
        let out = Psql::new(&conninfo)
            .password("secret")
            .run("SELECT current_database()")
            .await;
        assert!(out.ok, "{conninfo}: {}", out.stderr);
        assert_eq!(out.stdout, t.database, "{conninfo}");
    }

    // A plaintext psql is refused before any password is asked for.
    let plain = format!("{base} sslmode=disable");
    let out = Psql::new(&plain).password("secret").run("SELECT 1").await;
    assert!(!out.ok);
    let err = out.stderr;
    assert!(err.contains("requires TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls_with_and_without_channel_binding() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Allow, false).await;
    let t = env.tenant_with_user("tls-tp").await;
    let slug = t.slug.as_str();
    for cb in [
        PgChannelBinding::Require,
        PgChannelBinding::Prefer,
        PgChannelBinding::Disable,
    ] {
        let client = connect_tls(&env, &certs, "localhost", slug, cb)
            .await
            .unwrap_or_else(|e| panic!("{cb:?}: {e}"));
        assert_eq!(current_database(&client).await, t.database);
    }
    // A wrong password over TLS with channel binding is still the same 28P01.
    let mut config = tls_config(&env, "localhost", slug, "app", "wrong");
    config.channel_binding(PgChannelBinding::Require);
    let err = config
        .connect(MakeRustlsConnect::new(certs.rustls_client(false)))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    // Under `allow`, plaintext clients are still served, and cannot bind to a channel.
    let plain = env.app(slug).await;
    assert_eq!(current_database(&plain).await, t.database);
    let mut config = env.client_config(slug, "app", "secret");
    config.channel_binding(PgChannelBinding::Require);
    assert!(config.connect(NoTls).await.is_err());

    // The admin console over TLS.
    let mut config = tls_config(
        &env,
        "localhost",
        &env.config.admin.database,
        "root",
        "root-secret",
    );
    config.channel_binding(PgChannelBinding::Require);
    let (admin, connection) = config
        .connect(MakeRustlsConnect::new(certs.rustls_client(false)))
        .await
        .unwrap();
    tokio::spawn(connection);
    admin.simple_query("SHOW TENANTS").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_under_require_before_authentication() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Require, false).await;
    let t = env.tenant_with_user("tls-req").await;

    let err = env
        .connect(t.slug.as_str(), "app", "secret")
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // On the wire: the first answer to a plaintext StartupMessage is the error, not an
    // authentication request.
    let mut raw = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    let mut out = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", t.slug.as_str())], &mut out).unwrap();
    raw.write_all(&out).await.unwrap();
    let (tag, body) = first_message(&mut raw).await;
    assert_eq!(
        wire::error_code(tag, &body),
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // An SSLRequest is answered S.
    let (answer, _raw) = wire::ssl_request(env.port()).await;
    assert_eq!(answer, b'S');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_tls_answers_n_as_before() {
    let env = TestEnv::start().await;
    let (answer, _raw) = wire::ssl_request(env.port()).await;
    assert_eq!(answer, b'N');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_to_the_tenant_it_names_and_refuses_a_different_database() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Require, true).await;
    let a = env.tenant_with_user("sni-a").await;
    let b = env.tenant_with_user("sni-b").await;
    for t in [&a, &b] {
        let host = format!("{}.{BASE}", t.slug.as_str());
        // Any database name that is not another tenant: the SNI decides.
        for dbname in ["postgres", t.slug.as_str(), &env.config.admin.database] {
            let client = connect_tls(&env, &certs, &host, dbname, PgChannelBinding::Require)
                .await
                .unwrap_or_else(|e| panic!("{host} {dbname}: {e}"));
            assert_eq!(current_database(&client).await, t.database);
        }
    }
    let host = format!("{}.{BASE}", a.slug.as_str());
    let err = connect_tls(
        &env,
        &certs,
        &host,
        b.slug.as_str(),
        PgChannelBinding::Prefer,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(
        message.contains(a.slug.as_str()) && message.contains(b.slug.as_str()),
        "{message}"
    );

    // Without a tenant in the SNI the database name routes, admin console included.
    let client = connect_tls(
        &env,
        &certs,
        "localhost",
        b.slug.as_str(),
        PgChannelBinding::Prefer,
    )
    .await
    .unwrap();
    assert_eq!(current_database(&client).await, b.database);

    // psql: host= sets the SNI, hostaddr= where to connect.
    let conninfo = format!(
        "host={host} hostaddr=127.0.0.1 port={} user=app dbname=postgres sslmode=verify-full \
         sslrootcert={} channel_binding=require",
        env.port(),
        certs.ca_file().display()
    );
    let out = Psql::new(&conninfo)
        .password("secret")
        .run("SELECT current_database()")
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, a.database);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_logs_in_and_without_alpn_is_refused() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Require, false).await;
    let t = env.tenant_with_user("tls-direct").await;

    let tls = direct_tls(&env, &certs, true).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let mut raw = RawClient::login(tls, t.slug.as_str(), "app", "secret").await;
    assert!(
        raw.mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS"),
        "{:?}",
        raw.mechanisms
    );
    raw.send(&wire::query("SELECT current_database()"))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), raw.until_ready())
        .await
        .unwrap()
        .unwrap();
    let mut seen = None;
    for (tag, body) in answer {
        match tag {
            b'D' => seen = Some(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'E' => panic!("{}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    assert_eq!(seen.as_deref(), Some(t.database.as_str()));

    // Direct TLS without ALPN: PostgreSQL 17 refuses it, and so do we.
    let mut tls = direct_tls(&env, &certs, false).await;
    let (tag, body) = first_message(&mut tls).await;
    assert_eq!(
        wire::error_code(tag, &body),
        Some(SqlState::PROTOCOL_VIOLATION),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

#[test]
fn unreadable_certificate_is_a_one_line_config_error() {
    let certs = Certs::new();
    let path = certs.files.path("tenantgate.toml");
    std::fs::write(
        &path,
        r#"
[registry]
url = "host=127.0.0.1 dbname=registry"

[tls]
mode = "require"
cert_file = "missing.crt"
key_file = "server.key"

[[server]]
name = "main"
host = "127.0.0.1"
port = 5432
admin_user = "postgres"
"#,
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("tls.cert_file"), "{err}");
    assert!(err.contains("missing.crt"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    certs.files.write("garbage.crt", "not a certificate");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("missing.crt", "garbage.crt");
    std::fs::write(&path, text).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("tls.cert_file"), "{err}");
}

async fn direct_tls(
    env: &TestEnv,
    certs: &Certs,
    alpn: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(certs.rustls_client(alpn)));
    let tcp = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap()
}

/// The first message the proxy sends on `stream` (within 10 s).
async fn first_message<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(10), wire::read_message(stream))
        .await
        .expect("an answer within 10 s")
        .unwrap()
}
