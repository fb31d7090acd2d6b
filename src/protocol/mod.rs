//! The PostgreSQL v3 wire protocol on raw bytes: startup packets, message framing, the messages
//! tenantgate writes itself, and the SQLSTATE table.
//!
//! It knows nothing about tenants, pools or the registry, and it is the only place that encodes
//! an ErrorResponse.

pub mod frame;
pub mod messages;
mod sqlstate;
pub mod startup;

pub use sqlstate::SqlState;
