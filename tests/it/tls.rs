//! Client TLS (issue 6): SSLRequest and direct TLS, `tls.mode`, SNI routing and
//! SCRAM-SHA-256-PLUS, from tokio-postgres (rustls), psql and a raw TLS client.

use crate::common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{TestEnv, sqlstate, unique};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tenantgate::config::Config;
use tenantgate::tls::{TlsConfig, TlsMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use tokio_postgres::config::{ChannelBinding as PgChannelBinding, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

const BASE: &str = "db.example.test";

/// A CA and a server certificate it signed, as files.
struct Certs {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "tenantgate-tls-{}-{}",
            std::process::id(),
            unique("c")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tenantgate test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            format!("*.{BASE}"),
        ])
        .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Certs {
            dir,
            ca_der: ca_cert.der().clone(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn tls_config(&self, mode: TlsMode, sni: bool) -> TlsConfig {
        TlsConfig {
            mode,
            cert_file: Some(self.dir.join("server.crt")),
            key_file: Some(self.dir.join("server.key")),
            sni_base_domain: sni.then(|| BASE.to_owned()),
            client_ca_file: None,
        }
    }

    fn rustls_client(&self, alpn: bool) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        config
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.dir));
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

async fn current_database(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0)
}

fn psql(conninfo: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(common::cluster().bindir().join("psql"))
        .args([conninfo, "-XAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", "secret")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let sql = "SELECT current_database()";
    let expected = t.database.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        cases
            .iter()
            .map(|c| (c.clone(), psql(c, sql)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (conninfo, (ok, out, err)) in outcomes {
        assert!(ok, "{conninfo}: {err}");
        assert_eq!(out, expected, "{conninfo}");
    }

    // A plaintext psql is refused before any password is asked for.
    let plain = format!("{base} sslmode=disable");
    let (ok, _, err) = tokio::task::spawn_blocking(move || psql(&plain, "SELECT 1"))
        .await
        .unwrap();
    assert!(!ok);
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
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");

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
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");

    // On the wire: the first answer to a plaintext StartupMessage is the error, not an
    // authentication request.
    let mut raw = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    let mut out = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", t.slug.as_str())], &mut out).unwrap();
    raw.write_all(&out).await.unwrap();
    let (tag, body) = read_message(&mut raw).await;
    assert_eq!(tag, b'E');
    assert!(String::from_utf8_lossy(&body).contains("C28000"));

    // An SSLRequest is answered S.
    let mut raw = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    raw.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_tls_answers_n_as_before() {
    let env = TestEnv::start().await;
    let mut raw = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    raw.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
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
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
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
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || psql(&conninfo, "SELECT current_database()"))
            .await
            .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out, a.database);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_logs_in_and_without_alpn_is_refused() {
    let certs = Certs::new();
    let env = start(&certs, TlsMode::Require, false).await;
    let t = env.tenant_with_user("tls-direct").await;

    let mut tls = direct_tls(&env, &certs, true).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    raw_login(&mut tls, t.slug.as_str()).await;
    let mut out = BytesMut::new();
    frontend::query("SELECT current_database()", &mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut seen = None;
    loop {
        let (tag, body) = read_message(&mut tls).await;
        match tag {
            b'D' => seen = Some(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'Z' => break,
            b'E' => panic!("{}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    assert_eq!(seen.as_deref(), Some(t.database.as_str()));

    // Direct TLS without ALPN: PostgreSQL 17 refuses it, and so do we.
    let mut tls = direct_tls(&env, &certs, false).await;
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!(tag, b'E');
    assert!(String::from_utf8_lossy(&body).contains("C08P01"));
}

#[test]
fn unreadable_certificate_is_a_one_line_config_error() {
    let certs = Certs::new();
    let path = certs.dir.join("tenantgate.toml");
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

    std::fs::write(certs.dir.join("garbage.crt"), "not a certificate").unwrap();
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

/// StartupMessage and SCRAM-SHA-256 (no channel binding) up to ReadyForQuery.
async fn raw_login<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, database: &str) {
    let mut out = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", database)], &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut scram = None;
    loop {
        let (tag, body) = read_message(stream).await;
        match (tag, body.get(..4)) {
            (b'R', Some([0, 0, 0, 10])) => {
                assert!(String::from_utf8_lossy(&body).contains("SCRAM-SHA-256-PLUS"));
                let s = ScramSha256::new(b"secret", ChannelBinding::unsupported());
                out.clear();
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out).unwrap();
                stream.write_all(&out).await.unwrap();
                scram = Some(s);
            }
            (b'R', Some([0, 0, 0, 11])) => {
                let s = scram.as_mut().unwrap();
                s.update(&body[4..]).unwrap();
                out.clear();
                frontend::sasl_response(s.message(), &mut out).unwrap();
                stream.write_all(&out).await.unwrap();
            }
            (b'Z', _) => return,
            (b'E', _) => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.unwrap();
    (head[0], body)
}
