//! The older process's side of a handover (SIGUSR2): connect to the handover socket, make
//! sure a newer process answers there (not this one), then send each client that reaches a
//! point where it may leave, its socket with it, and answer the cancel requests the newer
//! process forwards for clients still here.
//!
//! It must not choose when a client leaves (its session does, between transactions) nor
//! touch the client's bytes.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::oneshot;

use super::HandoverError;
use super::link::{Incoming, Link};
use super::message::{CarriedClient, Message};
use crate::session::{CancelMap, CancelOutcome};

/// How long the newer process has to answer the greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the newer process has to take a client it was sent.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The link to the newer process, for clients on their way.
pub struct Departures {
    link: Arc<Link>,
    /// Clients sent and not yet taken, by id; emptied when the link closes.
    untaken: Untaken,
    next_id: AtomicU64,
}

type Untaken = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// Connects to the newer process at `path` and greets it. Fails, changing nothing, when no
/// newer process answers (the socket is this process's own, or nobody listens).
pub(super) async fn connect(
    path: &Path,
    instance: u64,
    cancels: CancelMap,
) -> Result<Departures, HandoverError> {
    let stream = tokio::time::timeout(GREETING_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| HandoverError::Timeout)?
        .map_err(HandoverError::Connect)?;
    let link = Arc::new(Link::new(stream).map_err(HandoverError::Connect)?);
    let hello = Message::Hello {
        instance,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    link.send(&hello, None)
        .await
        .map_err(HandoverError::Connect)?;
    let answer = tokio::time::timeout(GREETING_TIMEOUT, link.recv())
        .await
        .map_err(|_| HandoverError::Timeout)?
        .map_err(HandoverError::Connect)?;
    match answer.map(|incoming| incoming.message) {
        Some(Message::Welcome { version, .. }) => {
            tracing::info!(
                newer_version = version,
                "a newer tenantgate takes this process's clients"
            );
        }
        Some(Message::Refused { reason }) => return Err(HandoverError::Refused(reason)),
        other => {
            return Err(HandoverError::Protocol(format!(
                "unexpected answer to the greeting: {other:?}"
            )));
        }
    }
    let untaken = Untaken::default();
    tokio::spawn(read_link(Arc::clone(&link), cancels, Arc::clone(&untaken)));
    Ok(Departures {
        link,
        untaken,
        next_id: AtomicU64::new(1),
    })
}

impl Departures {
    /// Sends a client and its socket, and waits until the newer process took it. On
    /// failure (the link broke, the newer process died with the client in flight or did not
    /// take it in time) the socket comes back, so the client can be told. The client task
    /// awaits it to its end: it is not cancelled midway.
    pub async fn send(
        &self,
        client: CarriedClient,
        socket: OwnedFd,
    ) -> Result<(), (io::Error, OwnedFd)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (taken, taken_rx) = oneshot::channel();
        lock(&self.untaken).insert(id, taken);
        let message = Message::Client { id, client };
        if let Err(e) = self.link.send(&message, Some(&socket)).await {
            lock(&self.untaken).remove(&id);
            return Err((e, socket));
        }
        match tokio::time::timeout(TAKE_TIMEOUT, taken_rx).await {
            // Our copy of the descriptor closes here; the newer process holds its own.
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err((
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the newer process closed the handover link before taking the client",
                ),
                socket,
            )),
            Err(_) => {
                lock(&self.untaken).remove(&id);
                Err((
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the newer process did not take the client in time",
                    ),
                    socket,
                ))
            }
        }
    }
}

fn lock(untaken: &Untaken) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
    untaken.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the newer process's messages until the link closes: clients it took, and cancel
/// requests it forwards (answered here). When the link closes, clients not taken yet fail.
async fn read_link(link: Arc<Link>, cancels: CancelMap, untaken: Untaken) {
    read_messages(&link, &cancels, &untaken).await;
    lock(&untaken).clear();
}

async fn read_messages(link: &Arc<Link>, cancels: &CancelMap, untaken: &Untaken) {
    loop {
        match link.recv().await {
            Ok(Some(Incoming {
                message: Message::Taken { id },
                ..
            })) => {
                if let Some(taken) = lock(untaken).remove(&id) {
                    let _ = taken.send(());
                }
            }
            Ok(Some(Incoming {
                message: Message::Cancel { id, pid, secret },
                ..
            })) => {
                let link = Arc::clone(link);
                let cancels = cancels.clone();
                tokio::spawn(async move {
                    let outcome = cancels.cancel(pid, secret, Duration::from_secs(5)).await;
                    let known = outcome != CancelOutcome::UnknownKey;
                    if let Err(e) = link.send(&Message::Cancelled { id, known }, None).await {
                        tracing::debug!(error = %e, "answering a forwarded cancel failed");
                    }
                });
            }
            Ok(Some(other)) => {
                tracing::warn!(message = ?other.message, "unexpected message on the handover link");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "the handover link failed");
                return;
            }
        }
    }
}
