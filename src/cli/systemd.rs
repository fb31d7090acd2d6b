//! sd_notify(3) for `tenantgate serve` under a service manager (systemd `Type=notify`):
//! `READY=1` once the proxy accepts clients, `RELOADING=1` ... `READY=1` around a SIGHUP
//! reload, `STOPPING=1` when a shutdown starts, each with a `STATUS=` line for
//! `systemctl status`. Without `NOTIFY_SOCKET` nothing is sent.
//!
//! Only a filesystem path in `NOTIFY_SOCKET` is supported (what systemd sets): the sd-notify
//! crate does not do abstract socket names (`@name`), so for one a warning is logged once and
//! nothing is sent. A failed send is logged, never fatal: clients do not need the service
//! manager. This file reports the proxy's life; it must not decide any of it.

use sd_notify::NotifyState;

/// Sends the service manager the proxy's state changes, when there is one to tell.
pub(super) struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// A notifier for this process's `NOTIFY_SOCKET`, if any.
    pub(super) fn from_env() -> Notifier {
        let enabled = match std::env::var_os("NOTIFY_SOCKET") {
            None => false,
            Some(path) if path.as_encoded_bytes().starts_with(b"@") => {
                tracing::warn!(
                    socket = %path.to_string_lossy(),
                    "NOTIFY_SOCKET names an abstract socket, which tenantgate does not support; \
                     no readiness notifications will be sent"
                );
                false
            }
            Some(_) => true,
        };
        Notifier { enabled }
    }

    /// `READY=1`: the proxy accepts clients (at start, and again after a reload).
    pub(super) fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with the monotonic time systemd >= 253 asks for; `ready` follows when
    /// the reload is done, whatever its outcome (a refused file leaves the old config serving).
    pub(super) fn reloading(&self) {
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the config"),
        ];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    /// `STOPPING=1`: a shutdown started; `status` says which kind.
    pub(super) fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify to NOTIFY_SOCKET failed");
        }
    }
}
