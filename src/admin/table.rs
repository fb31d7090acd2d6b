//! A virtual table: named, typed columns and rows of values, as the admin console's SHOW
//! commands and SELECTs produce them. Values know their PostgreSQL type (int8, text, bool,
//! float8, timestamptz) so GUI tools and drivers get correct RowDescriptions. This module
//! knows nothing about where rows come from or how they are sent.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Utc};

/// A column's PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ColumnType {
    Int8,
    Float8,
    Text,
    Bool,
    Timestamptz,
}

/// One column of a virtual table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Column {
    pub(super) name: String,
    pub(super) ty: ColumnType,
}

impl Column {
    pub(super) fn new(name: &str, ty: ColumnType) -> Column {
        Column {
            name: name.to_owned(),
            ty,
        }
    }
}

/// One value; `Null` fits any column.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Time(DateTime<Utc>),
}

impl Value {
    pub(super) fn text(s: impl Into<String>) -> Value {
        Value::Text(s.into())
    }

    pub(super) fn opt_text(s: Option<impl Into<String>>) -> Value {
        s.map_or(Value::Null, |s| Value::Text(s.into()))
    }

    /// A count or size; values past i64::MAX (never in practice) saturate.
    pub(super) fn count(n: u64) -> Value {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// SQL comparison: `None` when either side is NULL or the types cannot be compared.
    /// Text compares with times and numbers through their text form, so `WHERE created_at >
    /// '2026-01-01'` and `WHERE pool_size = '5'` work as a person expects.
    pub(super) fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
            (Value::Float(a), Value::Float(b)) => a.partial_cmp(b),
            #[allow(clippy::cast_precision_loss, reason = "comparing counters with floats")]
            (Value::Int(a), Value::Float(b)) => (*a as f64).partial_cmp(b),
            #[allow(clippy::cast_precision_loss, reason = "comparing counters with floats")]
            (Value::Float(a), Value::Int(b)) => a.partial_cmp(&(*b as f64)),
            (Value::Text(a), Value::Text(b)) => Some(a.cmp(b)),
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Time(a), Value::Time(b)) => Some(a.cmp(b)),
            (Value::Time(t), Value::Text(s)) => parse_time(s).map(|s| t.cmp(&s)),
            (Value::Text(s), Value::Time(t)) => parse_time(s).map(|s| s.cmp(t)),
            (Value::Int(_) | Value::Float(_), Value::Text(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|f| self.compare(&Value::Float(f))),
            (Value::Text(s), Value::Int(_) | Value::Float(_)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|f| Value::Float(f).compare(other)),
            (Value::Bool(b), Value::Text(s)) => parse_bool(s).map(|s| b.cmp(&s)),
            (Value::Text(s), Value::Bool(b)) => parse_bool(s).map(|s| s.cmp(b)),
            _ => None,
        }
    }

    /// Ordering for ORDER BY: NULLs last ascending, like PostgreSQL.
    pub(super) fn sort_cmp(&self, other: &Value) -> Ordering {
        match (self.is_null(), other.is_null()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => self.compare(other).unwrap_or(Ordering::Equal),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
            Value::Bool(b) => f.write_str(if *b { "t" } else { "f" }),
            Value::Time(t) => write!(f, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")),
        }
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Columns and rows.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Table {
    pub(super) columns: Vec<Column>,
    pub(super) rows: Vec<Vec<Value>>,
}

impl Table {
    pub(super) fn new(columns: Vec<Column>) -> Table {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    /// Index of a column by (case-insensitive) name.
    pub(super) fn column_index(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_cross_types_the_way_people_write_them() {
        let t = Value::Time(
            DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
        );
        assert_eq!(
            t.compare(&Value::text("2026-01-01")),
            Some(Ordering::Greater)
        );
        assert_eq!(
            Value::Int(5).compare(&Value::text("5")),
            Some(Ordering::Equal)
        );
        assert_eq!(
            Value::Int(5).compare(&Value::Float(4.5)),
            Some(Ordering::Greater)
        );
        assert_eq!(Value::Null.compare(&Value::Int(1)), None);
        assert_eq!(
            Value::Bool(true).compare(&Value::text("on")),
            Some(Ordering::Equal)
        );
        assert_eq!(Value::Null.sort_cmp(&Value::Int(1)), Ordering::Greater);
    }
}
