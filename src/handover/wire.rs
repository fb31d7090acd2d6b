//! The handover link's bytes: length-prefixed JSON messages over a Unix stream socket, with a
//! client's socket passed (`SCM_RIGHTS`) on the first byte of the message that describes it.
//! Every read takes bytes of one message only, so a passed descriptor arrives with the read of
//! its own message's first bytes and is never mixed up with a neighbour's.
//!
//! It moves bytes and descriptors; it must not interpret messages (`message` does).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The largest message accepted (a client with many prepared statements is the large case).
pub(super) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Descriptors one read takes at most; more are closed by the kernel (none are expected).
const MAX_FDS_PER_READ: usize = 4;

/// One message as read: its body, and the descriptors that came with it.
pub(super) struct Frame {
    pub(super) body: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// Writes one message, with `fd` on its first byte. Not cancel-safe: a message cut by a
/// dropped future leaves the stream unusable, so callers never drop it midway.
pub(super) async fn send(stream: &UnixStream, body: &[u8], fd: Option<&OwnedFd>) -> io::Result<()> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "handover message too large",
        ));
    }
    let head = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "handover message too large"))?
        .to_be_bytes();
    let total = head.len() + body.len();
    let mut sent = 0;
    while sent < total {
        stream.writable().await?;
        let attach = if sent == 0 { fd } else { None };
        match stream.try_io(Interest::WRITABLE, || {
            send_some(stream, &head, body, sent, attach)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg` of what is left of a message after `sent` bytes.
fn send_some(
    stream: &UnixStream,
    head: &[u8],
    body: &[u8],
    sent: usize,
    fd: Option<&OwnedFd>,
) -> io::Result<usize> {
    let slices = match head.get(sent..) {
        Some(rest) if !rest.is_empty() => [IoSlice::new(rest), IoSlice::new(body)],
        _ => [
            IoSlice::new(body.get(sent - head.len()..).unwrap_or_default()),
            IoSlice::new(&[]),
        ],
    };
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|fd| [fd.as_fd()]);
    if let Some(fds) = &fds {
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("no room for the descriptor"));
        }
    }
    Ok(rustix::net::sendmsg(
        stream,
        &slices,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Reads one message. `Ok(None)`: the other side closed the link between messages.
pub(super) async fn recv(stream: &UnixStream) -> io::Result<Option<Frame>> {
    let mut fds = Vec::new();
    let mut head = [0u8; 4];
    if !read_exact(stream, &mut head, &mut fds, true).await? {
        return Ok(None);
    }
    let len = usize::try_from(u32::from_be_bytes(head)).unwrap_or(usize::MAX);
    if len > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handover message too large",
        ));
    }
    let mut body = vec![0u8; len];
    read_exact(stream, &mut body, &mut fds, false).await?;
    Ok(Some(Frame { body, fds }))
}

/// Fills `buf` exactly, gathering any descriptors that come along. Returns false for a close
/// before the first byte when `eof_ok`.
async fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.readable().await?;
        let rest = buf.get_mut(filled..).unwrap_or_default();
        match stream.try_io(Interest::READABLE, || recv_some(stream, rest, fds)) {
            Ok(0) if filled == 0 && eof_ok => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// One `recvmsg` into `buf`, its descriptors (close-on-exec) added to `fds`.
fn recv_some(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok(got.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_descriptor_arrives_with_its_own_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        // Larger than the socket's buffer: the sender waits for the reader.
        let sender = tokio::spawn(async move {
            send(&a, b"first", None).await.unwrap();
            send(&a, &vec![7u8; 300_000], Some(&file)).await.unwrap();
            send(&a, b"third", None).await.unwrap();
        });
        let first = recv(&b).await.unwrap().unwrap();
        assert_eq!((first.body.as_slice(), first.fds.len()), (&b"first"[..], 0));
        let second = recv(&b).await.unwrap().unwrap();
        assert_eq!((second.body.len(), second.fds.len()), (300_000, 1));
        let third = recv(&b).await.unwrap().unwrap();
        assert_eq!((third.body.as_slice(), third.fds.len()), (&b"third"[..], 0));
        sender.await.unwrap();
        assert!(recv(&b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_link_cut_inside_a_message_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        a.try_write(&[0, 0, 0, 10, b'x']).unwrap();
        drop(a);
        assert!(recv(&b).await.is_err());
    }
}
