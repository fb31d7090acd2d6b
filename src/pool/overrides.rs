//! The keys of a plan a tenant may override one by one (`ALTER TENANT slug SET (key = value)`),
//! and the text each accepts, turned into the JSON value the registry's `overrides` object
//! stores. The keys are exactly [`PlanConfig`]'s fields (a unit test keeps the two lists equal),
//! so whatever a `[plans.NAME]` section may set, an override may set, and nothing else.
//!
//! This module only checks and converts values; it must not read or write the registry, and
//! it does not decide what a value does (`TenantLimits::apply` does).

use super::PoolMode;

/// What kind of value a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A count that must be at least 1.
    Positive32,
    /// A count, 0 allowed (0: no limit).
    Count32,
    /// Milliseconds, 0 allowed (0: none, or a ceiling lifted).
    Millis,
    /// Milliseconds that must be at least 1.
    PositiveMillis,
    /// `session` or `transaction`.
    Mode,
}

/// Every key, in `PlanConfig`'s order, with its kind.
const KEYS: &[(&str, Kind)] = &[
    ("pool_size", Kind::Positive32),
    ("max_clients", Kind::Count32),
    ("mode", Kind::Mode),
    ("statement_timeout_ms", Kind::Millis),
    ("checkout_timeout_ms", Kind::PositiveMillis),
    ("max_statement_ms", Kind::Millis),
    ("max_idle_in_transaction_ms", Kind::Millis),
    ("max_client_idle_ms", Kind::Millis),
];

/// PgBouncer's name, accepted wherever `checkout_timeout_ms` is (as in the config).
const ALIASES: &[(&str, &str)] = &[("query_wait_timeout_ms", "checkout_timeout_ms")];

/// Why an override was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("unknown plan setting \"{0}\" (settings: {known})", known = known_keys())]
    UnknownKey(String),
    #[error("invalid value for {key}: \"{value}\" is not a whole number")]
    NotANumber { key: &'static str, value: String },
    #[error("invalid value for {key}: {value} is out of range ({range})")]
    OutOfRange {
        key: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("invalid value for mode: \"{0}\" (use session or transaction)")]
    BadMode(String),
}

/// The keys, comma-separated, for messages.
pub fn known_keys() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

/// The canonical name of an override key (an alias becomes the name it stands for), or
/// `UnknownKey`.
pub fn override_key(key: &str) -> Result<&'static str, OverrideError> {
    let key_lower = key.to_ascii_lowercase();
    let canonical = ALIASES
        .iter()
        .find(|(alias, _)| *alias == key_lower)
        .map_or(key_lower.as_str(), |(_, to)| *to);
    KEYS.iter()
        .find(|(k, _)| *k == canonical)
        .map(|(k, _)| *k)
        .ok_or_else(|| OverrideError::UnknownKey(key.to_owned()))
}

/// Every spelling of a canonical key as the registry's JSON may hold it: the key and its
/// aliases. Setting or resetting a key removes them all, so the object never holds two
/// spellings of one setting (which serde would refuse, dropping every override).
pub fn spellings(key: &'static str) -> Vec<&'static str> {
    let mut all = vec![key];
    all.extend(
        ALIASES
            .iter()
            .filter(|(_, to)| *to == key)
            .map(|(alias, _)| *alias),
    );
    all
}

/// The key's canonical name and the JSON value `text` stands for, checked as the config
/// checks a plan's value.
pub fn override_value(
    key: &str,
    text: &str,
) -> Result<(&'static str, serde_json::Value), OverrideError> {
    let key = override_key(key)?;
    let kind = KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(Kind::Millis, |(_, kind)| *kind);
    let text = text.trim();
    let value = match kind {
        Kind::Mode => {
            let mode = match text.to_ascii_lowercase().as_str() {
                "session" => PoolMode::Session,
                "transaction" => PoolMode::Transaction,
                _ => return Err(OverrideError::BadMode(text.to_owned())),
            };
            serde_json::Value::from(mode.as_str())
        }
        Kind::Positive32 => serde_json::Value::from(number(key, text, 1, u64::from(u32::MAX))?),
        Kind::Count32 => serde_json::Value::from(number(key, text, 0, u64::from(u32::MAX))?),
        Kind::Millis => serde_json::Value::from(number(key, text, 0, MAX_MILLIS)?),
        Kind::PositiveMillis => serde_json::Value::from(number(key, text, 1, MAX_MILLIS)?),
    };
    Ok((key, value))
}

/// The most milliseconds a value may take: PostgreSQL's `statement_timeout` is an int4 of
/// milliseconds, and no ceiling needs more than that (about 24 days).
const MAX_MILLIS: u64 = i32::MAX as u64;

fn number(key: &'static str, text: &str, min: u64, max: u64) -> Result<u64, OverrideError> {
    let range = match (min, max) {
        (1, MAX_MILLIS) => "1 to 2147483647",
        (0, MAX_MILLIS) => "0 to 2147483647",
        (1, _) => "1 to 4294967295",
        _ => "0 to 4294967295",
    };
    let digits = text.strip_prefix('+').unwrap_or(text);
    if let Some(negative) = digits.strip_prefix('-') {
        if !negative.is_empty() && negative.bytes().all(|b| b.is_ascii_digit()) {
            return Err(OverrideError::OutOfRange {
                key,
                value: text.to_owned(),
                range,
            });
        }
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OverrideError::NotANumber {
            key,
            value: text.to_owned(),
        });
    }
    match digits.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(OverrideError::OutOfRange {
            key,
            value: text.to_owned(),
            range,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PlanConfig;

    #[test]
    fn the_keys_are_exactly_the_plan_fields() {
        let full = PlanConfig {
            pool_size: Some(1),
            max_clients: Some(1),
            mode: Some(PoolMode::Session),
            statement_timeout_ms: Some(1),
            checkout_timeout_ms: Some(1),
            max_statement_ms: Some(1),
            max_idle_in_transaction_ms: Some(1),
            max_client_idle_ms: Some(1),
        };
        let json = serde_json::to_value(&full).unwrap();
        let fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
        let mut sorted = fields.clone();
        sorted.sort_unstable();
        keys.sort_unstable();
        assert_eq!(sorted, keys);
    }

    #[test]
    fn every_accepted_value_is_one_a_plan_reads() {
        for (key, text) in [
            ("pool_size", "8"),
            ("max_clients", "0"),
            ("MODE", "Transaction"),
            ("statement_timeout_ms", "5000"),
            ("query_wait_timeout_ms", "250"),
            ("max_statement_ms", "0"),
            ("max_idle_in_transaction_ms", "+10"),
            ("max_client_idle_ms", "2147483647"),
        ] {
            let (key, value) = override_value(key, text).unwrap();
            let object = serde_json::json!({ key: value });
            let plan: PlanConfig = serde_json::from_value(object).unwrap();
            assert_ne!(plan, PlanConfig::default(), "{key}");
        }
        assert_eq!(
            override_value("mode", "transaction").unwrap().1,
            serde_json::Value::from("transaction")
        );
        assert_eq!(
            override_key("QUERY_WAIT_TIMEOUT_MS"),
            Ok("checkout_timeout_ms")
        );
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        assert_eq!(
            override_value("pool_sise", "1"),
            Err(OverrideError::UnknownKey("pool_sise".to_owned()))
        );
        assert!(matches!(
            override_value("pool_size", "eight"),
            Err(OverrideError::NotANumber {
                key: "pool_size",
                ..
            })
        ));
        assert!(matches!(
            override_value("pool_size", "1.5"),
            Err(OverrideError::NotANumber { .. })
        ));
        for (key, text) in [
            ("pool_size", "0"),
            ("pool_size", "-3"),
            ("pool_size", "4294967296"),
            ("checkout_timeout_ms", "0"),
            ("statement_timeout_ms", "2147483648"),
            ("max_clients", "99999999999999999999999"),
        ] {
            assert!(
                matches!(
                    override_value(key, text),
                    Err(OverrideError::OutOfRange { .. })
                ),
                "{key} = {text}"
            );
        }
        assert_eq!(
            override_value("mode", "statement"),
            Err(OverrideError::BadMode("statement".to_owned()))
        );
        let message = OverrideError::UnknownKey("x".to_owned()).to_string();
        assert!(message.contains("\"x\"") && message.contains("pool_size"));
    }
}
