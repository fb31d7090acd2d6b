//! Entry points for fuzzing the parsers of client bytes: the startup packet reader and the
//! frame scanner. `fuzz/` (cargo-fuzz, nightly, outside the CI build) calls them with
//! libFuzzer's inputs; the tests below call them with a few thousand random and mutated inputs
//! on stable, so CI proves the same "never panics, never loops" property.
//!
//! Each function drives the parser the way the proxy does and checks the invariants its
//! callers rely on; a violated invariant panics, which is what a fuzzer reports.

use futures_util::FutureExt as _;

use super::frame::{FrameScanner, HEADER_BYTES, Scan};
use super::startup::{self, FirstPacket};

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
    for chunk in data.chunks(piece) {
        pending.extend_from_slice(chunk);
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
                    _ => Scan::Splice {
                        consume: (HEADER_BYTES + head.body.len()).min(usize::from(head.tag)),
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
                continue;
            }
            if outcome.forward == 0 || outcome.stopped {
                // Needs more bytes, or the caller chose to stop here: wait for the next piece.
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random bytes, and well-formed packets/frames with a few bytes changed.
    fn inputs(seeds: &[Vec<u8>], count: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(count);
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
}
