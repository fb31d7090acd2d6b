//! Master-key rotation end to end (issue 6): `tenantgate key rotate` / `key retire` run as a
//! subprocess and `ROTATE MASTER KEY` / `RETIRE OLD MASTER KEYS` in the admin console, while
//! clients hold sessions through an in-process proxy and a second proxy process that only
//! knew the old key. Every stored secret must end under the new key id, clients must keep
//! working, and no key may appear in any output.

use crate::common;
use tenantgate::crypto::Binding;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::query::{self, value};
use common::{TestEnv, admin_client, eventually, unique};
use tenantgate::config::Config;
use tenantgate::crypto::{KeyId, KeyRing, MasterKey, key_id_of};
use tenantgate::provision::{self, CreateTenant};
use tokio_postgres::error::SqlState;

const BIN: &str = env!("CARGO_BIN_EXE_tenantgate");

/// A proxy whose config is also on disk (for the CLI and RELOAD).
async fn env_with_config_file() -> (TestEnv, PathBuf) {
    let file = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}.toml",
        std::process::id(),
        unique("keys-")
    ));
    let source = file.clone();
    let env = TestEnv::start_with(move |c| c.source = Some(source)).await;
    std::fs::write(&file, toml::to_string(&env.config).unwrap()).unwrap();
    (env, file)
}

fn key_file(env: &TestEnv) -> PathBuf {
    env.config.secrets.master_key_file.clone().unwrap()
}

fn ring_on_disk(env: &TestEnv) -> KeyRing {
    let path = key_file(env);
    KeyRing::parse(&std::fs::read_to_string(&path).unwrap(), "test").unwrap()
}

/// The key lines of the key file: what must never be printed.
fn key_texts(env: &TestEnv) -> Vec<String> {
    std::fs::read_to_string(key_file(env))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `--config file` and `args`, with `env` added to its environment.
fn cli(file: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(file)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The 16 hex digits after "key id " in `text`.
fn printed_key_id(text: &str) -> String {
    let at = text.find("key id ").expect("a key id is printed") + "key id ".len();
    text[at..at + 16].to_owned()
}

/// Every tenant's stored secret's key id.
async fn stored_key_ids(env: &TestEnv) -> Vec<(String, Option<KeyId>)> {
    env.registry
        .tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.slug.to_string(), key_id_of(&t.backend_password_enc)))
        .collect()
}

/// A second proxy, as its own process, logging at debug level into a file.
struct ProxyProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ProxyProcess {
    #[allow(clippy::zombie_processes, reason = "stop() waits for it")]
    fn start(config: &Config, dir: &Path) -> ProxyProcess {
        let port = common::free_port();
        let mut config = config.clone();
        config.proxy.listen = format!("127.0.0.1:{port}").parse().unwrap();
        "debug".clone_into(&mut config.proxy.log_level);
        config.source = None;
        let file = dir.join(unique("second-proxy-")).with_extension("toml");
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let log = file.with_extension("log");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&file)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let proxy = ProxyProcess { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !proxy.log().contains("accepting connections") {
            assert!(Instant::now() < deadline, "second proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn connect(&self, slug: &str) -> tokio_postgres::Client {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user("app")
            .password("secret")
            .dbname(slug)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = c
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect through the second proxy");
        tokio::spawn(async move { drop(connection.await) });
        client
    }

    fn stop(mut self) -> String {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "second proxy did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log()
    }
}

/// A tenant provisioned by a process that still holds only `old_key` (it missed the
/// rotation): its secret lands under the old key id.
async fn tenant_by_stale_process(env: &TestEnv, old_key: &str, prefix: &str) -> String {
    let stale = MasterKey::decode(old_key, "stale").unwrap();
    let slug = unique(prefix);
    provision::create_tenant(
        env.config.provisioning(),
        &env.registry,
        &stale,
        &slug,
        &CreateTenant::default(),
    )
    .await
    .unwrap();
    env.add_user(&slug, "app", "secret").await;
    slug
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one scenario, phase after phase")]
async fn cli_rotation_reencrypts_every_secret_while_clients_and_other_proxies_keep_working() {
    let (mut env, file) = env_with_config_file().await;
    let old_keys = key_texts(&env);
    let old_id = ring_on_disk(&env).current_id();
    let t1 = env.tenant_with_user("rot").await.slug.to_string();
    let held = env.app(&t1).await;
    assert_eq!(value(&held, "SELECT 1").await, "1");

    // A second proxy process that starts with only the old key and serves t1.
    let second = ProxyProcess::start(&env.config, &env.dir);
    let held_second = second.connect(&t1).await;
    assert_eq!(value(&held_second, "SELECT 1").await, "1");

    let rotated = cli(&file, &["key", "rotate"], &[]);
    assert_eq!(rotated.code, 0, "{}{}", rotated.stdout, rotated.stderr);
    assert!(
        rotated.stdout.contains("1 secret(s) re-encrypted"),
        "{}",
        rotated.stdout
    );
    let new_id = printed_key_id(&rotated.stdout);
    let ring = ring_on_disk(&env);
    assert_eq!(ring.current_id().to_string(), new_id);
    assert_eq!(ring.ids(), vec![ring.current_id(), old_id], "new key first");
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(key_file(&env))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
    for (slug, id) in stored_key_ids(&env).await {
        assert_eq!(id, Some(ring.current_id()), "tenant {slug}");
    }

    // Sessions open across the rotation keep working, on both proxies.
    assert_eq!(value(&held, "SELECT 1").await, "1");
    assert_eq!(value(&held_second, "SELECT 1").await, "1");
    // New clients of t1 on both; the second proxy meets a secret under a key id it lacks,
    // re-reads the key file and keeps its pool.
    // It meets that secret once it has handled the rotation's NOTIFY (until then its cached
    // record still has the old key's secret), which may come after a first client: keep
    // connecting new clients, each of which must work, until the log shows the re-read.
    assert_eq!(value(&env.app(&t1).await, "SELECT 1").await, "1");
    let reread = eventually(Duration::from_secs(10), || async {
        assert_eq!(value(&second.connect(&t1).await, "SELECT 1").await, "1");
        second.log().contains("key ring re-read")
    })
    .await;
    assert!(reread, "{}", second.log());

    // New backend connections authenticate: t1's backends are terminated, and a tenant
    // created after the rotation gets fresh pools on both proxies.
    let database = env
        .registry
        .tenants()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.slug.as_str() == t1)
        .unwrap()
        .database;
    // (The held sessions' backends are spared.)
    let mut spared = Vec::new();
    for client in [&held, &held_second] {
        let row = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap();
        spared.push(row.get::<_, i32>(0));
    }
    let terminated = admin_client("postgres")
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> ALL($2)",
            &[&database, &spared],
        )
        .await
        .unwrap();
    assert!(terminated >= 2, "idle backends of both proxies terminated");
    // A pool may hand out one dead idle backend per client before it notices; the next
    // client then gets a newly authenticated backend.
    for port in [env.port(), second.port] {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("app")
            .password("secret")
            .dbname(&t1);
        let fresh = common::eventually(Duration::from_secs(10), || {
            let config = config.clone();
            async move {
                match config.connect(tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(async move { drop(connection.await) });
                        client.simple_query("SELECT 1").await.is_ok()
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(
            fresh,
            "a new backend connection authenticates on port {port}"
        );
    }
    let t2 = env.tenant_with_user("rot").await.slug.to_string();
    assert_eq!(value(&env.app(&t2).await, "SELECT 1").await, "1");
    assert_eq!(value(&second.connect(&t2).await, "SELECT 1").await, "1");
    for (slug, id) in stored_key_ids(&env).await {
        assert_eq!(id, Some(ring.current_id()), "tenant {slug}");
    }

    // Retire refuses while a secret is still under an old key (a process that missed the
    // rotation wrote it), and changes nothing.
    let t3 = tenant_by_stale_process(&env, &old_keys[0], "stale").await;
    let refused = cli(&file, &["key", "retire"], &[]);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("not under the current master key"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        refused.stderr.trim().lines().count(),
        1,
        "{}",
        refused.stderr
    );
    assert_eq!(ring_on_disk(&env).len(), 2);
    assert_eq!(value(&env.app(&t3).await, "SELECT 1").await, "1");

    // Rotate again (every secret under the newest key), then retire the two old keys.
    let again = cli(&file, &["key", "rotate"], &[]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(
        again.stdout.contains("3 secret(s) re-encrypted"),
        "{}",
        again.stdout
    );
    let all_keys: Vec<String> = key_texts(&env);
    assert_eq!(all_keys.len(), 3);
    let retired = cli(&file, &["key", "retire"], &[]);
    assert_eq!(retired.code, 0, "{}{}", retired.stdout, retired.stderr);
    assert!(retired.stdout.contains("2 dropped"), "{}", retired.stdout);
    let current = ring_on_disk(&env);
    assert_eq!(current.len(), 1);
    assert_eq!(
        current.current_id().to_string(),
        printed_key_id(&again.stdout)
    );

    // The old keys alone open nothing any more; the current key opens everything.
    let old_only = KeyRing::parse(&old_keys[0], "old").unwrap();
    let first_new = KeyRing::parse(&all_keys[1], "first new").unwrap();
    for t in env.registry.tenants().await.unwrap() {
        assert!(
            old_only
                .decrypt(
                    &t.backend_password_enc,
                    &Binding::backend_password(t.slug.as_str())
                )
                .is_err()
        );
        assert!(
            first_new
                .decrypt(
                    &t.backend_password_enc,
                    &Binding::backend_password(t.slug.as_str())
                )
                .is_err()
        );
        assert!(
            current
                .decrypt(
                    &t.backend_password_enc,
                    &Binding::backend_password(t.slug.as_str())
                )
                .is_ok()
        );
    }
    // Clients of every tenant still get in, through both proxies.
    for slug in [&t1, &t2, &t3] {
        assert_eq!(value(&env.app(slug).await, "SELECT 1").await, "1");
        assert_eq!(value(&second.connect(slug).await, "SELECT 1").await, "1");
    }
    assert_eq!(value(&held, "SELECT 1").await, "1");
    assert_eq!(value(&held_second, "SELECT 1").await, "1");

    // No key and no backend password in any output.
    let passwords: Vec<String> = env
        .registry
        .tenants()
        .await
        .unwrap()
        .iter()
        .map(|t| {
            current
                .decrypt(
                    &t.backend_password_enc,
                    &Binding::backend_password(t.slug.as_str()),
                )
                .unwrap()
                .expose()
                .to_owned()
        })
        .collect();
    drop(held_second);
    let log = second.stop();
    assert!(
        log.contains("DEBUG"),
        "the second proxy logged at debug level"
    );
    let outputs = [
        rotated.stdout,
        rotated.stderr,
        refused.stdout,
        refused.stderr,
        again.stdout,
        again.stderr,
        retired.stdout,
        retired.stderr,
        log,
    ];
    for secret in all_keys.iter().chain(&old_keys).chain(&passwords) {
        for out in &outputs {
            assert!(!out.contains(secret.as_str()), "a secret was printed");
        }
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one scenario, phase after phase")]
async fn admin_rotation_swaps_the_running_ring_and_reload_picks_up_other_rotations() {
    let (mut env, _file) = env_with_config_file().await;
    let old_keys = key_texts(&env);
    let t1 = env.tenant_with_user("adm").await.slug.to_string();
    let held = env.app(&t1).await;
    let admin = env.admin().await;
    let running = || env.proxy.as_ref().unwrap().state().admin.key.ring();
    let mut printed = Vec::new();
    let pools_built = || env.proxy.as_ref().unwrap().state().pools.pools_built();
    let built_before = pools_built();

    let row = admin
        .query_one("ROTATE MASTER KEY", &[])
        .await
        .expect("rotate");
    let (key_id, reencrypted, keys): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    printed.push(key_id.clone());
    assert_eq!((reencrypted, keys), (1, 2));
    assert_eq!(ring_on_disk(&env).current_id().to_string(), key_id);
    // The proxy's own ring changed at once (not at the next re-read).
    assert_eq!(running().current_id().to_string(), key_id);
    assert_eq!(running().len(), 2);
    for (slug, id) in stored_key_ids(&env).await {
        assert_eq!(id.map(|i| i.to_string()), Some(key_id.clone()), "{slug}");
    }
    assert_eq!(value(&held, "SELECT 1").await, "1");
    assert_eq!(value(&env.app(&t1).await, "SELECT 1").await, "1");
    // Re-encryption did not change the password: the tenant's pool (and its backends) stays.
    assert_eq!(pools_built(), built_before, "the pool was not rebuilt");

    // A secret a stale process wrote under the old key blocks RETIRE (55000).
    let stale = tenant_by_stale_process(&env, &old_keys[0], "admstale").await;
    let err = admin
        .simple_query("RETIRE OLD MASTER KEYS")
        .await
        .expect_err("stale secret");
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{err:?}"
    );
    assert_eq!(ring_on_disk(&env).len(), 2);

    let row = admin.query_one("ROTATE MASTER KEY", &[]).await.unwrap();
    let newest: String = row.get(0);
    printed.push(newest.clone());
    assert_eq!(row.get::<_, i64>(1), 2);
    let row = admin
        .query_one("RETIRE OLD MASTER KEYS", &[])
        .await
        .expect("retire");
    assert_eq!(row.get::<_, String>(0), newest);
    assert_eq!(row.get::<_, i64>(1), 2);
    assert_eq!(ring_on_disk(&env).len(), 1);
    assert_eq!(running().len(), 1);
    let created = admin
        .simple_query(&format!("CREATE TENANT {}", unique("admnew")))
        .await
        .expect("create tenant after retire");
    drop(created);
    for slug in [&t1, &stale] {
        assert_eq!(value(&env.app(slug).await, "SELECT 1").await, "1");
    }
    for (slug, id) in stored_key_ids(&env).await {
        assert_eq!(id.map(|i| i.to_string()), Some(newest.clone()), "{slug}");
    }

    // Another instance rotates the shared key file; RELOAD shows and applies the new ring.
    let elsewhere = MasterKey::load(&env.config.secrets).unwrap();
    let done = tenantgate::rekey::rotate(&env.registry, &elsewhere)
        .await
        .unwrap();
    let rows = admin.query("RELOAD", &[]).await.expect("reload");
    let keys_row = rows
        .iter()
        .find(|r| r.get::<_, String>(0) == "secrets.master_keys")
        .expect("RELOAD reports the key ring");
    assert_eq!(
        keys_row.get::<_, String>(2),
        format!("2 key(s), current {}", done.key_id)
    );
    assert!(keys_row.get::<_, bool>(3));
    assert_eq!(running().current_id(), done.key_id);
    assert_eq!(value(&held, "SELECT 1").await, "1");

    // The admin console never shows a key: SHOW CONFIG, the help, the rotation rows.
    let mut shown = String::new();
    for sql in ["SHOW CONFIG", "SHOW HELP", "SHOW ACTIVITY"] {
        for row in query::rows(&admin.simple_query(sql).await.unwrap()) {
            for column in row {
                shown.push_str(&column);
                shown.push('\n');
            }
        }
    }
    assert!(shown.contains("ROTATE MASTER KEY"));
    assert!(shown.contains("admin.rotate_master_key"), "activity log");
    shown.push_str(&printed.join("\n"));
    for key in old_keys.iter().chain(&key_texts(&env)) {
        assert!(!shown.contains(key.as_str()), "a key was shown");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_refuses_a_key_from_the_environment_in_one_line() {
    let (mut env, file) = env_with_config_file().await;
    let key = key_texts(&env).remove(0);
    let before = std::fs::read_to_string(key_file(&env)).unwrap();
    let var = env.config.secrets.master_key_env.clone();
    let run = cli(&file, &["key", "rotate"], &[(&var, &key)]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("secrets.master_key_file"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&var), "{}", run.stderr);
    assert!(!run.stderr.contains(&key) && !run.stdout.contains(&key));
    assert_eq!(std::fs::read_to_string(key_file(&env)).unwrap(), before);
    // Several keys in the variable work for everything else: the first encrypts.
    let other = MasterKey::generate_encoded();
    let slug = unique("envkeys");
    let run = cli(
        &file,
        &["tenant", "create", &slug],
        &[(&var, &format!("{other}, {key}"))],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let stored = stored_key_ids(&env).await;
    let id = stored.iter().find(|(s, _)| *s == slug).unwrap().1;
    assert_eq!(
        id,
        Some(KeyRing::parse(&other, "other").unwrap().current_id())
    );
    env.stop().await;
}
