//! What a person sees: psql and pgbench run as subprocesses through the proxy.

use crate::common;

use std::process::Command;

use common::TestEnv;
use common::psql::Psql;

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run the client program");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bin(name: &str) -> std::path::PathBuf {
    common::cluster().bindir().join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sees_each_tenants_own_rows() {
    let env = TestEnv::start().await;
    let a = env.tenant_with_user("psql-a").await;
    let b = env.tenant_with_user("psql-b").await;
    for (t, word) in [(&a, "alpha"), (&b, "beta")] {
        let uri = env.uri(t.slug.as_str(), "app", "secret");
        let sql = format!("CREATE TABLE words (w text); INSERT INTO words VALUES ('{word}');");
        let out = Psql::new(&uri).run(&sql).await;
        assert!(out.ok, "{}", out.stderr);
    }
    let uri = env.uri(a.slug.as_str(), "app", "secret");
    let out = Psql::new(&uri)
        .run_all(&[
            "SELECT current_database() || ':' || string_agg(w, ',') FROM words",
            "SHOW client_encoding",
            "SHOW application_name",
        ])
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        vec![format!("{}:alpha", a.database).as_str(), "UTF8", "psql"]
    );

    // A wrong password reads as PostgreSQL's own message.
    let bad = env.uri(a.slug.as_str(), "app", "nope");
    let out = Psql::new(&bad).run("SELECT 1").await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("password authentication failed for user \"app\""),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_with_twenty_clients_has_no_failed_transactions() {
    let env = TestEnv::start_with(|c| c.pool.pool_size = 20).await;
    let t = env.tenant_with_user("bench").await;
    let uri = env.uri(t.slug.as_str(), "app", "secret");
    let init_uri = uri.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        run(Command::new(bin("pgbench")).args(["-i", "-s", "1", "-q", &init_uri]))
    })
    .await
    .unwrap();
    assert!(ok, "pgbench -i failed: {err}");
    for mode in ["simple", "extended", "prepared"] {
        let uri = uri.clone();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            run(Command::new(bin("pgbench")).args([
                "-S", "-c", "20", "-j", "2", "-T", "3", "-M", mode, "-n", &uri,
            ]))
        })
        .await
        .unwrap();
        assert!(ok, "pgbench -M {mode} failed: {err}\n{out}");
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench -M {mode}: {out}"
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            processed > 100,
            "pgbench -M {mode} did almost nothing: {out}"
        );
    }
}
