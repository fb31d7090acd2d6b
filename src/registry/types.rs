//! The registry's domain types: tenant slugs, states and records.

use std::fmt;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes: the longest user name a
/// tenant's user (or an admin user) may have, and the longest name worth a registry lookup.
pub const MAX_NAME_BYTES: usize = 63;

/// A tenant's slug: lowercase letters, digits and hyphens, 1 to 63 characters, not starting
/// with a hyphen. It is the database name clients connect with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantSlug(String);

impl TenantSlug {
    /// Validates a slug.
    pub fn parse(s: &str) -> Option<TenantSlug> {
        let ok = (1..=MAX_NAME_BYTES).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| TenantSlug(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's lifecycle state. Only `Active` tenants accept clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantState {
    Provisioning,
    Migrating,
    Active,
    Suspended,
    Failed,
    Deleted,
}

impl TenantState {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Provisioning => "provisioning",
            TenantState::Migrating => "migrating",
            TenantState::Active => "active",
            TenantState::Suspended => "suspended",
            TenantState::Failed => "failed",
            TenantState::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<TenantState> {
        Some(match s {
            "provisioning" => TenantState::Provisioning,
            "migrating" => TenantState::Migrating,
            "active" => TenantState::Active,
            "suspended" => TenantState::Suspended,
            "failed" => TenantState::Failed,
            "deleted" => TenantState::Deleted,
            _ => return None,
        })
    }
}

impl fmt::Display for TenantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tenant as the registry holds it. The backend password stays encrypted here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    pub slug: TenantSlug,
    pub display_name: Option<String>,
    pub state: TenantState,
    pub plan: String,
    /// Name of the backend server (a `[[server]]` in the config).
    pub server: String,
    pub database: String,
    pub backend_role: String,
    pub backend_password_enc: Vec<u8>,
    pub error_message: Option<String>,
    /// Per-tenant overrides of the plan's values, as the registry's JSON text.
    pub overrides: String,
    /// The row's revision (registry migration 4): every insert and update of the row takes
    /// a larger number, assigned after the row is locked, so of two reads of one tenant the
    /// one with the larger revision saw the newer row, whichever registry connection served it
    /// and whenever it finished. A pool is never built from an older revision than one already
    /// seen (a client still holding an old record must not flip its tenant's pool back).
    pub revision: i64,
    /// Adopted by REGISTER TENANT: DROP TENANT keeps its database and role unless asked.
    pub registered: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_rules() {
        for good in ["a", "acme", "acme-2", "0x", &"a".repeat(63)] {
            assert!(TenantSlug::parse(good).is_some(), "{good}");
        }
        for bad in ["", "-a", "Acme", "a_b", "a b", "a.b", &"a".repeat(64), "ä"] {
            assert!(TenantSlug::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn state_round_trip() {
        for s in [
            TenantState::Provisioning,
            TenantState::Migrating,
            TenantState::Active,
            TenantState::Suspended,
            TenantState::Failed,
            TenantState::Deleted,
        ] {
            assert_eq!(TenantState::parse(s.as_str()), Some(s));
        }
    }
}
