//! Client TLS in operation (issue 6): certificate reload by RELOAD and SIGHUP without dropping
//! sessions, client-certificate auth (mTLS) for tenant and admin users, custom domains per
//! tenant, and TLS in SHOW CLIENTS. psql and tokio-postgres over rustls, real PostgreSQL.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario, step after step"
)]

use crate::common;
use crate::common::certs;

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certs::{CertDir, Pair, TestCa, rustls_client};
use common::psql::Psql;
use common::query::{current_database, query_value, rows};
use common::{TestEnv, eventually, unique};
use tenantgate::tls::{TlsConfig, TlsMode};
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const BIN: &str = env!("CARGO_BIN_EXE_tenantgate");

/// A proxy whose config is also a file (so RELOAD has something to read), with `tls`.
async fn start(files: &CertDir, tls: TlsConfig) -> (TestEnv, PathBuf) {
    let path = files.path("tenantgate.toml");
    let file = path.clone();
    let env = TestEnv::start_with(move |c| {
        c.tls = tls;
        std::fs::write(&file, toml::to_string(&*c).unwrap()).unwrap();
        c.source = Some(file);
    })
    .await;
    (env, path)
}

fn tls(mode: TlsMode, files: &CertDir) -> TlsConfig {
    TlsConfig {
        mode,
        cert_file: Some(files.path("server.crt")),
        key_file: Some(files.path("server.key")),
        sni_base_domain: None,
        client_ca_file: None,
    }
}

/// tokio-postgres over rustls to `host` (SNI) at 127.0.0.1.
async fn connect(
    port: u16,
    host: &str,
    dbname: &str,
    user: &str,
    password: Option<&str>,
    client: rustls::ClientConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .hostaddr(IpAddr::from([127, 0, 0, 1]))
        .port(port)
        .user(user)
        .dbname(dbname)
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Prefer)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pw) = password {
        config.password(pw);
    }
    let (client, connection) = config.connect(MakeRustlsConnect::new(client)).await?;
    tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_new_certificate_and_keeps_established_sessions() {
    let (ca1, ca2) = (TestCa::new("CA one"), TestCa::new("CA two"));
    let files = CertDir::new("reload");
    files.write_pair("server", &ca1.server(&["localhost", "127.0.0.1"]));
    let (env, _) = start(&files, tls(TlsMode::Require, &files)).await;
    let t = env.tenant_with_user("reload").await;
    let (port, slug) = (env.port(), t.slug.as_str());

    let old = connect(
        port,
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca1], None),
    )
    .await
    .unwrap();
    assert_eq!(current_database(&old).await, t.database);
    let admin = connect(
        port,
        "localhost",
        "tenantgate",
        "root",
        Some("root-secret"),
        rustls_client(&[&ca1], None),
    )
    .await
    .unwrap();

    // The certificate is renewed in place by another CA: same file names, new contents.
    files.write_pair("server", &ca2.server(&["localhost", "127.0.0.1"]));
    let reloaded = admin.simple_query("RELOAD").await.unwrap();
    let changed: Vec<(String, String)> = rows(&reloaded)
        .into_iter()
        .map(|r| (r[0].clone(), r[3].clone()))
        .collect();
    assert_eq!(
        changed,
        vec![("tls.certificate".to_owned(), "t".to_owned())]
    );

    // The session established under the old certificate goes on.
    assert_eq!(current_database(&old).await, t.database);
    // New handshakes get the new certificate: CA one no longer verifies it, CA two does, and
    // channel binding follows the new certificate.
    let refused = connect(
        port,
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca1], None),
    )
    .await;
    assert!(
        refused.is_err(),
        "a CA-one client verified the new certificate"
    );
    assert!(refused.as_ref().err().unwrap().code().is_none());
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .port(port)
        .user("app")
        .password("secret")
        .dbname(slug)
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Require);
    let (fresh, connection) = config
        .connect(MakeRustlsConnect::new(rustls_client(&[&ca2], None)))
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(current_database(&fresh).await, t.database);
    let ca2_file = files.write("ca2.crt", &ca2.pem);
    let ca1_file = files.write("ca1.crt", &ca1.pem);
    let conninfo = |ca: &Path| {
        format!(
            "host=localhost port={port} user=app dbname={slug} sslmode=verify-full \
             sslrootcert={} channel_binding=require",
            ca.display()
        )
    };
    let out = Psql::new(&conninfo(&ca2_file))
        .password("secret")
        .run("SELECT current_database()")
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, t.database);
    let out = Psql::new(&conninfo(&ca1_file))
        .password("secret")
        .run("SELECT 1")
        .await;
    assert!(
        !out.ok && out.stderr.contains("certificate"),
        "{}",
        out.stderr
    );

    // A broken certificate changes nothing: RELOAD says why, the CA-two certificate serves on.
    files.write(
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(
        message.contains("tls.cert_file") && message.contains("not reloaded"),
        "{message}"
    );
    // A key that does not match the certificate is refused too.
    files.write_pair("server", &ca2.server(&["localhost"]));
    files.write("server.key", &ca1.server(&["localhost"]).key);
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    let again = connect(
        port,
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca2], None),
    )
    .await
    .unwrap();
    assert_eq!(current_database(&again).await, t.database);
    assert_eq!(
        query_value::<String>(&old, "SELECT 'still here'").await,
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_tenantgate_serve_reload_its_certificate() {
    let (ca1, ca2) = (TestCa::new("CA one"), TestCa::new("CA two"));
    let files = CertDir::new("sighup");
    files.write_pair("server", &ca1.server(&["localhost"]));
    let (env, _) = start(&files, tls(TlsMode::Require, &files)).await;
    let t = env.tenant_with_user("sighup").await;
    let slug = t.slug.as_str();

    // `tenantgate serve` on the same registry, from its own config file.
    let mut config = env.config.clone();
    let port = common::free_port();
    config.proxy.listen = ([127, 0, 0, 1], port).into();
    config.proxy.log_level = "info".to_owned();
    config.admin.bootstrap_user = None;
    config.admin.bootstrap_password = None;
    let path = files.path("serve.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let log_path = files.path("serve.log");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "tenantgate serve did not start");
    let old = connect(
        port,
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca1], None),
    )
    .await
    .unwrap();

    files.write_pair("server", &ca2.server(&["localhost"]));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let reloaded = eventually(Duration::from_secs(10), || async {
        connect(
            port,
            "localhost",
            slug,
            "app",
            Some("secret"),
            rustls_client(&[&ca2], None),
        )
        .await
        .is_ok()
    })
    .await;
    assert!(reloaded, "SIGHUP did not bring in the new certificate");
    assert_eq!(current_database(&old).await, t.database);

    // A broken file on SIGHUP: logged, and the running certificate stays.
    files.write("server.key", "garbage");
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let logged = eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("not reloaded")
    })
    .await;
    assert!(logged, "{}", std::fs::read_to_string(&log_path).unwrap());
    connect(
        port,
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca2], None),
    )
    .await
    .unwrap();
    assert_eq!(query_value::<String>(&old, "SELECT 1::text").await, "1");

    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tenantgate serve did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut log = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("SIGHUP: reloaded"), "{log}");
    assert!(
        !log.contains(
            &env.config.servers[0]
                .admin_password
                .as_ref()
                .unwrap()
                .expose()
                .to_owned()
        )
    );
}

/// A server with client certificates asked for, signed by `client_ca`.
async fn start_mtls(files: &CertDir, server_ca: &TestCa, client_ca: &TestCa) -> TestEnv {
    files.write_pair("server", &server_ca.server(&["localhost", "127.0.0.1"]));
    let ca = files.write("client-ca.crt", &client_ca.pem);
    let mut config = tls(TlsMode::Require, files);
    config.client_ca_file = Some(ca);
    start(files, config).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_log_in_cert_users_and_refuse_the_rest() {
    let (server_ca, client_ca, stranger_ca) = (
        TestCa::new("server CA"),
        TestCa::new("client CA"),
        TestCa::new("other CA"),
    );
    let files = CertDir::new("mtls");
    let env = start_mtls(&files, &server_ca, &client_ca).await;
    let t = env.tenant_with_user("mtls").await;
    let (port, slug) = (env.port(), t.slug.as_str().to_owned());
    let admin = connect(
        port,
        "localhost",
        "tenantgate",
        "root",
        Some("root-secret"),
        rustls_client(&[&server_ca], None),
    )
    .await
    .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE USER certy FOR TENANT {slug} AUTH cert; \
             CREATE USER both FOR TENANT {slug} PASSWORD 'pw2' AUTH cert+scram; \
             CREATE ADMIN USER ops AUTH 'cert'"
        ))
        .await
        .unwrap();
    let with = |pair: &Pair| rustls_client(&[&server_ca], Some(pair));
    // Each certificate names what it is for in its OU: the tenant, or the console.
    let for_slug = Some(slug.as_str());
    let (certy, both, app, ops) = (
        client_ca.client_for("certy", for_slug),
        client_ca.client_for("both", for_slug),
        client_ca.client_for("app", for_slug),
        client_ca.client_for("ops", Some("tenantgate")),
    );

    // `cert`: the certificate alone, no password.
    let c = connect(port, "localhost", &slug, "certy", None, with(&certy))
        .await
        .unwrap();
    assert_eq!(current_database(&c).await, t.database);
    // `cert+scram`: both.
    let c = connect(port, "localhost", &slug, "both", Some("pw2"), with(&both))
        .await
        .unwrap();
    assert_eq!(current_database(&c).await, t.database);
    // `scram` users are unaffected by a certificate, or its absence.
    connect(port, "localhost", &slug, "app", Some("secret"), with(&app))
        .await
        .unwrap();
    connect(
        port,
        "localhost",
        &slug,
        "app",
        Some("secret"),
        rustls_client(&[&server_ca], None),
    )
    .await
    .unwrap();

    // Refusals. A certificate naming someone else: 28000, said at once (the CA vouches for
    // the client).
    let err = connect(port, "localhost", &slug, "certy", Some("x"), with(&app))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("CN is \"app\""),
        "{err}"
    );
    // No certificate, `cert+scram`, right password: 28000 naming what is missing.
    let err = connect(
        port,
        "localhost",
        &slug,
        "both",
        Some("pw2"),
        rustls_client(&[&server_ca], None),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("client certificate"),
        "{err}"
    );
    // No certificate and a wrong password: the same 28P01 an unknown user gets, so a client
    // without a certificate learns nothing about which users exist or how they log in.
    for user in ["both", "certy", "nobody"] {
        let err = connect(
            port,
            "localhost",
            &slug,
            user,
            Some("wrong"),
            rustls_client(&[&server_ca], None),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );
    }
    // A certificate from a CA we do not trust ends the handshake.
    let stranger = stranger_ca.client("certy");
    let err = connect(port, "localhost", &slug, "certy", None, with(&stranger))
        .await
        .unwrap_err();
    assert!(err.code().is_none(), "{err}");

    // psql with sslcert/sslkey, no password at all.
    let (cert, key) = files.write_pair("certy-client", &certy);
    let root = files.write("server-ca.crt", &server_ca.pem);
    let conninfo = format!(
        "host=localhost port={port} user=certy dbname={slug} sslmode=verify-full \
         sslrootcert={} sslcert={} sslkey={}",
        root.display(),
        cert.display(),
        key.display()
    );
    let out = Psql::new(&conninfo).run("SELECT current_database()").await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, t.database);

    // An admin user with AUTH cert reaches the console with its certificate only.
    let console = connect(port, "localhost", "tenantgate", "ops", None, with(&ops))
        .await
        .unwrap();
    console.simple_query("SHOW TENANTS").await.unwrap();
    let err = connect(
        port,
        "localhost",
        "tenantgate",
        "ops",
        Some("guess"),
        rustls_client(&[&server_ca], None),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    // A tenant user's certificate does not open the console: a password is asked for, as for
    // anyone who is not an admin user, and the answer is 28000.
    let err = connect(
        port,
        "localhost",
        "tenantgate",
        "certy",
        Some("x"),
        with(&certy),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // Issue 13 item 1: one client CA serves every tenant and the console, so a certificate
    // is bound to the database in its OU. acme's `certy` certificate does not open globex's
    // `certy` (also AUTH cert), a certificate for acme with CN `ops` does not open the console
    // as `ops`, and a certificate with no OU opens nothing.
    let globex = env.tenant("globex").await;
    admin
        .batch_execute(&format!(
            "CREATE USER certy FOR TENANT {} AUTH cert",
            globex.slug
        ))
        .await
        .unwrap();
    let cross = [
        (globex.slug.as_str(), "certy", with(&certy)),
        (
            "tenantgate",
            "ops",
            with(&client_ca.client_for("ops", for_slug)),
        ),
        (&slug, "certy", with(&client_ca.client("certy"))),
    ];
    for (database, user, tls) in cross {
        let err = connect(port, "localhost", database, user, None, tls)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{user}@{database}: {err}"
        );
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(
            message.contains(&format!("not for database \"{database}\"")),
            "{message}"
        );
    }
    // globex's own certificate does.
    let globex_certy = client_ca.client_for("certy", Some(globex.slug.as_str()));
    let c = connect(
        port,
        "localhost",
        globex.slug.as_str(),
        "certy",
        None,
        with(&globex_certy),
    )
    .await
    .unwrap();
    assert_eq!(current_database(&c).await, globex.database);

    // Switching a user back to scram: the certificate no longer stands in for a password.
    admin
        .batch_execute(&format!(
            "ALTER USER certy FOR TENANT {slug} PASSWORD 'pw3' AUTH scram"
        ))
        .await
        .unwrap();
    let err = connect(
        port,
        "localhost",
        &slug,
        "certy",
        Some("nope"),
        with(&certy),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    connect(port, "localhost", &slug, "certy", Some("pw3"), with(&certy))
        .await
        .unwrap();
    // Bad methods are refused with 22023.
    let err = admin
        .batch_execute(&format!("ALTER USER certy FOR TENANT {slug} AUTH md5"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    let err = admin
        .batch_execute(&format!("CREATE USER nopw FOR TENANT {slug} AUTH scram"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_domains_route_to_their_tenant() {
    let ca = TestCa::new("domains CA");
    let files = CertDir::new("domains");
    let (a_domain, b_domain) = (
        format!("{}.acme.test", unique("db")),
        format!("{}.b.test", unique("db")),
    );
    files.write_pair("server", &ca.server(&["localhost", &a_domain, &b_domain]));
    let (env, _) = start(&files, tls(TlsMode::Require, &files)).await;
    let a = env.tenant_with_user("dom-a").await;
    let b = env.tenant_with_user("dom-b").await;
    let port = env.port();
    let root = files.write("ca.crt", &ca.pem);
    let admin = connect(
        port,
        "localhost",
        "tenantgate",
        "root",
        Some("root-secret"),
        rustls_client(&[&ca], None),
    )
    .await
    .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER TENANT {} ADD DOMAIN '{}'",
            a.slug.as_str(),
            a_domain.to_uppercase()
        ))
        .await
        .unwrap();
    let shown = admin
        .simple_query(&format!("SHOW DOMAINS {}", a.slug.as_str()))
        .await
        .unwrap();
    assert_eq!(
        rows(&shown),
        vec![vec![a_domain.clone(), a.slug.as_str().to_owned()]]
    );
    // One tenant per domain; names must be DNS names.
    let err = admin
        .batch_execute(&format!(
            "ALTER TENANT {} ADD DOMAIN '{a_domain}'",
            b.slug.as_str()
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DUPLICATE_OBJECT), "{err}");
    let err = admin
        .batch_execute(&format!(
            "ALTER TENANT {} ADD DOMAIN 'not a domain'",
            b.slug.as_str()
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );

    // psql to the custom domain reaches tenant a, whatever the database name.
    let conninfo = |db: &str| {
        format!(
            "host={a_domain} hostaddr=127.0.0.1 port={port} user=app dbname={db} \
             sslmode=verify-full sslrootcert={} channel_binding=require",
            root.display()
        )
    };
    for db in ["postgres", a.slug.as_str(), "tenantgate"] {
        let out = Psql::new(&conninfo(db))
            .password("secret")
            .run("SELECT current_database()")
            .await;
        assert!(out.ok, "{db}: {}", out.stderr);
        assert_eq!(out.stdout, a.database, "{db}");
    }
    // A database name that is another tenant: refused, naming both.
    let err = connect(
        port,
        &a_domain,
        b.slug.as_str(),
        "app",
        Some("secret"),
        rustls_client(&[&ca], None),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // A domain added behind the proxy's back (another instance, the CLI) arrives by NOTIFY,
    // even after a lookup cached it as nobody's.
    let before = connect(
        port,
        &b_domain,
        "postgres",
        "app",
        Some("secret"),
        rustls_client(&[&ca], None),
    )
    .await;
    assert!(before.is_err());
    env.registry.add_domain(&b.slug, &b_domain).await.unwrap();
    let routed = eventually(Duration::from_secs(5), || async {
        match connect(
            port,
            &b_domain,
            "postgres",
            "app",
            Some("secret"),
            rustls_client(&[&ca], None),
        )
        .await
        {
            Ok(c) => current_database(&c).await == b.database,
            Err(_) => false,
        }
    })
    .await;
    assert!(routed, "the new domain was not picked up");

    // Dropped: the name routes nowhere again.
    admin
        .batch_execute(&format!(
            "ALTER TENANT {} DROP DOMAIN '{a_domain}'",
            a.slug.as_str()
        ))
        .await
        .unwrap();
    let err = connect(
        port,
        &a_domain,
        "postgres",
        "app",
        Some("secret"),
        rustls_client(&[&ca], None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    let err = admin
        .batch_execute(&format!(
            "ALTER TENANT {} DROP DOMAIN '{a_domain}'",
            a.slug.as_str()
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_clients_says_which_clients_use_tls() {
    let ca = TestCa::new("clients CA");
    let files = CertDir::new("clients");
    files.write_pair("server", &ca.server(&["localhost"]));
    let (env, _) = start(&files, tls(TlsMode::Allow, &files)).await;
    let t = env.tenant_with_user("tls-clients").await;
    let slug = t.slug.as_str();
    let secure = connect(
        env.port(),
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca], None),
    )
    .await
    .unwrap();
    let plain = env.app(slug).await;
    secure.simple_query("SELECT 1").await.unwrap();
    plain.simple_query("SELECT 1").await.unwrap();
    let admin = env.admin().await;
    let listed = admin
        .simple_query(&format!(
            "SELECT tls FROM clients WHERE tenant = '{slug}' ORDER BY id"
        ))
        .await
        .unwrap();
    let tls: Vec<String> = rows(&listed).into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(tls.len(), 2, "{tls:?}");
    assert!(tls[0].starts_with("TLSv1.3 TLS13_"), "{tls:?}");
    assert_eq!(tls[1], "", "{tls:?}");
    // SHOW CLIENTS has the column too, and the plaintext admin session is listed without TLS.
    let shown = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let columns = shown
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(d) => {
                Some(d.iter().map(|c| c.name().to_owned()).collect::<Vec<_>>())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(columns.last().map(String::as_str), Some("tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_user_add_sets_the_auth_method_without_asking_a_cert_user_for_a_password() {
    let files = CertDir::new("cli");
    let (env, path) = start(&files, TlsConfig::default()).await;
    let t = env.tenant("cli-auth").await;
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A child that refuses its arguments exits without reading: a broken pipe is fine.
        drop(std::io::Write::write_all(
            &mut child.stdin.take().unwrap(),
            stdin.as_bytes(),
        ));
        child.wait_with_output().unwrap()
    };
    let slug = t.slug.as_str();
    let out = run(&["user", "add", slug, "robot", "--auth", "cert"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("auth cert"));
    let login = env
        .registry
        .user_login(&t.slug, "robot")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(login.method, tenantgate::registry::AuthMethod::Cert);
    let out = run(
        &["user", "add", slug, "both", "--auth", "cert+scram"],
        "pw\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = env
        .registry
        .user_login(&t.slug, "both")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(login.method, tenantgate::registry::AuthMethod::CertScram);
    let out = run(&["user", "add", slug, "x", "--auth", "md5"], "pw\n");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_tls_mode_to_new_clients_only() {
    let ca = TestCa::new("mode CA");
    let files = CertDir::new("mode");
    files.write_pair("server", &ca.server(&["localhost"]));
    let (env, path) = start(&files, tls(TlsMode::Allow, &files)).await;
    let t = env.tenant_with_user("tls-mode").await;
    let slug = t.slug.as_str();
    let plain = env.app(slug).await;
    let admin = env.admin().await;

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("mode = \"allow\""), "{text}");
    std::fs::write(
        &path,
        text.replace("mode = \"allow\"", "mode = \"require\""),
    )
    .unwrap();
    let reloaded = admin.simple_query("RELOAD").await.unwrap();
    let changed: Vec<(String, String)> = rows(&reloaded)
        .into_iter()
        .map(|r| (r[0].clone(), r[3].clone()))
        .collect();
    assert_eq!(changed, vec![("tls.mode".to_owned(), "t".to_owned())]);

    // New plaintext clients are refused before any password; the one already in stays.
    let err = env.connect(slug, "app", "secret").await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert_eq!(current_database(&plain).await, t.database);
    connect(
        env.port(),
        "localhost",
        slug,
        "app",
        Some("secret"),
        rustls_client(&[&ca], None),
    )
    .await
    .unwrap();
}
