//! The PROXY protocol header (HAProxy's v1 text and v2 binary formats, "proxy-protocol.txt")
//! that a load balancer in `[proxy] proxy_protocol_from` writes before its client's first
//! byte. The header names the client's real address, which then stands for the peer
//! everywhere: the failed-login throttle, login slots, audit lines, the `peer` span field,
//! SHOW CLIENTS and cancel requests. A v2 `LOCAL` header (the balancer's own health check) and
//! a v1 `UNKNOWN` one keep the balancer's address.
//!
//! Parsing and validation are the `ppp` crate's; this module only finds where the header ends.
//! It must not read a byte past that end: the PostgreSQL startup (or a TLS ClientHello)
//! follows on the same socket, read unbuffered by `client`. So it reads in exact steps, each
//! no longer than the shortest header still possible (the first 8 bytes are fewer than any
//! header and than any PostgreSQL opening packet, so a client that sends no header is told
//! at once, not left waiting); a v1 header ends at its CRLF within 107 bytes, a v2 header
//! carries its length. It does not time out by itself: the caller bounds it with the login
//! timeout. It does not decide whom to trust, and writes nothing to the socket.

use std::net::{IpAddr, SocketAddr};

use ppp::v1;
use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;

/// A v1 header's first bytes.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest v1 header, `PROXY UNKNOWN\r\n`.
const V1_MIN_BYTES: usize = 15;
/// The longest v1 header, CRLF included (the spec's 107-byte buffer).
const V1_MAX_BYTES: usize = 107;
/// A v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED_BYTES: usize = 16;
/// Read first: shorter than any header (v1 ≥ 15, v2 ≥ 16 bytes) and no longer than any
/// PostgreSQL first packet (SSLRequest is 8 bytes), so it never waits for bytes a client
/// without a header will not send.
const FIRST_READ_BYTES: usize = 8;

/// Whose address the connection's client has, after the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The client the balancer relays (a v1 TCP4/TCP6 or v2 PROXY header over IPv4/IPv6).
    Client(SocketAddr),
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, or a v2 family without an IP
    /// address): its address stands.
    Balancer,
}

/// Why a connection's PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header from a balancer in proxy.proxy_protocol_from")]
    Missing,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY protocol v1 header without CRLF within {V1_MAX_BYTES} bytes")]
    TooLong,
    #[error("PROXY protocol header from an address not in proxy.proxy_protocol_from")]
    Untrusted,
    /// The peer left without sending a byte (a plain TCP health check does).
    #[error("the balancer closed the connection before sending anything")]
    Closed,
    #[error("the balancer closed the connection inside the PROXY protocol header")]
    Eof,
    #[error("reading the PROXY protocol header failed")]
    Io(#[source] std::io::Error),
}

impl ClientFacing for ProxyHeaderError {
    fn sqlstate(&self) -> SqlState {
        match self {
            ProxyHeaderError::Missing
            | ProxyHeaderError::Invalid(_)
            | ProxyHeaderError::TooLong
            | ProxyHeaderError::Untrusted
            | ProxyHeaderError::Closed
            | ProxyHeaderError::Eof
            | ProxyHeaderError::Io(_) => SqlState::PROTOCOL_VIOLATION,
        }
    }

    fn client_message(&self) -> String {
        match self {
            ProxyHeaderError::Missing => {
                "a PROXY protocol header is expected from this address".to_owned()
            }
            ProxyHeaderError::Invalid(_) | ProxyHeaderError::TooLong => {
                "invalid PROXY protocol header".to_owned()
            }
            ProxyHeaderError::Untrusted => {
                "PROXY protocol header not accepted from this address".to_owned()
            }
            ProxyHeaderError::Closed | ProxyHeaderError::Eof | ProxyHeaderError::Io(_) => {
                "incomplete PROXY protocol header".to_owned()
            }
        }
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Client
    }
}

/// Whether a connection's first four bytes, read as a startup packet's length word, are the
/// start of a PROXY header: how a header from an untrusted address is told apart from any
/// other bad startup packet (as a length, either signature is far beyond every bound).
pub(super) fn is_header_start(length_word: i64) -> bool {
    let Ok(word) = i32::try_from(length_word) else {
        return false;
    };
    let bytes = word.to_be_bytes();
    V1_PREFIX.starts_with(&bytes) || v2::PROTOCOL_PREFIX.starts_with(&bytes)
}

/// Reads the PROXY header at the start of `stream`, and not a byte more.
pub(super) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Source, ProxyHeaderError> {
    let mut header = vec![0; FIRST_READ_BYTES];
    // One read first, to tell a peer that leaves without a byte (a balancer's plain TCP
    // health check) from one that stops inside a header.
    let got = stream
        .read(&mut header)
        .await
        .map_err(ProxyHeaderError::Io)?;
    if got == 0 {
        return Err(ProxyHeaderError::Closed);
    }
    header.truncate(got);
    read_more(stream, &mut header, FIRST_READ_BYTES - got).await?;
    if header.starts_with(V1_PREFIX) {
        read_v1_rest(stream, &mut header).await?;
        let parsed = v1::Header::try_from(header.as_slice())
            .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
        return Ok(match parsed.addresses {
            v1::Addresses::Tcp4(ip) => client(IpAddr::V4(ip.source_address), ip.source_port),
            v1::Addresses::Tcp6(ip) => client(IpAddr::V6(ip.source_address), ip.source_port),
            v1::Addresses::Unknown => Source::Balancer,
        });
    }
    if v2::PROTOCOL_PREFIX.starts_with(&header) {
        read_more(stream, &mut header, V2_FIXED_BYTES - FIRST_READ_BYTES).await?;
        // The fixed part ends with the length of what follows (addresses and TLVs).
        let rest = match header.get(V2_FIXED_BYTES - 2..V2_FIXED_BYTES) {
            Some(&[high, low]) => u16::from_be_bytes([high, low]),
            _ => 0,
        };
        read_more(stream, &mut header, usize::from(rest)).await?;
        let parsed = v2::Header::try_from(header.as_slice())
            .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
        return Ok(match (parsed.command, parsed.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(ip)) => {
                client(IpAddr::V4(ip.source_address), ip.source_port)
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(ip)) => {
                client(IpAddr::V6(ip.source_address), ip.source_port)
            }
            (v2::Command::Local, _)
            | (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => {
                Source::Balancer
            }
        });
    }
    Err(ProxyHeaderError::Missing)
}

/// An IPv4 client a balancer names as `::ffff:a.b.c.d` is keyed as `a.b.c.d`, as a direct one
/// is, so its throttle counters and login slots are the same.
fn client(ip: IpAddr, port: u16) -> Source {
    Source::Client(SocketAddr::new(ip.to_canonical(), port))
}

/// Reads the rest of a v1 header, whose first bytes (`PROXY ` and a little more) are in
/// `header`: up to its CRLF, never past it.
async fn read_v1_rest<S: AsyncRead + Unpin>(
    stream: &mut S,
    header: &mut Vec<u8>,
) -> Result<(), ProxyHeaderError> {
    read_more(stream, header, V1_MIN_BYTES.saturating_sub(header.len())).await?;
    loop {
        // The header ends at its first CR, which LF must follow; ppp checks that.
        if let Some(cr) = header.iter().position(|b| *b == b'\r') {
            let end = cr + 2;
            return read_more(stream, header, end.saturating_sub(header.len())).await;
        }
        if header.len() >= V1_MAX_BYTES {
            return Err(ProxyHeaderError::TooLong);
        }
        // No CR yet: CR and LF are still to come, so two more bytes are still the header.
        let step = 2.min(V1_MAX_BYTES - header.len());
        read_more(stream, header, step).await?;
    }
}

/// Appends exactly `n` more bytes from `stream` to `buf`.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    n: usize,
) -> Result<(), ProxyHeaderError> {
    let start = buf.len();
    buf.resize(start + n, 0);
    let target = buf.get_mut(start..).unwrap_or_default();
    stream.read_exact(target).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProxyHeaderError::Eof
        } else {
            ProxyHeaderError::Io(e)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A startup packet's first bytes, to prove nothing after the header was consumed.
    const AFTER: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";

    /// Feeds `bytes` to `read_header` in pieces of `chunk`, then reads what it left.
    async fn read_in_chunks(
        bytes: &[u8],
        chunk: usize,
    ) -> (Result<Source, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let bytes = bytes.to_vec();
        // Then hangs up: what it wrote stays readable, and a reader that wants more sees EOF.
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(chunk) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let result = read_header(&mut server).await;
        writer.await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    fn v2_header(command: v2::Command, source: &str, destination: &str) -> Vec<u8> {
        let addresses: (SocketAddr, SocketAddr) =
            (source.parse().unwrap(), destination.parse().unwrap());
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
            .write_tlv(v2::Type::NoOp, b"padding".as_slice())
            .unwrap()
            .build()
            .unwrap()
    }

    fn with_startup(header: &[u8]) -> Vec<u8> {
        [header, AFTER].concat()
    }

    /// Over IPv4 and IPv6, whole or byte by byte: the client is the header's source (an
    /// IPv4-mapped one counts as IPv4), and the startup after the header is intact.
    #[tokio::test]
    async fn v2_proxy_names_the_client_and_leaves_the_startup_intact() {
        let cases = [
            ("203.0.113.7:40001", "10.0.0.5:6432", "203.0.113.7:40001"),
            (
                "[2001:db8::7]:5000",
                "[2001:db8::1]:6432",
                "[2001:db8::7]:5000",
            ),
            (
                "[::ffff:203.0.113.9]:5000",
                "[::1]:6432",
                "203.0.113.9:5000",
            ),
        ];
        for (source, destination, client) in cases {
            let header = v2_header(v2::Command::Proxy, source, destination);
            for chunk in [1, 3, 16, 4096] {
                let (result, rest) = read_in_chunks(&with_startup(&header), chunk).await;
                let expected = Source::Client(client.parse().unwrap());
                assert_eq!(result.unwrap(), expected, "{source} in chunks of {chunk}");
                assert_eq!(rest, AFTER, "{source} in chunks of {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn v2_local_keeps_the_balancer() {
        let header = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (result, rest) = read_in_chunks(&with_startup(&header), 5).await;
        assert_eq!(result.unwrap(), Source::Balancer);
        assert_eq!(rest, AFTER);
    }

    #[tokio::test]
    async fn v1_headers_end_at_their_crlf() {
        let cases: [(&[u8], Source); 4] = [
            (
                b"PROXY TCP4 203.0.113.7 10.0.0.5 40001 6432\r\n",
                Source::Client("203.0.113.7:40001".parse().unwrap()),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 6432\r\n",
                Source::Client("[2001:db8::7]:5000".parse().unwrap()),
            ),
            (b"PROXY UNKNOWN\r\n", Source::Balancer),
            (
                b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n",
                Source::Balancer,
            ),
        ];
        for (header, expected) in cases {
            for chunk in [1, 2, 7, 4096] {
                let (result, rest) = read_in_chunks(&with_startup(header), chunk).await;
                assert_eq!(result.unwrap(), expected, "{header:?} in chunks of {chunk}");
                assert_eq!(rest, AFTER, "{header:?} in chunks of {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn no_header_is_refused_after_eight_bytes() {
        // An SSLRequest alone: the client then waits for an answer, so reading more would hang.
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            .await
            .unwrap();
        let result = read_header(&mut server).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Missing)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let invalid: [&[u8]; 3] = [
            b"PROXY TCP4 203.0.113.300 10.0.0.5 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n",
            // Version 3.
            b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00",
        ];
        for bytes in invalid {
            let (result, _) = read_in_chunks(&with_startup(bytes), 4096).await;
            assert!(
                matches!(result, Err(ProxyHeaderError::Invalid(_))),
                "{bytes:?}: {result:?}"
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120], b"\r\n"].concat();
        let (result, _) = read_in_chunks(&long, 4096).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::TooLong)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn leaving_without_a_byte_is_not_a_broken_header() {
        let (result, _) = read_in_chunks(b"", 1).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Closed)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_header_cut_short_is_eof() {
        let header = v2_header(v2::Command::Proxy, "203.0.113.7:40001", "10.0.0.5:6432");
        let (result, _) = read_in_chunks(header.get(..20).unwrap(), 4096).await;
        assert!(matches!(result, Err(ProxyHeaderError::Eof)), "{result:?}");
    }

    #[test]
    fn signatures_are_recognised_as_startup_lengths() {
        let word = |b: &[u8]| i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        assert!(is_header_start(word(b"PROXY TCP4")));
        assert!(is_header_start(word(v2::PROTOCOL_PREFIX)));
        assert!(!is_header_start(8));
        assert!(!is_header_start(10_000));
        assert!(!is_header_start(-1));
    }
}
