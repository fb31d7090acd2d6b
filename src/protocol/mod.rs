//! The PostgreSQL v3 wire protocol on raw bytes: startup packets, message framing and the
//! messages tenantgate writes itself (with the SQLSTATE table of `error`).
//!
//! It knows nothing about tenants, pools or the registry, and it is the only place that encodes
//! an ErrorResponse.

pub mod frame;
pub mod messages;
pub mod startup;

/// The SQLSTATE table, owned by `error` (re-exported: the messages here are encoded with it).
pub use crate::error::SqlState;
