//! SHOW STATS and the `stats` table: each tenant's usage counters since start-up (clients,
//! transactions, queries, bytes, wait time, backend connects, evictions) as `crate::stats`
//! keeps them, plus a derived average wait per transaction. Read-only.

use super::AdminContext;
use super::table::{Column, ColumnType, Value};
use crate::stats::Counters;

pub(super) fn columns() -> Vec<Column> {
    let mut columns = vec![Column::new("tenant", ColumnType::Text)];
    columns.extend(
        Counters::COLUMNS
            .iter()
            .map(|name| Column::new(name, ColumnType::Int8)),
    );
    columns.push(Column::new("avg_wait_us", ColumnType::Int8));
    columns
}

pub(super) fn rows(ctx: &AdminContext, tenant: Option<&str>) -> Vec<Vec<Value>> {
    ctx.stats
        .snapshot()
        .into_iter()
        .filter(|row| tenant.is_none_or(|t| row.slug.as_str() == t))
        .map(|row| {
            let c = row.counters;
            let mut values = vec![Value::text(row.slug.as_str())];
            values.extend(c.values().into_iter().map(Value::count));
            values.push(Value::count(
                c.wait_us.checked_div(c.transactions).unwrap_or(0),
            ));
            values
        })
        .collect()
}
