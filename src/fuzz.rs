//! Entry points for fuzzing the parsers of client bytes: the startup packet reader, the frame
//! scanner, the SCRAM server exchange (everything a client sends before it is authenticated)
//! and the transaction-mode statement rewriter (Parse/Bind/Describe/Close names spliced in the
//! client's stream). `fuzz/` (cargo-fuzz, outside the CI build) calls them with
//! libFuzzer's inputs; the tests below call them with a few thousand random and mutated inputs
//! on stable, so CI proves the same "never panics, never loops" property.
//!
//! Each function drives the parser the way the proxy does and checks the invariants its
//! callers rely on; a violated invariant panics, which is what a fuzzer reports.
//!
//! Compiled only for tests and fuzzing (`--cfg fuzzing`, which cargo-fuzz sets): it is a
//! harness over several modules, not part of the proxy, and must not be linked into it.

use futures_util::FutureExt as _;

use bytes::BytesMut;

use crate::auth::scram::{ScramExchange, ScramSecret};
use crate::pool::BackendStatements;
use crate::protocol::frame::{FrameHead, FrameScanner, HEADER_BYTES, Scan};
use crate::protocol::startup::{self, FirstPacket};
use crate::session::statements::{ClientStatements, Responses, StatementContext, on_client_frame};

/// Reads `data` as a client's first bytes: length word, then the packet, under a size bound
/// chosen by the first byte (as `proxy.max_startup_packet_bytes` would be).
pub fn startup_packet(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    let max_bytes = [64, 512, 10_000, 1 << 20][usize::from(choice & 3)];
    let mut stream = data;
    // A byte slice is always ready: the future completes on its first poll.
    let Some(result) = startup::read_first_packet(&mut stream, max_bytes).now_or_never() else {
        panic!("read_first_packet did not complete over an in-memory stream");
    };
    if let Ok(FirstPacket::Startup(message)) = result {
        // Every parameter came from inside the bound.
        let bytes: usize = message.params.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= max_bytes, "parameters larger than the packet");
    }
    // The parser on its own, over the same bytes, as the body of a packet.
    drop(startup::parse_first_packet(data));
}

/// Scans `data` as client traffic arriving in pieces (sizes from the first byte), making the
/// relay's choices (continue, stop, hold, splice) from each frame's tag, and checks that the
/// scanner never forwards bytes it was not given and always makes progress or asks for more.
pub fn frame_scanner(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    let max_body_bytes = [0, 16, 1024, 1 << 30][usize::from(choice & 3)];
    let piece = usize::from(choice >> 2) + 1;
    let mut scanner = FrameScanner::new(max_body_bytes);
    let mut pending: Vec<u8> = Vec::new();
    // Bytes of a spliced frame still to drop as they arrive.
    let mut discard = 0usize;
    for chunk in data.chunks(piece) {
        pending.extend_from_slice(chunk);
        let dropped = discard.min(pending.len());
        pending.drain(..dropped);
        discard -= dropped;
        if discard > 0 {
            continue;
        }
        // Each pass forwards or splices at least one byte, or stops: bounded by the input.
        for _ in 0..=pending.len() + 1 {
            let result = scanner.scan(&pending, |head| {
                assert!(
                    head.body.len() <= head.body_len,
                    "body longer than its length"
                );
                match head.tag % 5 {
                    0 => Scan::Continue,
                    1 => Scan::StopBefore,
                    2 => Scan::StopAfter,
                    3 => Scan::Hold,
                    // Up to the whole frame, also past what has arrived (a Close or a
                    // DEALLOCATE answered here drops its whole frame).
                    _ => Scan::Splice {
                        consume: (HEADER_BYTES + head.body_len)
                            .min(usize::from(head.tag).saturating_mul(head.tag.into())),
                    },
                }
            });
            let Ok(outcome) = result else {
                // A bad length ends the connection: nothing more to scan.
                return;
            };
            assert!(outcome.forward <= pending.len(), "forwarded past the run");
            pending.drain(..outcome.forward);
            if let Some(splice) = outcome.splice {
                assert!(splice.consume <= pending.len(), "splice past the run");
                pending.drain(..splice.consume);
                scanner.resume_after_splice(splice.rest);
                if splice.discard > 0 {
                    assert!(
                        pending.is_empty(),
                        "discard while bytes of the run are left"
                    );
                    discard = splice.discard;
                    break;
                }
                continue;
            }
            if outcome.forward == 0 || outcome.stopped {
                // Needs more bytes, or the caller chose to stop here: wait for the next piece.
                break;
            }
        }
    }
}

/// Runs a SCRAM exchange over client bytes: the first byte picks whether channel binding is
/// offered and which mechanism the client names; the rest is the client-first-message, a NUL,
/// then the client-final-message. `%N` in the latter is replaced by the nonce the server sent,
/// so the fuzzer gets past the nonce check and into the proof and channel-binding checks.
pub fn scram_exchange(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    let secret = ScramSecret::mock(&[7; 32], "fuzz");
    let mut exchange = ScramExchange::new(secret, false);
    if choice & 1 == 1 {
        exchange = exchange.with_channel_binding(&[0xAB; 32]);
    }
    let mechanism = if choice & 2 == 2 {
        "SCRAM-SHA-256-PLUS"
    } else {
        "SCRAM-SHA-256"
    };
    let (first, last) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(server_first) = exchange.client_first(mechanism, first) else {
        // A refused first message finishes the exchange: nothing later may succeed.
        assert!(
            exchange.client_final(last).is_err(),
            "exchange went on after an error"
        );
        return;
    };
    assert!(
        server_first.starts_with(b"r="),
        "server-first without a nonce"
    );
    let nonce_end = server_first
        .iter()
        .position(|b| *b == b',')
        .unwrap_or(server_first.len());
    let nonce = &server_first[2..nonce_end];
    // One left-to-right pass: the nonce may itself contain "%N" (the client chose it).
    let mut with_nonce = Vec::with_capacity(last.len() + nonce.len());
    let mut rest = last;
    while let Some(at) = rest.windows(2).position(|w| w == b"%N") {
        with_nonce.extend_from_slice(&rest[..at]);
        with_nonce.extend_from_slice(nonce);
        rest = &rest[at + 2..];
    }
    with_nonce.extend_from_slice(rest);
    let last = with_nonce;
    // The secret's keys are random: no proof can match, whatever the client sends.
    assert!(
        exchange.client_final(&last).is_err(),
        "a forged proof passed"
    );
}

/// Client messages a transaction-mode client may send, and backend responses, in the order
/// the input gives them, through the statement rewriter with a tiny per-backend cache. Checks
/// that what every splice sends the backend (the splice, then the rest of the client's
/// message) is a run of well-formed messages and that a complete message is never held back.
pub fn statement_rewriter(data: &[u8]) {
    const CLIENT_TAGS: &[u8] = b"PBDCESQFH";
    const BACKEND_TAGS: &[u8] = b"123TnCIsEZ";
    let Some((&choice, mut data)) = data.split_first() else {
        return;
    };
    let mut client = ClientStatements::default();
    let mut backend = BackendStatements::default();
    backend.capacity = usize::from(choice % 4) + 1;
    let mut responses = Responses::default();
    let mut splice = BytesMut::new();
    let mut injected = BytesMut::new();
    while let Some((&op, rest)) = data.split_first() {
        if op & 0x80 != 0 {
            let tag = BACKEND_TAGS[usize::from(op & 0x7f) % BACKEND_TAGS.len()];
            responses.on_backend_frame(tag, &[], &mut backend);
            injected.clear();
            responses.take_injections(&mut injected, b'I');
            assert_well_formed(&injected);
            data = rest;
            continue;
        }
        let Some((&len, rest)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len).min(rest.len());
        let (body, rest) = rest.split_at(len);
        data = rest;
        let tag = CLIENT_TAGS[usize::from(op) % CLIENT_TAGS.len()];
        let head = FrameHead {
            tag,
            body_len: body.len(),
            status: 0,
            body,
        };
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        splice.clear();
        match on_client_frame(&mut ctx, &head, &mut splice) {
            Scan::Hold => panic!("a complete message was held back"),
            Scan::Splice { consume } => {
                // The splice replaces the first `consume` bytes of the message (Bind swaps
                // only its names); what reaches the backend is the splice and the rest.
                let mut original = Vec::with_capacity(HEADER_BYTES + body.len());
                original.push(tag);
                original.extend_from_slice(
                    &u32::try_from(body.len() + 4)
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                original.extend_from_slice(body);
                let Some(rest) = original.get(consume..) else {
                    panic!("splice past the message");
                };
                splice.extend_from_slice(rest);
                assert_well_formed(&splice);
            }
            _ => {}
        }
    }
}

/// Panics unless `bytes` is a sequence of whole messages (tag, length word, body).
fn assert_well_formed(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let Some(len) = bytes.get(1..5) else {
            panic!("a message header cut short");
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        assert!(len >= 4, "a message length below 4");
        assert!(bytes.len() > len, "a message cut short");
        bytes = &bytes[1 + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds as they are, then random bytes and seeds with a few bytes changed.
    fn inputs(seeds: &[Vec<u8>], count: usize) -> Vec<Vec<u8>> {
        let mut out = seeds.to_vec();
        for i in 0..count {
            let mut input = if i % 2 == 0 {
                let len = usize::from(rand::random::<u16>() % 300);
                (0..len).map(|_| rand::random::<u8>()).collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            if !input.is_empty() {
                for _ in 0..=rand::random::<u8>() % 4 {
                    let at = usize::from(rand::random::<u16>()) % input.len();
                    input[at] = rand::random();
                }
            }
            out.push(input);
        }
        out
    }

    fn startup_seed(choice: u8, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let len = i32::try_from(body.len() + 4).unwrap();
        let mut out = vec![choice];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn startup_packet_parser_never_panics() {
        let seeds = vec![
            startup_seed(2, &[("user", "app"), ("database", "acme")]),
            startup_seed(0, &[("user", "a"), ("options", "-c x=y"), ("_pq_.x", "1")]),
            vec![2, 0, 0, 0, 8, 4, 210, 22, 47],
            vec![2, 0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2],
        ];
        for input in inputs(&seeds, 5000) {
            startup_packet(&input);
        }
    }

    #[test]
    fn frame_scanner_never_panics() {
        let mut frames = Vec::new();
        for (tag, body) in [
            (b'Q', &b"SELECT 1\0"[..]),
            (b'Z', b"I"),
            (b'P', b"s1\0SELECT $1\0\0\0"),
            (b'S', b""),
            (b'D', b"\0\x01\0\0\0\x011"),
        ] {
            frames.push(tag);
            frames.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
            frames.extend_from_slice(body);
        }
        let seeds: Vec<Vec<u8>> = (0u8..8)
            .map(|choice| {
                let mut s = vec![choice.wrapping_mul(37)];
                s.extend_from_slice(&frames);
                s
            })
            .collect();
        for input in inputs(&seeds, 5000) {
            frame_scanner(&input);
        }
    }

    #[test]
    fn scram_exchange_never_panics() {
        let seeds: Vec<Vec<u8>> = [
            &b"\x00n,,n=,r=abc\x00c=biws,r=%N,p=AAAA"[..],
            b"\x03p=tls-server-end-point,,n=,r=abc\x00c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=%N,p=AAAA",
            b"\x01y,,n=,r=x\x00c=eSws,r=%N,p=",
            b"\x00n,a=admin,n=u,r=\x00",
            // The campaign's timeout: a client nonce of "%N" once made the harness loop.
            b"\x00n,,n=bk7s,r=%N,p=AzC\x00c=biws,r=%N,pAAA",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        for input in inputs(&seeds, 5000) {
            scram_exchange(&input);
        }
    }

    #[test]
    fn statement_rewriter_never_panics() {
        let seeds: Vec<Vec<u8>> = vec![
            [
                &[1u8, 0, 13][..],
                b"a\0SELECT 1\0\0\0",
                &[1, 10],
                b"\0a\0\0\0\0\0\0\0\0",
                &[4, 0, 0x80, 0x81, 0x89],
            ]
            .concat(),
            [
                &[0u8, 0, 13][..],
                b"b\0SELECT 2\0\0\0",
                &[3, 2],
                b"Sb",
                &[6, 18],
                b"DEALLOCATE ALL;\0\0\0",
                &[0x88, 0x89],
            ]
            .concat(),
        ];
        for input in inputs(&seeds, 5000) {
            statement_rewriter(&input);
        }
    }
}
