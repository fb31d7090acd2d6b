//! The `tenantgate` binary as a user runs it: quickstart from nothing, the tenant and user
//! commands, and broken configs.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::psql::Psql;
use tokio_postgres::error::SqlState;

const BIN: &str = env!("CARGO_BIN_EXE_tenantgate");

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}-{name}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the quickstart and returns it with the lines it printed up to "ready".
fn start_quickstart(dir: &Path) -> (Child, Vec<String>) {
    let (child, lines, _log) = start_quickstart_with(dir, &[]);
    (child, lines)
}

/// Starts the quickstart with `extra` arguments; returns it with the lines it printed up to
/// "ready", and its log (stderr, at its default level, info) line by line from then on.
#[allow(clippy::zombie_processes, reason = "the caller waits for it in stop()")]
fn start_quickstart_with(
    dir: &Path,
    extra: &[&str],
) -> (Child, Vec<String>, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["quickstart", "--dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read to the end whether anyone listens or not: a full pipe would stop the quickstart.
    let stderr = child.stderr.take().unwrap();
    let (log_tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            drop(log_tx.send(line));
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("quickstart printed its ready line");
        let ready = line.contains("is ready");
        lines.push(line);
        if ready {
            return (child, lines, log);
        }
    }
}

fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "quickstart exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "quickstart did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn quickstart_from_nothing_then_again_on_the_same_directory() {
    let dir = temp_dir("quickstart");
    let (child, lines) = start_quickstart(&dir);
    let uris: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("postgresql://"))
        .collect();
    assert_eq!(uris.len(), 2, "{lines:?}");
    assert!(
        uris[0].ends_with("/acme") && uris[1].ends_with("/globex"),
        "{uris:?}"
    );
    let acme = Psql::new(uris[0])
        .run_blocking("SELECT string_agg(name, ',' ORDER BY id) FROM products")
        .expect_ok();
    let globex = Psql::new(uris[1])
        .run_blocking("SELECT string_agg(name, ',' ORDER BY id) FROM products")
        .expect_ok();
    assert_eq!(acme, "anvil,rocket skates,giant magnet");
    assert_eq!(globex, "hammock,doomsday device");
    let first_uris: Vec<String> = uris
        .iter()
        .map(|u| u.split('@').next().unwrap().to_owned())
        .collect();
    stop(child);
    // The private PostgreSQL stopped with it.
    assert!(!dir.join("pgdata/postmaster.pid").exists());

    // Again, on the same directory: same credentials, same data, and edits to the config count.
    let config = dir.join("tenantgate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("pool_size = 20", "pool_size = 3")).unwrap();
    let (child, lines) = start_quickstart(&dir);
    let uris: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("postgresql://"))
        .collect();
    let again: Vec<String> = uris
        .iter()
        .map(|u| u.split('@').next().unwrap().to_owned())
        .collect();
    assert_eq!(again, first_uris);
    assert_eq!(
        Psql::new(uris[0])
            .run_blocking("SELECT count(*) FROM products")
            .expect_ok(),
        "3"
    );
    stop(child);
    drop(std::fs::remove_dir_all(&dir));
}

#[test]
fn quickstart_with_tls_prints_sslmode_require_uris_that_psql_uses() {
    let dir = temp_dir("quickstart-tls");
    let (child, lines, log) = start_quickstart_with(&dir, &["--tls"]);
    let uris: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("postgresql://"))
        .collect();
    assert_eq!(uris.len(), 2, "{lines:?}");
    assert!(uris[0].ends_with("/acme?sslmode=require"), "{uris:?}");
    assert_eq!(
        Psql::new(uris[0])
            .run_blocking("SELECT count(*) FROM products")
            .expect_ok(),
        "3"
    );
    let cert = dir.join("server.crt");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&cert.display().to_string()))
    );
    // The certificate verifies as its own root for 127.0.0.1.
    let verify_full = uris[1].replace(
        "sslmode=require",
        &format!("sslmode=verify-full&sslrootcert={}", cert.display()),
    );
    assert_eq!(
        Psql::new(&verify_full)
            .run_blocking("SELECT count(*) FROM products")
            .expect_ok(),
        "2"
    );
    // Plaintext is refused.
    let plain = uris[0].replace("sslmode=require", "sslmode=disable");
    let out = Psql::new(&plain).run_blocking("SELECT 1");
    assert!(!out.ok);
    assert!(out.stderr.contains("requires TLS"), "{}", out.stderr);

    // --tls and --listen are command-line settings over the file: SIGHUP and RELOAD re-read
    // the file without undoing them (TLS stays required, nothing is listed as changed).
    // The reload is done when the quickstart logs its outcome ("SIGHUP: ..."), not after a
    // guessed second.
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let reloaded = wait_for_line(&log, "SIGHUP: ");
    assert!(!reloaded.contains("ERROR"), "{reloaded}");
    let admin = lines
        .iter()
        .find_map(|l| l.strip_prefix("admin console: "))
        .unwrap();
    assert_eq!(
        Psql::new(admin).run_blocking("RELOAD").expect_ok(),
        "",
        "RELOAD lists no change"
    );
    assert_eq!(
        Psql::new(uris[0])
            .run_blocking("SELECT count(*) FROM products")
            .expect_ok(),
        "3"
    );
    let out = Psql::new(&plain).run_blocking("SELECT 1");
    assert!(
        out.stderr.contains("requires TLS"),
        "plaintext after SIGHUP: {}",
        out.stderr
    );
    stop(child);
    drop(std::fs::remove_dir_all(&dir));
}

/// A quickstart in its own process group, as a shell runs a foreground job, so a Ctrl-C can
/// be sent the way a terminal sends it: SIGINT to tenantgate, the watchdog and PostgreSQL
/// at once. Its stdout and stderr (the log) lines arrive on the channel.
#[allow(clippy::zombie_processes, reason = "the caller waits for it")]
fn spawn_quickstart_job(dir: &Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(BIN)
        .args(["quickstart", "--dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            drop(out_tx.send(line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            drop(tx.send(line));
        }
    });
    (child, rx)
}

/// Waits for a line containing `needle` and returns it; panics with the lines seen if the job
/// ends first.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no line with {needle:?} ({e}); the quickstart printed: {seen:#?}"),
        }
    }
}

/// Ctrl-C: SIGINT to the job's whole process group. Then the quickstart must exit by itself
/// (exit 0, not killed by the signal) with its PostgreSQL gone.
fn ctrl_c_and_wait(mut child: Child, dir: &Path) {
    Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "quickstart did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "quickstart ended with {status} on Ctrl-C, not by stopping"
    );
    assert!(
        !dir.join("pgdata/postmaster.pid").exists(),
        "quickstart exited before its PostgreSQL did"
    );
}

/// Defect 7: Ctrl-C, then the quickstart again at once on the same directory, failed with
/// `lock file "postmaster.pid" already exists`: tenantgate installed its Ctrl-C handler only
/// once ready, so a Ctrl-C before that ended it at once while its PostgreSQL was still
/// shutting down. Now it stops in order whenever the Ctrl-C comes and exits only after its
/// PostgreSQL has.
#[test]
fn ctrl_c_at_any_point_stops_postgresql_first_so_an_immediate_rerun_starts() {
    let dir = temp_dir("quickstart-ctrl-c");
    // Ctrl-C as soon as it is ready.
    let (child, lines) = spawn_quickstart_job(&dir);
    wait_for_line(&lines, "press Ctrl-C to stop");
    ctrl_c_and_wait(child, &dir);
    // At once again, and Ctrl-C while it is still setting up (PostgreSQL is up, the
    // registry and the demo tenants are being checked).
    let (child, lines) = spawn_quickstart_job(&dir);
    wait_for_line(&lines, "local PostgreSQL is ready");
    ctrl_c_and_wait(child, &dir);
    // At once again: it starts.
    let (child, lines) = start_quickstart(&dir);
    assert!(
        lines.iter().any(|l| l.ends_with("/acme")),
        "the demo tenants are listed again: {lines:?}"
    );
    stop(child);
    drop(std::fs::remove_dir_all(&dir));
}

#[test]
fn a_broken_config_is_one_line_naming_the_key_and_exit_code_2() {
    let dir = temp_dir("badconfig");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[registry]\nurl = \"host=x\"\n\n[pool]\npool_sise = 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("pool_sise") && err.contains("line 5"), "{err}");

    std::fs::write(
        &path,
        "[registry]\nurl = \"host=x\"\n\n[pool]\npool_size = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool.pool_size"), "{err}");

    // Issue 14: a log format that is neither text nor json.
    std::fs::write(
        &path,
        "[proxy]\nlog_format = \"xml\"\n\n[registry]\nurl = \"host=x\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("proxy.log_format") && err.contains("line 2"),
        "{err}"
    );

    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.join("missing.toml"))
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // A certificate file that is not there.
    std::fs::write(
        &path,
        "[registry]\nurl = \"host=x\"\n\n[tls]\nmode = \"require\"\ncert_file = \"nope.crt\"\n\
         key_file = \"nope.key\"\n\n[[server]]\nname = \"a\"\nhost = \"x\"\nadmin_user = \"p\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("tls.cert_file") && err.contains("nope.crt"),
        "{err}"
    );
    drop(std::fs::remove_dir_all(&dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::too_many_lines,
    reason = "one operator's session, step by step"
)]
async fn tenant_and_user_commands_manage_the_registry() {
    let env = common::TestEnv::start().await;
    let config_path = env.dir.join("cli.toml");
    let pg = common::cluster();
    let registry_url = env.config.registry.url.clone();
    std::fs::write(
        &config_path,
        format!(
            "[registry]\nurl = \"{registry_url}\"\n\n[secrets]\nmaster_key_env = \"TENANTGATE_TEST_KEY_IS_IN_THE_FILE\"\nmaster_key_file = \"master.key\"\n\n[[server]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nadmin_user = \"{}\"\nadmin_password_env = \"TG_TEST_ADMIN_PW\"\n",
            pg.port(),
            pg.superuser()
        ),
    )
    .unwrap();
    let cli = move |args: &[&str], stdin: Option<&str>| {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("TG_TEST_ADMIN_PW", pg.password())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let slug = common::unique("cli-");
    let (code, out, err) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let slug = slug.clone();
        move || cli(&["tenant", "create", &slug, "--name", "CLI Co"], None)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let slug = slug.clone();
        move || cli(&["user", "add", &slug, "bob"], Some("hunter2\n"))
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{err}");
    let c = env.connect(&slug, "bob", "hunter2").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();

    let (code, out, _) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["tenant", "list"], None)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{slug}\tactive"))),
        "{out}"
    );

    // Bad slugs and duplicates are refused with a clear message.
    let (code, _, err) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["tenant", "create", "Bad_Slug"], None)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("not a valid tenant slug"), "{err}");
    let (code, _, err) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let slug = slug.clone();
        move || cli(&["tenant", "create", &slug], None)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");

    // Suspend through the CLI: the running proxy refuses new clients with 57P03.
    let (code, _, _) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let slug = slug.clone();
        move || cli(&["tenant", "suspend", &slug], None)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    let refused = common::eventually(Duration::from_secs(5), || async {
        matches!(env.connect(&slug, "bob", "hunter2").await,
            Err(e) if e.code() == Some(&SqlState::CANNOT_CONNECT_NOW))
    })
    .await;
    assert!(refused);

    // Register an existing database under a new slug.
    let admin = common::admin_client("postgres").await;
    let db = common::unique("existing_");
    admin
        .batch_execute(&format!("CREATE ROLE {db} LOGIN PASSWORD 'legacy-pw'"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db} OWNER {db}"))
        .await
        .unwrap();
    let legacy = common::unique("legacy-");
    let (code, out, err) = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let legacy = legacy.clone();
        let db = db.clone();
        move || {
            cli(
                &[
                    "tenant",
                    "register",
                    &legacy,
                    "--database",
                    &db,
                    "--role",
                    &db,
                ],
                Some("legacy-pw\n"),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    env.add_user(&legacy, "app", "secret").await;
    let c = env.app(&legacy).await;
    let name: String = c
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, db);
}

/// Runs the binary with `config` and `args`; the server's admin password comes from
/// `TG_TEST_ADMIN_PW`. Returns the exit code, stdout and stderr.
async fn run_cli(
    config: &Path,
    args: &[&str],
    admin_password: &str,
) -> (Option<i32>, String, String) {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TG_TEST_ADMIN_PW", admin_password)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CLI config for `env`'s registry whose `[[server]] local` is the test cluster, reached as
/// `admin_user` (password in `TG_TEST_ADMIN_PW`).
fn cli_config(env: &common::TestEnv, name: &str, admin_user: &str) -> std::path::PathBuf {
    let path = env.dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[registry]\nurl = \"{}\"\n\n[secrets]\nmaster_key_env = \"TENANTGATE_TEST_KEY_IS_IN_THE_FILE\"\nmaster_key_file = \"master.key\"\n\n[[server]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nadmin_user = \"{admin_user}\"\nadmin_password_env = \"TG_TEST_ADMIN_PW\"\n",
            env.config.registry.url,
            common::cluster().port(),
        ),
    )
    .unwrap();
    path
}

/// Issue 14 part 4: `user import --from-server` copies roles' SCRAM verifiers from the server's
/// pg_authid; the users log in through the proxy with their old passwords. A missing role
/// imports nothing; an admin_user that may not read pg_authid is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_import_copies_verifiers_from_pg_authid() {
    let env = common::TestEnv::start().await;
    let pg = common::cluster();
    let config = cli_config(&env, "import.toml", pg.superuser());
    let t = env.tenant("imp-").await;
    let slug = t.slug.as_str();
    let alice = common::unique("imp_alice_");
    let bob = common::unique("imp_bob_");
    crate::admin::verifiers::postgres_verifier(&alice, "alice-pw").await;
    crate::admin::verifiers::postgres_verifier(&bob, "bob-pw").await;

    // One role missing: nothing imported, every problem named.
    let (code, _, err) = run_cli(
        &config,
        &[
            "user",
            "import",
            "--tenant",
            slug,
            "--from-server",
            "--role",
            &alice,
            "--role",
            "imp_nobody",
        ],
        pg.password(),
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("nothing imported") && err.contains("imp_nobody"),
        "{err}"
    );
    assert!(
        env.registry
            .user_verifier(&t.slug, &alice)
            .await
            .unwrap()
            .is_none()
    );

    let roles = format!("{alice},{bob}");
    let (code, out, err) = run_cli(
        &config,
        &[
            "user",
            "import",
            "--tenant",
            slug,
            "--from-server",
            "local",
            "--role",
            &roles,
        ],
        pg.password(),
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("imported 2 user(s)"), "{out}");
    for (user, password) in [(&alice, "alice-pw"), (&bob, "bob-pw")] {
        let c = env
            .connect(slug, user, password)
            .await
            .unwrap_or_else(|e| panic!("{user} logs in with the old password: {e}"));
        let me: String = c
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(me, t.database);
        let wrong = env.connect(slug, user, "nope").await.unwrap_err();
        assert_eq!(wrong.code(), Some(&SqlState::INVALID_PASSWORD));
    }

    // An admin_user that may not read pg_authid.
    let weak = common::unique("imp_weak_");
    common::admin_client("postgres")
        .await
        .batch_execute(&format!(
            "CREATE ROLE {weak} LOGIN CREATEROLE PASSWORD 'weak-pw'"
        ))
        .await
        .unwrap();
    let weak_config = cli_config(&env, "weak.toml", &weak);
    let (code, _, err) = run_cli(
        &weak_config,
        &[
            "user",
            "import",
            "--tenant",
            slug,
            "--from-server",
            "--role",
            &alice,
        ],
        "weak-pw",
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("may not read pg_authid") && err.contains(&weak),
        "{err}"
    );
}

/// Issue 16: a config that cannot be read is one clear line, exit code 2, each cause once.
#[test]
fn an_unreadable_config_is_one_line_with_each_cause_once() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/tenantgate.toml", "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("tenantgate: /nonexistent/tenantgate.toml: cannot read"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
}
