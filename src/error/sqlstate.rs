//! The SQLSTATE codes tenantgate itself sends, by name (PostgreSQL appendix A).

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const CONNECTION_EXCEPTION: SqlState = SqlState("08000");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const RESERVED_NAME: SqlState = SqlState("42939");
    pub const NAME_TOO_LONG: SqlState = SqlState("42622");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState("25P03");
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    pub const UNDEFINED_TABLE: SqlState = SqlState("42P01");
    pub const UNDEFINED_COLUMN: SqlState = SqlState("42703");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const DUPLICATE_OBJECT: SqlState = SqlState("42710");
    pub const INVALID_TEXT_REPRESENTATION: SqlState = SqlState("22P02");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");

    /// The code as PostgreSQL writes it.
    pub fn code(self) -> &'static str {
        self.0
    }
}
