//! Upgrades without disconnects: an older tenantgate hands its idle transaction-pooling
//! plaintext clients, socket and state, to a newer one over a Unix socket (`SCM_RIGHTS`).
//!
//! The flow: the newer process binds `[proxy] handover_socket` when it starts (`incoming`),
//! taking the path over. SIGUSR2 to the older one connects there (`outgoing`): if a newer
//! process answers, the older one stops accepting, and each of its plaintext
//! transaction-pooling sessions leaves at its next point between transactions where nothing
//! of it is buffered (`session` decides that), as a [`CarriedClient`] with its socket. The
//! newer process resumes it without a greeting; what the client sends next is read there. A
//! CancelRequest that reaches the newer process with a key it did not issue is forwarded over
//! the link to the older ones. Messages are JSON (`message`), framed with descriptors
//! (`wire`), over one link per older process (`link`).
//!
//! This module moves clients between processes; it must not relay, authenticate or start
//! sessions (`server` does, from the [`Arrival`]s).

mod incoming;
mod link;
mod message;
mod outgoing;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use incoming::{Arrival, Intake};
pub use message::{CarriedClient, CarriedStatement};
pub use outgoing::Departures;

use crate::session::CancelMap;

/// Why a handover did not start.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("[proxy] handover_socket is not set: there is nowhere to hand clients over to")]
    NotConfigured,
    #[error("a handover is already under way")]
    AlreadyStarted,
    #[error("no newer tenantgate answered on the handover socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("the handover socket did not answer in time")]
    Timeout,
    #[error("the handover was refused: {0}")]
    Refused(String),
    #[error("the handover link broke its protocol: {0}")]
    Protocol(String),
}

/// This process's part in handovers, both ways: the socket it bound (clients come in) and,
/// once SIGUSR2 came, the link its clients leave by.
pub struct Handover {
    /// Random per process: tells a process that it reached itself.
    instance: u64,
    path: Option<PathBuf>,
    intake: Option<Intake>,
    /// Cancelled when this process starts handing its clients over.
    requested: CancellationToken,
    departures: OnceLock<Departures>,
    starting: tokio::sync::Mutex<()>,
}

impl Handover {
    /// Binds `path` (when set) for clients of older processes, until `stop`.
    pub fn bind(
        path: Option<&Path>,
        stop: &CancellationToken,
    ) -> std::io::Result<(Handover, Option<mpsc::UnboundedReceiver<Arrival>>)> {
        let instance = rand::random::<u64>();
        let (intake, arrivals) = match path {
            Some(path) => {
                let (intake, arrivals) = Intake::bind(path, instance, stop.clone())?;
                (Some(intake), Some(arrivals))
            }
            None => (None, None),
        };
        let handover = Handover {
            instance,
            path: path.map(Path::to_owned),
            intake,
            requested: CancellationToken::new(),
            departures: OnceLock::new(),
            starting: tokio::sync::Mutex::new(()),
        };
        Ok((handover, arrivals))
    }

    /// Whether clients may leave this process at all (a handover socket is configured).
    pub fn is_configured(&self) -> bool {
        self.path.is_some()
    }

    /// Cancelled once a handover started: sessions that can leave do, between transactions.
    pub fn requested(&self) -> &CancellationToken {
        &self.requested
    }

    /// The link clients leave by, once a handover started.
    pub fn departures(&self) -> Option<&Departures> {
        self.departures.get()
    }

    /// Starts handing clients over to the newer process on the handover socket. Fails,
    /// changing nothing, when none answers there.
    pub async fn begin(&self, cancels: CancelMap) -> Result<(), HandoverError> {
        let path = self.path.as_deref().ok_or(HandoverError::NotConfigured)?;
        let _starting = self
            .starting
            .try_lock()
            .map_err(|_| HandoverError::AlreadyStarted)?;
        if self.departures.get().is_some() {
            return Err(HandoverError::AlreadyStarted);
        }
        let departures = outgoing::connect(path, self.instance, cancels).await?;
        if self.departures.set(departures).is_err() {
            return Err(HandoverError::AlreadyStarted);
        }
        self.requested.cancel();
        Ok(())
    }

    /// See [`Intake::forward_cancel`]; `None` without an older process handing over.
    pub async fn forward_cancel(&self, pid: i32, secret: i32) -> Option<bool> {
        match &self.intake {
            Some(intake) => intake.forward_cancel(pid, secret).await,
            None => None,
        }
    }

    /// At exit: removes the handover socket file if it is still this process's.
    pub fn unbind(&self) {
        if let Some(intake) = &self.intake {
            intake.unbind();
        }
    }
}
