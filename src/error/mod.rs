//! How an error reaches a client: the one trait every client-facing error implements.
//!
//! Each module keeps its own `thiserror` enum and implements [`ClientFacing`] with an exhaustive
//! match, so a new variant forces a decision about its SQLSTATE and the sentence the client reads.
//! Only `protocol` encodes the ErrorResponse; this module decides nothing about bytes. The
//! SQLSTATE table lives here too (`sqlstate.rs`), so errors depend on nothing else in the crate.
//! Internal detail (hosts, I/O error text, registry errors, secrets) never goes into
//! `client_message`; it goes to the log through `Display` and the source chain.

mod sqlstate;

pub use sqlstate::SqlState;

/// Who failed: drives log levels and, later, metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client sent something wrong (bad packet, wrong password).
    Client,
    /// The tenant's backend server failed or refused.
    Backend,
    /// The registry could not be reached or answered badly.
    Registry,
    /// A configured limit was reached.
    Limit,
    /// Our own bug or an environment failure.
    Internal,
}

/// An error that can be shown to a PostgreSQL client.
pub trait ClientFacing: std::error::Error {
    /// The SQLSTATE the client sees.
    fn sqlstate(&self) -> SqlState;
    /// A sentence written for the client; never internal detail.
    fn client_message(&self) -> String;
    /// Who failed.
    fn kind(&self) -> ErrorKind;
}

/// Logs `err` at a level that follows its kind, with the whole source chain.
pub fn log_error(err: &(dyn ClientFacing + 'static), what: &str) {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    match err.kind() {
        ErrorKind::Client | ErrorKind::Limit => {
            tracing::info!(sqlstate = err.sqlstate().code(), "{what}: {chain}");
        }
        ErrorKind::Backend | ErrorKind::Registry => {
            tracing::warn!(sqlstate = err.sqlstate().code(), "{what}: {chain}");
        }
        ErrorKind::Internal => {
            tracing::error!(sqlstate = err.sqlstate().code(), "{what}: {chain}");
        }
    }
}
