//! tenantgate: a PostgreSQL wire-protocol proxy for SaaS products that give every tenant its own
//! database. Clients connect with the tenant's slug as the database name; tenantgate
//! authenticates them against its registry and relays them to a pooled connection to that
//! tenant's database.
//!
//! Follow one connection: `server` (listener, startup, client task) → `auth` (SCRAM) →
//! `registry` (tenant record, cached) → `pool` (tenant pool, backend connection) → `session`
//! (settings, relay, release). `instance` registers this process among the instances sharing
//! the registry and forwards cancel requests between them. `stats` keeps each tenant's usage counters, `provision`
//! manages tenants, `crypto` keeps secrets (`rekey` rotates their master key), `config` gathers the configuration, `protocol` owns
//! the bytes, `localpg` starts private PostgreSQL servers for the quickstart, tests and
//! benchmarks.

pub mod admin;
pub mod auth;
pub mod clients;
pub mod config;
pub mod crypto;
pub mod error;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod handover;
pub mod instance;
pub mod localpg;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod provision;
pub mod quickstart;
pub mod registry;
pub mod rekey;
pub mod server;
pub mod session;
pub mod signals;
pub mod stats;
pub mod tls;

#[cfg(test)]
mod module_graph;
