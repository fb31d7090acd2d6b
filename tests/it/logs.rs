//! The log as a collector reads it: `tenantgate serve` with `[proxy] log_format = "json"`
//! through a whole session (logins good and bad, a query, an admin command, a stop), every
//! line of its stderr parsed as JSON (issue 14).

use crate::common;

use std::time::Duration;

use common::serve::ServeProcess;
use serde_json::Value;
use tenantgate::config::LogFormat;
use tokio_postgres::error::SqlState;

/// The fields of the `client` span (connection id, `peer`, `user`, `tenant`) a line was
/// logged in, from its span list.
fn client_span(line: &Value) -> Option<&Value> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|span| span["name"] == "client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_parses_and_carries_the_clients_span() {
    let env = common::TestEnv::start().await;
    let t = env.tenant_with_user("jsonlog").await;
    let slug = t.slug.as_str();
    let mut serve = ServeProcess::start(
        &env,
        |c| {
            c.proxy.log_format = LogFormat::Json;
            // Info shows the audit lines; tenantgate's debug lines show the session's end.
            c.proxy.log_level = "info,tenantgate=debug".to_owned();
        },
        &[],
    );
    serve.wait_accepting().await;

    let app = serve.connect(slug, "app", "secret").await.unwrap();
    let one: i32 = app.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(app);
    let wrong = serve.connect(slug, "app", "wrong").await.unwrap_err();
    assert_eq!(wrong.code(), Some(&SqlState::INVALID_PASSWORD));
    let admin = serve
        .connect(&env.config.admin.database, "root", "root-secret")
        .await
        .unwrap();
    admin.simple_query("SHOW TENANTS").await.unwrap();
    drop(admin);
    // The sessions' last lines are written before the process exits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve.signal("TERM");
    let status = serve.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    let text = serve.log_text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5, "{text}");
    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["target"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let audit = |outcome: &str, user: &str| {
        lines
            .iter()
            .find(|l| {
                l["target"] == "tenantgate::audit"
                    && l["fields"]["event"] == "login"
                    && l["fields"]["outcome"] == outcome
                    && l["fields"]["user"] == user
            })
            .unwrap_or_else(|| panic!("no audit line for {user} {outcome}: {text}"))
    };
    let ok = audit("ok", "app");
    assert_eq!(ok["fields"]["tenant"], slug);
    assert_eq!(ok["level"], "INFO");
    // Inside the client's span: the span's own fields say who and from where.
    let span = client_span(ok).unwrap_or_else(|| panic!("no client span: {ok}"));
    assert_eq!(span["user"], "app");
    assert!(
        span["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{span}"
    );
    assert_eq!(ok["span"]["name"], "client", "{ok}");
    audit("failed auth", "app");
    audit("ok", "root");
    let command = lines
        .iter()
        .find(|l| l["target"] == "tenantgate::audit" && l["fields"]["event"] == "admin command")
        .unwrap_or_else(|| panic!("no admin command audit line: {text}"));
    assert_eq!(client_span(command).unwrap()["user"], "root", "{command}");

    // Once the tenant is known, every line of that client's task names it too.
    let in_session: Vec<&Value> = lines
        .iter()
        .filter(|l| client_span(l).is_some_and(|s| s["tenant"] == slug))
        .collect();
    assert!(!in_session.is_empty(), "no line inside the session: {text}");
    for line in in_session {
        let span = client_span(line).unwrap();
        assert_eq!(span["user"], "app", "{line}");
        assert!(span["peer"].is_string() && span["id"].is_u64(), "{line}");
    }
}
