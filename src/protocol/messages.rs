//! Encoders for the backend messages tenantgate writes itself (ErrorResponse, authentication,
//! ParameterStatus, BackendKeyData, ReadyForQuery, NegotiateProtocolVersion). Frontend
//! messages to a backend come from `postgres-protocol` (`message::frontend`), not from here.
//!
//! Each function appends one whole message to a buffer; none of them allocates beyond it.

use bytes::{BufMut, BytesMut};

use super::SqlState;

/// ErrorResponse / NoticeResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Appends a message: tag, then a length patched in after `body` has written.
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = u32::try_from(buf.len() - at).unwrap_or(u32::MAX);
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early and desynchronise the client: drop it.
    buf.extend(s.bytes().filter(|b| *b != 0));
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE and message (and an optional hint).
pub fn error_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    text: &str,
    hint: Option<&str>,
) {
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity.as_str());
        b.put_u8(b'V');
        cstr(b, severity.as_str());
        b.put_u8(b'C');
        cstr(b, code.code());
        b.put_u8(b'M');
        cstr(b, text);
        if let Some(hint) = hint {
            b.put_u8(b'H');
            cstr(b, hint);
        }
        b.put_u8(0);
    });
}

pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: the newest minor version we speak and the `_pq_.` options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unrecognized: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
        for opt in unrecognized {
            cstr(b, opt);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_bytes() {
        let mut buf = BytesMut::new();
        error_response(
            &mut buf,
            Severity::Fatal,
            SqlState::INVALID_PASSWORD,
            "no",
            None,
        );
        let expected: &[u8] = b"E\0\0\0\x1eSFATAL\0VFATAL\0C28P01\0Mno\0\0";
        assert_eq!(&buf[..], expected);
    }

    #[test]
    fn ready_for_query_bytes() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'I');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
    }

    #[test]
    fn nul_in_text_is_dropped() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "a\0b", "c");
        assert_eq!(&buf[..], b"S\0\0\0\x09ab\0c\0");
    }
}
