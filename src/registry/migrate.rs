//! Applies the registry's own schema (`migrations/registry/`, embedded in the binary) with a
//! ledger, under an advisory lock so two instances starting together do not race. A second start
//! changes nothing; a file whose checksum no longer matches the ledger is an error.

use sha2::{Digest, Sha256};

use super::RegistryError;

/// The registry migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/registry/0001_init.sql"),
    ),
    (
        2,
        "usage",
        include_str!("../../migrations/registry/0002_usage.sql"),
    ),
    (
        3,
        "client_cert",
        include_str!("../../migrations/registry/0003_client_cert.sql"),
    ),
    (
        4,
        "revision",
        include_str!("../../migrations/registry/0004_revision.sql"),
    ),
    (
        5,
        "mock_scram_key",
        include_str!("../../migrations/registry/0005_mock_scram_key.sql"),
    ),
    (
        6,
        "registered",
        include_str!("../../migrations/registry/0006_registered.sql"),
    ),
    (
        7,
        "instances",
        include_str!("../../migrations/registry/0007_instances.sql"),
    ),
    (
        8,
        "budget_shares",
        include_str!("../../migrations/registry/0008_budget_shares.sql"),
    ),
];

/// Arbitrary advisory lock key for registry migrations ("tgregmig").
const LOCK_KEY: i64 = 0x7467_7265_676d_6967;

/// What `apply` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub versions: Vec<i32>,
}

pub fn checksum(sql: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0xf)]));
        hex
    })
}

/// Applies pending migrations in one transaction.
pub async fn apply(client: &mut tokio_postgres::Client) -> Result<Applied, RegistryError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    // IF NOT EXISTS would log a NOTICE on every start.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tenantgate_schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let rows = tx
        .query(
            "SELECT version, checksum FROM tenantgate_schema_migrations",
            &[],
        )
        .await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let sum = checksum(sql);
        let done = rows.iter().find(|r| r.get::<_, i32>(0) == *version);
        if let Some(row) = done {
            let recorded: String = row.get(1);
            if recorded != sum {
                return Err(RegistryError::MigrationChanged {
                    version: *version,
                    name: (*name).to_owned(),
                });
            }
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tenantgate_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &sum],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(Applied { versions: applied })
}
