//! The first packet of a connection: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage,
//! or, between tenantgate instances only, a forwarded CancelRequest (`crate::instance` owns
//! what it means; here it is only bytes).
//!
//! Startup packets have no tag: a 4-byte length that counts itself, then a 4-byte code. The length
//! is bounded before anything is allocated. Parsing is a pure function over bytes so it can be
//! property-tested; `read_first_packet` only adds the reading.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{ClientFacing, ErrorKind};

use super::SqlState;

pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// A CancelRequest one tenantgate instance forwards to the instance that issued the key:
/// "TG" "FC" as a request code. PostgreSQL uses 1234.5678 to 1234.5680 for its requests and
/// 3.x for startup; it answers this one "unsupported frontend protocol", so the code can never
/// be taken for a PostgreSQL request. Body: pid, secret, then a MAC of [`FORWARD_MAC_BYTES`].
pub const FORWARDED_CANCEL_CODE: i32 = 0x5447_4643;
/// Bytes of the MAC that ends a forwarded CancelRequest (HMAC-SHA-256).
pub const FORWARD_MAC_BYTES: usize = 32;
/// Bytes of a whole forwarded CancelRequest: length, code, pid, secret, MAC.
pub const FORWARDED_CANCEL_BYTES: usize = 16 + FORWARD_MAC_BYTES;
/// Protocol 3.0 as a StartupMessage version number.
pub const PROTOCOL_3_0: i32 = 196_608;

/// What a connection opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A CancelRequest forwarded by another tenantgate instance, with its MAC (unchecked).
    ForwardedCancel {
        pid: i32,
        secret: i32,
        mac: [u8; FORWARD_MAC_BYTES],
    },
    Startup(StartupMessage),
}

/// The bytes of a forwarded CancelRequest.
pub fn forwarded_cancel(
    pid: i32,
    secret: i32,
    mac: &[u8; FORWARD_MAC_BYTES],
) -> [u8; FORWARDED_CANCEL_BYTES] {
    let mut out = [0u8; FORWARDED_CANCEL_BYTES];
    let len = i32::try_from(FORWARDED_CANCEL_BYTES).unwrap_or(i32::MAX);
    let parts = [len, FORWARDED_CANCEL_CODE, pid, secret];
    for (chunk, part) in out.chunks_exact_mut(4).zip(parts) {
        chunk.copy_from_slice(&part.to_be_bytes());
    }
    if let Some(tail) = out.get_mut(16..) {
        tail.copy_from_slice(mac);
    }
    out
}

/// A protocol 3.x StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The minor version the client asked for (3.x).
    pub minor_version: i32,
    /// Parameters in the order sent, `_pq_.` protocol options included.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("startup packet length {0} is out of bounds")]
    BadLength(i64),
    #[error("startup packet is malformed: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: i32, minor: i32 },
    #[error("client closed the connection during startup")]
    Eof,
    #[error("reading the startup packet failed")]
    Io(#[source] std::io::Error),
}

impl ClientFacing for StartupError {
    fn sqlstate(&self) -> SqlState {
        match self {
            StartupError::BadLength(_)
            | StartupError::Malformed(_)
            | StartupError::Eof
            | StartupError::Io(_) => SqlState::PROTOCOL_VIOLATION,
            StartupError::UnsupportedProtocol { .. } => SqlState::FEATURE_NOT_SUPPORTED,
        }
    }

    fn client_message(&self) -> String {
        match self {
            StartupError::BadLength(_) => "invalid length of startup packet".to_owned(),
            StartupError::Malformed(what) => format!("invalid startup packet: {what}"),
            StartupError::UnsupportedProtocol { major, minor } => {
                format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
            }
            StartupError::Eof | StartupError::Io(_) => "incomplete startup packet".to_owned(),
        }
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Client
    }
}

/// Reads one startup-phase packet, refusing lengths outside `8..=max_bytes`.
pub async fn read_first_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_bytes: usize,
) -> Result<FirstPacket, StartupError> {
    // Every first packet is at least 8 bytes (length and code), and an SSLRequest is exactly
    // that: usually one read for it, never a byte past it (what follows belongs to the TLS
    // handshake, CVE-2021-23222). The length is judged as soon as it is here.
    let mut head = [0u8; 8];
    let mut got = 0;
    let mut total = None;
    while got < head.len() {
        let Some(free) = head.get_mut(got..) else {
            break;
        };
        let n = stream.read(free).await.map_err(StartupError::Io)?;
        if n == 0 {
            return Err(StartupError::Eof);
        }
        got += n;
        if total.is_none() && got >= 4 {
            let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            total = Some(
                usize::try_from(len)
                    .ok()
                    .filter(|l| (8..=max_bytes).contains(l))
                    .ok_or(StartupError::BadLength(i64::from(len)))?,
            );
        }
    }
    let total = total.ok_or(StartupError::Eof)?;
    let mut body = vec![0u8; total - 4];
    let (body_code, rest) = body.split_at_mut(4);
    body_code.copy_from_slice(&head[4..]);
    if !rest.is_empty() {
        stream.read_exact(rest).await.map_err(eof_or_io)?;
    }
    parse_first_packet(&body)
}

fn eof_or_io(e: std::io::Error) -> StartupError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StartupError::Eof
    } else {
        StartupError::Io(e)
    }
}

/// Parses a startup packet's body (everything after the length word).
pub fn parse_first_packet(body: &[u8]) -> Result<FirstPacket, StartupError> {
    let (code, rest) = split_i32(body).ok_or(StartupError::Malformed("missing code"))?;
    match code {
        SSL_REQUEST_CODE => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let (pid, rest) = split_i32(rest).ok_or(StartupError::Malformed("short cancel"))?;
            let (secret, _) = split_i32(rest).ok_or(StartupError::Malformed("short cancel"))?;
            Ok(FirstPacket::Cancel { pid, secret })
        }
        FORWARDED_CANCEL_CODE => {
            let short = || StartupError::Malformed("short forwarded cancel");
            let (pid, rest) = split_i32(rest).ok_or_else(short)?;
            let (secret, rest) = split_i32(rest).ok_or_else(short)?;
            let (mac, _) = rest
                .split_first_chunk::<FORWARD_MAC_BYTES>()
                .ok_or_else(short)?;
            Ok(FirstPacket::ForwardedCancel {
                pid,
                secret,
                mac: *mac,
            })
        }
        version => {
            let (major, minor) = (version >> 16, version & 0xffff);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(rest)?;
            Ok(FirstPacket::Startup(StartupMessage {
                minor_version: minor,
                params,
            }))
        }
    }
}

fn split_i32(bytes: &[u8]) -> Option<(i32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*head), rest))
}

/// name\0value\0 ... \0
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let (name, after) = split_cstr(rest)?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Malformed("bytes after the final terminator"));
            }
            return Ok(params);
        }
        let (value, after) = split_cstr(after)?;
        params.push((name.to_owned(), value.to_owned()));
        rest = after;
    }
}

fn split_cstr(bytes: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let nul = bytes
        .iter()
        .position(|b| *b == 0)
        .ok_or(StartupError::Malformed("missing terminator"))?;
    let (s, rest) = bytes.split_at(nul);
    let s = std::str::from_utf8(s).map_err(|_| StartupError::Malformed("invalid UTF-8"))?;
    Ok((s, rest.get(1..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn startup_body(params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = PROTOCOL_3_0.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn parses_startup() {
        let body = startup_body(&[("user", "alice"), ("database", "acme")]);
        let FirstPacket::Startup(msg) = parse_first_packet(&body).unwrap() else {
            panic!("not startup")
        };
        assert_eq!(msg.get("user"), Some("alice"));
        assert_eq!(msg.get("database"), Some("acme"));
        assert_eq!(msg.minor_version, 0);
    }

    #[test]
    fn parses_special_codes() {
        assert_eq!(
            parse_first_packet(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            FirstPacket::SslRequest
        );
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            parse_first_packet(&cancel).unwrap(),
            FirstPacket::Cancel { pid: 7, secret: 9 }
        );
    }

    #[test]
    fn a_forwarded_cancel_reads_back_as_written() {
        let mac = [0xab; FORWARD_MAC_BYTES];
        let bytes = forwarded_cancel(42, -7, &mac);
        assert_eq!(bytes[..4], [0, 0, 0, 48]);
        assert_eq!(
            parse_first_packet(&bytes[4..]).unwrap(),
            FirstPacket::ForwardedCancel {
                pid: 42,
                secret: -7,
                mac
            }
        );
        assert!(parse_first_packet(&bytes[4..47]).is_err());
    }

    #[test]
    fn rejects_protocol_2() {
        let body = 0x0002_0000i32.to_be_bytes();
        assert!(matches!(
            parse_first_packet(&body),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        // A cheap property test: every prefix and every single-byte corruption of a valid packet.
        let body = startup_body(&[("user", "u"), ("database", "d"), ("options", "-c a=b")]);
        for cut in 0..body.len() {
            drop(parse_first_packet(&body[..cut]));
        }
        for i in 0..body.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = body.clone();
                b[i] = v;
                drop(parse_first_packet(&b));
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = usize::try_from(seed % 64).unwrap();
            let bytes: Vec<u8> = (0..n)
                .map(|i| (seed >> (i % 56)).to_le_bytes()[0])
                .collect();
            drop(parse_first_packet(&bytes));
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let mut input: &[u8] = &[0x40, 0, 0, 0, 0, 3, 0, 0];
        let err = read_first_packet(&mut input, 10_000).await.unwrap_err();
        assert!(matches!(err, StartupError::BadLength(_)));
        assert_eq!(err.sqlstate(), SqlState::PROTOCOL_VIOLATION);
    }

    #[tokio::test]
    async fn a_bad_length_is_refused_without_waiting_for_more_bytes() {
        // Four bytes of a length below 8, and a client that sends nothing more.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[0, 0, 0, 4]).await.unwrap();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_first_packet(&mut server, 10_000),
        )
        .await
        .expect("refused at once, not after the client's next bytes");
        assert!(matches!(read, Err(StartupError::BadLength(4))));
        drop(client);
    }

    #[tokio::test]
    async fn nothing_past_an_ssl_request_is_read() {
        // An SSLRequest and, at once, bytes that belong to the TLS handshake: they stay unread.
        let mut input: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0x16, 0x03, 0x01];
        let packet = read_first_packet(&mut input, 10_000).await.unwrap();
        assert!(matches!(packet, FirstPacket::SslRequest));
        assert_eq!(input, &[0x16, 0x03, 0x01]);
    }

    #[tokio::test]
    async fn a_startup_packet_sent_a_byte_at_a_time_is_read_whole() {
        let mut packet = vec![0, 0, 0, 0, 0, 3, 0, 0];
        packet.extend_from_slice(b"user\0alice\0database\0acme\0\0");
        let len = u32::try_from(packet.len()).unwrap().to_be_bytes();
        packet[..4].copy_from_slice(&len);
        let (mut client, mut server) = tokio::io::duplex(1);
        let sender = tokio::spawn(async move {
            for b in packet {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        let read = read_first_packet(&mut server, 10_000).await.unwrap();
        let FirstPacket::Startup(startup) = read else {
            panic!("a startup packet: {read:?}");
        };
        assert_eq!(startup.get("user"), Some("alice"));
        assert_eq!(startup.get("database"), Some("acme"));
        drop(sender.await.unwrap());
    }
}
