//! ROTATE MASTER KEY and RETIRE OLD MASTER KEYS: the console's side of `crate::rekey` (which
//! `tenantgate key` uses too), each answering one row. Results name key ids and counts; this
//! module must never put a key in a row, a NOTICE or the activity log.

use super::AdminContext;
use super::error::AdminError;
use super::exec::{Outcome, Progress, log};
use super::table::{Column, ColumnType, Table, Value};

pub(super) fn rotate_columns() -> Vec<Column> {
    vec![
        Column::new("key_id", ColumnType::Text),
        Column::new("reencrypted", ColumnType::Int8),
        Column::new("keys", ColumnType::Int8),
    ]
}

pub(super) fn retire_columns() -> Vec<Column> {
    vec![
        Column::new("key_id", ColumnType::Text),
        Column::new("dropped", ColumnType::Int8),
        Column::new("secrets", ColumnType::Int8),
    ]
}

/// ROTATE MASTER KEY: as `tenantgate key rotate`, and this proxy's ring is swapped at once.
/// One row: the new key's id (never the key), secrets re-encrypted, keys in the file.
pub(super) async fn rotate_master_key(
    ctx: &AdminContext,
    actor: &str,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let done = crate::rekey::rotate(&ctx.registry, &ctx.key).await?;
    progress.say(format!(
        "master key rotated: new key id {}; RETIRE OLD MASTER KEYS once every instance has re-read the key file (RELOAD)",
        done.key_id
    ));
    let detail = format!(
        "key id {}, {} secrets re-encrypted",
        done.key_id, done.reencrypted
    );
    log(ctx, None, actor, "admin.rotate_master_key", Some(&detail)).await;
    let mut table = Table::new(rotate_columns());
    table.rows.push(vec![
        Value::text(done.key_id.to_string()),
        Value::count(u64::try_from(done.reencrypted).unwrap_or(u64::MAX)),
        Value::count(u64::try_from(done.keys).unwrap_or(u64::MAX)),
    ]);
    Ok(Outcome::Rows(table))
}

/// RETIRE OLD MASTER KEYS: as `tenantgate key retire`. One row: the key kept, keys dropped,
/// secrets checked.
pub(super) async fn retire_master_keys(
    ctx: &AdminContext,
    actor: &str,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let done = crate::rekey::retire(&ctx.registry, &ctx.key).await?;
    progress.say(format!(
        "{} old master key(s) dropped; key id {} stays",
        done.dropped, done.key_id
    ));
    let detail = format!("key id {}, {} old keys dropped", done.key_id, done.dropped);
    log(ctx, None, actor, "admin.retire_master_keys", Some(&detail)).await;
    let mut table = Table::new(retire_columns());
    table.rows.push(vec![
        Value::text(done.key_id.to_string()),
        Value::count(u64::try_from(done.dropped).unwrap_or(u64::MAX)),
        Value::count(u64::try_from(done.secrets).unwrap_or(u64::MAX)),
    ]);
    Ok(Outcome::Rows(table))
}
