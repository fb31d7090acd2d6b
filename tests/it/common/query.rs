//! What a query returns, read the short way: the first value of a simple-protocol answer, of a
//! statement over either protocol, the session's database; and a failed query as a test
//! report shows it.

use std::time::Duration;

use tokio_postgres::types::FromSqlOwned;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The first column of the first row among simple-protocol messages (NULL reads as "").
pub fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_owned()),
        _ => None,
    })
}

/// Every row among simple-protocol messages, each column as text (NULL reads as "").
pub fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The first value `sql` returns over the simple protocol ("" without a row), or its error.
pub async fn try_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let rows = client.simple_query(sql).await?;
    Ok(first_value(&rows).unwrap_or_default())
}

/// The first value `sql` returns over the simple protocol; panics if it fails, returns no
/// row, or takes longer than 10 s (a stuck backend).
pub async fn value(client: &Client, sql: &str) -> String {
    let rows = tokio::time::timeout(Duration::from_secs(10), client.simple_query(sql))
        .await
        .expect("no answer within 10 s: the backend is stuck")
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    first_value(&rows).expect("a row")
}

/// The first column of the one row `sql` returns over the extended protocol; panics if it
/// fails or does not return exactly one row.
pub async fn query_value<T: FromSqlOwned>(client: &Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// `SELECT current_database()`, over the extended protocol.
pub async fn current_database(client: &Client) -> String {
    query_value(client, "SELECT current_database()").await
}

/// An error as a test report shows it: SQLSTATE and message, or what broke.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("no SQLSTATE ({e})"),
    }
}
