//! SHOW STATS: per-tenant usage counters as a virtual table.

use super::AdminContext;
use super::table::{Column, ColumnType, Value};

pub(super) fn columns() -> Vec<Column> {
    vec![Column::new("tenant", ColumnType::Text)]
}

pub(super) fn rows(_ctx: &AdminContext, _tenant: Option<&str>) -> Vec<Vec<Value>> {
    Vec::new()
}
