//! A TCP stream for a provisioning connection that fell back to plaintext after a failed TLS
//! handshake (`tls = "prefer"`): it watches the server's messages up to the end of
//! authentication and fails the read, before tokio-postgres can answer, when the server asks
//! for a cleartext or md5 password. Whoever broke the handshake may be the one asking; SCRAM,
//! which reveals no password, goes through. Tenant pools refuse the same in
//! `pool::backend` (issue 13). It must not buffer or change a byte: it only looks.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The stream, and how far into the server's messages it has looked.
pub(super) struct NoPlainPassword {
    tcp: TcpStream,
    /// Header bytes of the message being read (tag and length), until all 5 are in.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to come.
    body_left: usize,
    /// Authentication request code bytes of the current message, when it is an `R`.
    code: [u8; 4],
    code_len: usize,
    /// Authentication is over (AuthenticationOk or any other message): no more looking.
    done: bool,
}

impl NoPlainPassword {
    pub(super) fn new(tcp: TcpStream) -> NoPlainPassword {
        NoPlainPassword {
            tcp,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
            code: [0; 4],
            code_len: 0,
            done: false,
        }
    }

    /// Looks at `bytes`, the next bytes from the server.
    fn look(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !self.done && !bytes.is_empty() {
            if self.header_len < 5 {
                let n = (5 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 5 {
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.body_left = usize::try_from(len).unwrap_or(usize::MAX).saturating_sub(4);
                    self.code_len = 0;
                    if self.header[0] != b'R' {
                        // ErrorResponse, NegotiateProtocolVersion, ...: authentication is
                        // not asking for anything more.
                        self.done = self.header[0] != b'v';
                    }
                }
                continue;
            }
            let n = self.body_left.min(bytes.len());
            if self.header[0] == b'R' && self.code_len < 4 {
                let take = (4 - self.code_len).min(n);
                self.code[self.code_len..self.code_len + take].copy_from_slice(&bytes[..take]);
                self.code_len += take;
                if self.code_len == 4 {
                    match i32::from_be_bytes(self.code) {
                        0 => self.done = true,
                        3 | 5 => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::PermissionDenied,
                                "the server asked for a cleartext or md5 password after its \
                                 TLS handshake failed; tenantgate does not send one over a \
                                 connection that may have been downgraded (set tls = \
                                 \"disable\" for this server to accept plaintext passwords)",
                            ));
                        }
                        _ => {}
                    }
                }
            }
            self.body_left -= n;
            bytes = &bytes[n..];
            if self.body_left == 0 {
                self.header_len = 0;
            }
        }
        Ok(())
    }
}

impl AsyncRead for NoPlainPassword {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if !this.done {
                let fresh = buf.filled().get(before..).unwrap_or_default().to_vec();
                this.look(&fresh)?;
            }
        }
        polled
    }
}

impl AsyncWrite for NoPlainPassword {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: i32) -> Vec<u8> {
        let mut m = vec![b'R', 0, 0, 0, 8];
        m.extend_from_slice(&code.to_be_bytes());
        m
    }

    async fn guard() -> NoPlainPassword {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tcp, _) = tokio::join!(TcpStream::connect(addr), listener.accept());
        NoPlainPassword::new(tcp.unwrap())
    }

    #[tokio::test]
    async fn cleartext_and_md5_requests_fail_byte_by_byte_too_and_scram_passes() {
        for code in [3, 5] {
            let mut g = guard().await;
            let bytes = auth(code);
            let failed = bytes
                .iter()
                .any(|b| g.look(std::slice::from_ref(b)).is_err());
            assert!(failed, "code {code}");
        }
        let mut g = guard().await;
        let mut sasl = vec![b'R', 0, 0, 0, 23];
        sasl.extend_from_slice(&10i32.to_be_bytes());
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        sasl.extend_from_slice(&auth(0));
        sasl.extend_from_slice(&auth(3)); // after AuthenticationOk: not looked at
        g.look(&sasl).unwrap();
        assert!(g.done);
    }
}
