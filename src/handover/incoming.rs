//! The newer process's side of a handover: the socket it binds at start (taking the path over
//! from an older process), the clients older processes send through it, and the cancel
//! requests it forwards to them for keys it did not issue.
//!
//! It must not start sessions (the server does, from the [`Arrival`]s) nor decide that a
//! client is allowed in: the server checks its tenant as it does at login.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::link::{Incoming, Link};
use super::message::{CarriedClient, Message};

/// How long an older process has to greet after connecting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a forwarded cancel waits for the older process's answer.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A client handed over by an older process: its state and its socket.
pub struct Arrival {
    pub client: CarriedClient,
    pub socket: OwnedFd,
}

/// The bound handover socket and the links of older processes handing over.
#[derive(Clone)]
pub struct Intake {
    shared: Arc<Shared>,
}

struct Shared {
    instance: u64,
    path: PathBuf,
    /// Device and inode of the socket file we bound: it is removed at exit only if it is
    /// still ours (a newer process may have taken the path over).
    bound: (u64, u64),
    links: Mutex<Vec<Weak<Link>>>,
    /// Forwarded cancels waiting for their answer, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    next_id: AtomicU64,
}

impl Intake {
    /// Binds the handover socket at `path`, replacing an older process's socket file
    /// (anything else there is an error), readable by this user only, and accepts older
    /// processes until `stop`. Arrivals come out of the returned channel.
    pub fn bind(
        path: &Path,
        instance: u64,
        stop: CancellationToken,
    ) -> io::Result<(Intake, mpsc::UnboundedReceiver<Arrival>)> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::symlink_metadata(path)?;
        let intake = Intake {
            shared: Arc::new(Shared {
                instance,
                path: path.to_owned(),
                bound: (meta.dev(), meta.ino()),
                links: Mutex::new(Vec::new()),
                pending: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        let (arrivals, arrived) = mpsc::unbounded_channel();
        tokio::spawn(accept(listener, intake.clone(), arrivals, stop));
        Ok((intake, arrived))
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn unbind(&self) {
        let ours = std::fs::symlink_metadata(&self.shared.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.shared.bound);
        if ours {
            drop(std::fs::remove_file(&self.shared.path));
        }
    }

    /// Asks the older processes handing over whether one of their clients holds this cancel
    /// key, and has them cancel its query. `None`: no older process is connected.
    pub async fn forward_cancel(&self, pid: i32, secret: i32) -> Option<bool> {
        let links: Vec<Arc<Link>> = {
            let mut links = self
                .shared
                .links
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            links.retain(|link| link.strong_count() > 0);
            links.iter().filter_map(Weak::upgrade).collect()
        };
        if links.is_empty() {
            return None;
        }
        for link in links {
            if self.ask(link, pid, secret).await {
                return Some(true);
            }
        }
        Some(false)
    }

    async fn ask(&self, link: Arc<Link>, pid: i32, secret: i32) -> bool {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending().insert(id, answer);
        let request = Message::Cancel { id, pid, secret };
        // Spawned: the asker may be cancelled, a message cut in half may not.
        let sent = tokio::spawn(async move { link.send(&request, None).await }).await;
        let known = match sent {
            Ok(Ok(())) => matches!(
                tokio::time::timeout(CANCEL_TIMEOUT, answered).await,
                Ok(Ok(true))
            ),
            _ => false,
        };
        self.pending().remove(&id);
        known
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<bool>>> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn accept(
    listener: UnixListener,
    intake: Intake,
    arrivals: mpsc::UnboundedSender<Arrival>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(receive(stream, intake.clone(), arrivals.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the handover socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One older process's link: its greeting, then its clients, until it closes the link.
async fn receive(stream: UnixStream, intake: Intake, arrivals: mpsc::UnboundedSender<Arrival>) {
    let link = match Link::new(stream) {
        Ok(link) => Arc::new(link),
        Err(e) => {
            tracing::warn!(error = %e, "handover connection refused");
            return;
        }
    };
    if !greet(&link, &intake).await {
        return;
    }
    intake
        .shared
        .links
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Arc::downgrade(&link));
    let mut received = 0u64;
    loop {
        match link.recv().await {
            Ok(Some(Incoming {
                message: Message::Client { id, client },
                mut fds,
            })) => {
                let (Some(socket), true) = (fds.pop(), fds.is_empty()) else {
                    // Not taken: the older process tells the client when the link closes.
                    tracing::warn!("a handed-over client came without exactly one socket; dropped");
                    continue;
                };
                if arrivals.send(Arrival { client, socket }).is_err() {
                    return;
                }
                received += 1;
                if let Err(e) = link.send(&Message::Taken { id }, None).await {
                    tracing::warn!(error = %e, "confirming a handed-over client failed");
                }
            }
            Ok(Some(Incoming {
                message: Message::Cancelled { id, known },
                ..
            })) => {
                if let Some(answer) = intake.pending().remove(&id) {
                    let _ = answer.send(known);
                }
            }
            Ok(Some(other)) => {
                tracing::warn!(message = ?other.message, "unexpected message on the handover link");
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the handover link failed");
                break;
            }
        }
    }
    tracing::info!(
        received,
        "an older tenantgate finished handing over its clients"
    );
}

/// Reads the older process's greeting and answers it. False when the link goes no further:
/// the greeting did not come, or it came from this very process (no newer process had bound
/// the socket, so SIGUSR2 reached the newest one).
async fn greet(link: &Link, intake: &Intake) -> bool {
    let hello = tokio::time::timeout(GREETING_TIMEOUT, link.recv()).await;
    let Ok(Ok(Some(Incoming {
        message: Message::Hello { instance, version },
        ..
    }))) = hello
    else {
        tracing::warn!("a handover connection sent no greeting; closed");
        return false;
    };
    if instance == intake.shared.instance {
        let reason = "this process is the newest: it bound the handover socket itself. Start the new tenantgate first, then signal the old one".to_owned();
        drop(link.send(&Message::Refused { reason }, None).await);
        return false;
    }
    let welcome = Message::Welcome {
        instance: intake.shared.instance,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    if let Err(e) = link.send(&welcome, None).await {
        tracing::warn!(error = %e, "answering a handover greeting failed");
        return false;
    }
    tracing::info!(
        older_version = version,
        "an older tenantgate is handing its clients over"
    );
    true
}
