//! The integration tests: one binary, one throwaway PostgreSQL cluster shared by every module
//! (tests that restart, crash or reconfigure a server start a private one), a module per area.
//! Helpers live in `common`; `cargo test --test it <area>::` runs one area.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

mod admin;
mod admin_everywhere;
mod backend_auth;
mod backend_tls;
mod budget;
mod cli;
mod faults;
mod handover;
mod hardening;
mod hostile;
mod instances;
mod integrity;
mod key_rotation;
mod logs;
mod metrics;
mod migrations;
mod proxy_protocol;
mod registry_changes;
mod registry_outage;
mod routing;
mod scale;
mod session;
mod shared_budget;
mod shared_throttle;
mod signals;
mod stats;
mod tls;
mod tls_ops;
mod tools;
mod transaction;
mod upgrade;
