//! One handover link between an older and a newer process: messages out (one writer at a
//! time, each message whole), messages in (one reader task), and the check that the process at
//! the other end runs as this process's user.
//!
//! It must not decide what to do with a message (`outgoing` and `incoming` do).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::UnixStream;

use super::message::Message;
use super::wire;

/// A connected link; shared by its reader task and its writers.
pub(super) struct Link {
    stream: UnixStream,
    /// Held for a whole message: messages never interleave.
    writing: tokio::sync::Mutex<()>,
    /// A write timed out midway: the stream is cut inside a message and carries no more.
    broken: AtomicBool,
}

/// The longest one message may take to go out before the link is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What came in: a message and the descriptors sent with it.
pub(super) struct Incoming {
    pub(super) message: Message,
    pub(super) fds: Vec<OwnedFd>,
}

impl Link {
    /// Wraps a connected socket whose peer runs as this process's user; anything else is
    /// refused (a client socket is worth a session: only our own user may give or take one).
    pub(super) fn new(stream: UnixStream) -> io::Result<Link> {
        let peer = stream.peer_cred()?.uid();
        let own = rustix::process::getuid().as_raw();
        if peer != own {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the process at the other end runs as uid {peer}, not {own}"),
            ));
        }
        Ok(Link {
            stream,
            writing: tokio::sync::Mutex::new(()),
            broken: AtomicBool::new(false),
        })
    }

    /// Sends one message, `fd` with it, within [`SEND_TIMEOUT`]. Callers must not drop the
    /// future midway (spawn it where the caller may be cancelled).
    pub(super) async fn send(&self, message: &Message, fd: Option<&OwnedFd>) -> io::Result<()> {
        let body = message.encode().map_err(io::Error::other)?;
        let _writing = self.writing.lock().await;
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the handover link was cut inside a message",
            ));
        }
        if let Ok(sent) =
            tokio::time::timeout(SEND_TIMEOUT, wire::send(&self.stream, &body, fd)).await
        {
            return sent;
        }
        self.broken.store(true, Ordering::Release);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the other process did not read the handover link",
        ))
    }

    /// The next message; `Ok(None)` when the other side closed the link. One reader only.
    pub(super) async fn recv(&self) -> io::Result<Option<Incoming>> {
        let Some(frame) = wire::recv(&self.stream).await? else {
            return Ok(None);
        };
        let message = Message::decode(&frame.body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some(Incoming {
            message,
            fds: frame.fds,
        }))
    }
}
