//! `[registry]`: where the registry lives and how its records are cached, with the defaults.
//! `crate::config` gathers it into the whole config; this module must not open connections.

use serde::{Deserialize, Serialize};

/// `[registry]`: where the registry lives and how its records are cached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Connection string of the registry database (URI or `key=value` form). The environment
    /// variable `TENANTGATE_REGISTRY_URL` overrides it. Required. Restart to change.
    pub url: String,
    /// Connections tenantgate keeps to the registry. Default 4.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Give up on a registry query after this many milliseconds. Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a tenant record stays cached, in seconds. Changes are also pushed by
    /// LISTEN/NOTIFY, so this is only the safety net. Default 60.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_seconds: u64,
    /// How long a cached tenant record or verifier may keep serving, in seconds, when the
    /// registry cannot be reached to refresh it; cached tenants stay up through a registry
    /// outage this long. Default 3600.
    #[serde(default = "default_stale_ttl")]
    pub stale_ttl_seconds: u64,
    /// How long an unknown slug is remembered as unknown, in seconds. Default 2.
    #[serde(default = "default_negative_ttl")]
    pub negative_cache_ttl_seconds: u64,
    /// Most tenant records kept in the cache. Default 100000.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
}

fn default_pool_size() -> u32 {
    4
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_cache_ttl() -> u64 {
    60
}
fn default_stale_ttl() -> u64 {
    3600
}
fn default_negative_ttl() -> u64 {
    2
}
fn default_cache_capacity() -> u64 {
    100_000
}
