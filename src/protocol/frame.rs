//! Message framing after startup: a 1-byte tag and a 4-byte big-endian length that counts itself.
//!
//! Two tools live here. [`FrameScanner`] finds frame boundaries in a byte stream for the relay
//! without copying or decoding bodies: it looks at headers only (and at ReadyForQuery's status
//! byte) and tells the caller how many bytes are safe to forward. [`read_message`] reads one
//! whole message for the setup phases (auth, parameter sync, reset), bounded in size.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a frame header: tag + length.
pub const HEADER_BYTES: usize = 5;

/// A frame header the scanner saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead<'a> {
    pub tag: u8,
    /// Length of the body, excluding tag and length word.
    pub body_len: usize,
    /// ReadyForQuery's transaction status byte (`I`, `T` or `E`); 0 for other frames.
    pub status: u8,
    /// The part of the body that is in this run: all of it, or a prefix when the frame
    /// continues in a later read. Never copied.
    pub body: &'a [u8],
}

/// What the caller wants after seeing a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Forward this frame and keep scanning.
    Continue,
    /// Stop before this frame: it is not forwarded.
    StopBefore,
    /// Forward this frame, then stop at its end.
    StopAfter,
    /// Not enough of this frame is here to decide: stop before it and scan it again when more
    /// bytes have arrived.
    Hold,
    /// Replace the first `consume` bytes of this frame (from its tag) with bytes the caller
    /// prepared, then forward the rest of the frame as usual. `consume == 0` inserts before
    /// the frame; the whole frame length drops it. Bytes of `consume` that have not arrived
    /// yet are dropped as they arrive ([`SpliceAt::discard`]): a frame larger than the relay's
    /// buffer can be dropped whole.
    Splice { consume: usize },
}

/// A splice the caller must perform at `Scanned::forward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceAt {
    /// Bytes of the frame to drop from the stream now (never more than the run holds).
    pub consume: usize,
    /// Bytes of the frame to drop after those, as they arrive: the part of the consumed
    /// prefix that is not in the run yet. The caller drops them before it scans again.
    pub discard: usize,
    /// Bytes of the frame after the consumed prefix, still to forward.
    pub rest: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Finds frame boundaries across reads. Holds only a count of body bytes still to pass.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    /// Body bytes of the current frame not yet seen.
    skip: usize,
    /// Stop once the current frame's body has passed (`Scan::StopAfter` on a split frame).
    stop_at_end: bool,
    max_body_bytes: usize,
}

/// The result of scanning one run of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes from the start of the run that may be forwarded now. The rest is an incomplete
    /// header, to be scanned again once more bytes arrive (or a frame the caller stopped before).
    pub forward: usize,
    /// The caller asked to stop before a frame at `forward`.
    pub stopped: bool,
    /// The caller asked to splice the frame at `forward`.
    pub splice: Option<SpliceAt>,
}

impl FrameScanner {
    pub fn new(max_body_bytes: usize) -> Self {
        FrameScanner {
            skip: 0,
            stop_at_end: false,
            max_body_bytes,
        }
    }

    /// True between frames: no body bytes are owed.
    pub fn at_boundary(&self) -> bool {
        self.skip == 0
    }

    /// After a splice: the next `rest` bytes are the remainder of the spliced frame.
    pub fn resume_after_splice(&mut self, rest: usize) {
        self.skip = rest;
    }

    /// Scans `run`, calling `on_frame` for each header that is complete in it.
    pub fn scan(
        &mut self,
        run: &[u8],
        mut on_frame: impl FnMut(FrameHead<'_>) -> Scan,
    ) -> Result<Scanned, FrameError> {
        let mut at = 0;
        loop {
            let left = run.len() - at;
            if self.skip > 0 {
                let step = self.skip.min(left);
                at += step;
                self.skip -= step;
                if self.skip > 0 {
                    return Ok(Scanned {
                        forward: at,
                        stopped: false,
                        splice: None,
                    });
                }
            }
            if self.stop_at_end {
                self.stop_at_end = false;
                return Ok(Scanned {
                    forward: at,
                    stopped: true,
                    splice: None,
                });
            }
            let Some(head) = run.get(at..at + HEADER_BYTES) else {
                return Ok(Scanned {
                    forward: at,
                    stopped: false,
                    splice: None,
                });
            };
            let (tag, len) = split_header(head);
            if len < 4 {
                return Err(FrameError::BadLength(len));
            }
            let body_len = usize::try_from(len - 4).map_err(|_| FrameError::BadLength(len))?;
            if body_len > self.max_body_bytes {
                return Err(FrameError::TooLarge(body_len));
            }
            let mut status = 0;
            if tag == b'Z' {
                // The status byte decides pooling; wait until it is here.
                match run.get(at + HEADER_BYTES) {
                    Some(s) if body_len >= 1 => status = *s,
                    Some(_) => {}
                    None => {
                        return Ok(Scanned {
                            forward: at,
                            stopped: false,
                            splice: None,
                        });
                    }
                }
            }
            let body_start = at + HEADER_BYTES;
            let body_end = body_start.saturating_add(body_len).min(run.len());
            let frame = FrameHead {
                tag,
                body_len,
                status,
                body: run.get(body_start..body_end).unwrap_or_default(),
            };
            match on_frame(frame) {
                Scan::StopBefore => {
                    return Ok(Scanned {
                        forward: at,
                        stopped: true,
                        splice: None,
                    });
                }
                Scan::Hold => {
                    return Ok(Scanned {
                        forward: at,
                        stopped: false,
                        splice: None,
                    });
                }
                Scan::Splice { consume } => {
                    let total = HEADER_BYTES.saturating_add(body_len);
                    let consume = consume.min(total);
                    // Never past the bytes we were given (issue 11: a 20 kB Close answered
                    // here once consumed bytes that had not arrived, and the relay panicked).
                    let in_run = consume.min(run.len() - at);
                    return Ok(Scanned {
                        forward: at,
                        stopped: false,
                        splice: Some(SpliceAt {
                            consume: in_run,
                            discard: consume - in_run,
                            rest: total - consume,
                        }),
                    });
                }
                Scan::StopAfter => self.stop_at_end = true,
                Scan::Continue => {}
            }
            at = body_start;
            self.skip = body_len;
        }
    }
}

fn split_header(head: &[u8]) -> (u8, u32) {
    let mut len = [0u8; 4];
    let mut tag = 0;
    if let Some((t, rest)) = head.split_first() {
        tag = *t;
        if let Some(l) = rest.first_chunk::<4>() {
            len = *l;
        }
    }
    (tag, u32::from_be_bytes(len))
}

/// One whole message read during a setup phase.
#[derive(Debug)]
pub struct Message {
    pub tag: u8,
    pub body: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer closed the connection")]
    Eof,
    #[error("read failed")]
    Io(#[source] std::io::Error),
}

/// Reads one message, refusing bodies above `max_body_bytes`.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_body_bytes: usize,
) -> Result<Message, ReadError> {
    let mut head = [0u8; HEADER_BYTES];
    stream.read_exact(&mut head).await.map_err(eof_or_io)?;
    let (tag, len) = split_header(&head);
    if len < 4 {
        return Err(FrameError::BadLength(len).into());
    }
    let body_len = usize::try_from(len - 4).map_err(|_| FrameError::BadLength(len))?;
    if body_len > max_body_bytes {
        return Err(FrameError::TooLarge(body_len).into());
    }
    let mut body = BytesMut::zeroed(body_len);
    stream.read_exact(&mut body).await.map_err(eof_or_io)?;
    Ok(Message { tag, body })
}

fn eof_or_io(e: std::io::Error) -> ReadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ReadError::Eof
    } else {
        ReadError::Io(e)
    }
}

/// Splits a NUL-terminated string off the front of `bytes`.
pub fn take_cstr(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let nul = bytes.iter().position(|b| *b == 0)?;
    let (s, rest) = bytes.split_at(nul);
    Some((
        std::str::from_utf8(s).ok()?,
        rest.get(1..).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(frame(b'T', b"rowdesc"));
        for i in 0..50u8 {
            s.extend(frame(b'D', &[i; 37]));
        }
        s.extend(frame(b'C', b"SELECT 50\0"));
        s.extend(frame(b'Z', b"I"));
        s
    }

    /// Feeds `bytes` in chunks of `chunk`, as a relay would, and returns the tags seen.
    fn scan_chunked(bytes: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, usize) {
        let mut sc = FrameScanner::new(1 << 20);
        let mut tags = Vec::new();
        let mut statuses = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut forwarded = 0;
        for piece in bytes.chunks(chunk) {
            pending.extend_from_slice(piece);
            let r = sc
                .scan(&pending, |h| {
                    tags.push(h.tag);
                    if h.tag == b'Z' {
                        statuses.push(h.status);
                    }
                    Scan::Continue
                })
                .unwrap();
            forwarded += r.forward;
            pending.drain(..r.forward);
        }
        (tags, statuses, forwarded)
    }

    #[test]
    fn finds_every_frame_whatever_the_chunking() {
        let s = stream();
        for chunk in [1, 2, 3, 5, 6, 7, 64, 4096] {
            let (tags, statuses, forwarded) = scan_chunked(&s, chunk);
            assert_eq!(tags.len(), 53, "chunk {chunk}");
            assert_eq!(tags.first(), Some(&b'T'));
            assert_eq!(tags.last(), Some(&b'Z'));
            assert_eq!(statuses, vec![b'I']);
            assert_eq!(forwarded, s.len());
        }
    }

    #[test]
    fn stop_before_leaves_frame_unforwarded() {
        let mut s = frame(b'Q', b"select 1\0");
        let q_len = s.len();
        s.extend(frame(b'X', b""));
        let mut sc = FrameScanner::new(1024);
        let r = sc
            .scan(&s, |h| {
                if h.tag == b'X' {
                    Scan::StopBefore
                } else {
                    Scan::Continue
                }
            })
            .unwrap();
        assert_eq!(
            r,
            Scanned {
                forward: q_len,
                stopped: true,
                splice: None,
            }
        );
    }

    #[test]
    fn a_splice_never_consumes_bytes_that_have_not_arrived() {
        // Issue 11: a 20 kB Close answered by the proxy, of which only a prefix is here.
        let whole = frame(b'C', &vec![b'x'; 20_000]);
        let run = &whole[..16 * 1024];
        let splice_of = |consume: Option<usize>| {
            FrameScanner::new(1 << 20)
                .scan(run, |head| Scan::Splice {
                    consume: consume.unwrap_or(HEADER_BYTES + head.body_len),
                })
                .unwrap()
                .splice
                .unwrap()
        };
        let dropped = splice_of(None);
        assert_eq!(dropped.consume, run.len());
        assert_eq!(dropped.discard, whole.len() - run.len());
        assert_eq!(dropped.rest, 0);
        // A prefix splice of a frame that is here is unchanged.
        let renamed = splice_of(Some(10));
        assert_eq!((renamed.consume, renamed.discard), (10, 0));
        assert_eq!(renamed.rest, whole.len() - 10);
    }

    #[test]
    fn stop_after_includes_the_frame_even_when_split() {
        let mut s = frame(b'C', b"SELECT 1\0");
        s.extend(frame(b'Z', b"I"));
        let end = s.len();
        s.extend(frame(b'A', b"notify"));
        for cut in [3, 7, 14, end - 1, end, end + 2] {
            let mut sc = FrameScanner::new(1024);
            let stop = |h: FrameHead<'_>| {
                if h.tag == b'Z' {
                    Scan::StopAfter
                } else {
                    Scan::Continue
                }
            };
            let first = sc.scan(&s[..cut.min(s.len())], stop).unwrap();
            let rest = &s[first.forward..];
            let total = if first.stopped {
                first.forward
            } else {
                first.forward + sc.scan(rest, stop).unwrap().forward
            };
            assert_eq!(total, end, "cut {cut}");
        }
    }

    #[test]
    fn body_prefix_is_visible() {
        let s = frame(b'C', b"SET\0");
        let mut sc = FrameScanner::new(1024);
        let mut seen = Vec::new();
        sc.scan(&s[..7], |h| {
            seen.extend_from_slice(h.body);
            Scan::Continue
        })
        .unwrap();
        assert_eq!(seen, b"SE");
    }

    #[test]
    fn bad_and_oversized_lengths_are_errors() {
        let mut sc = FrameScanner::new(100);
        assert_eq!(
            sc.scan(b"Q\0\0\0\x02", |_| Scan::Continue),
            Err(FrameError::BadLength(2))
        );
        let mut sc = FrameScanner::new(100);
        assert_eq!(
            sc.scan(b"Q\x40\0\0\0", |_| Scan::Continue),
            Err(FrameError::TooLarge(0x4000_0000 - 4))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5_000 {
            let mut sc = FrameScanner::new(1 << 16);
            let mut buf = Vec::new();
            for _ in 0..(seed % 200) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed.to_le_bytes()[0]);
            }
            for chunk in buf.chunks(usize::try_from(seed % 9 + 1).unwrap()) {
                if sc.scan(chunk, |_| Scan::Continue).is_err() {
                    break;
                }
            }
        }
    }
}
