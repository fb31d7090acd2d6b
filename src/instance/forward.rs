//! A cancel request forwarded from the instance a client's CancelRequest reached (B) to the
//! instance that issued the key (A), and A's one-byte answer.
//!
//! On the wire (`crate::protocol::startup::forwarded_cancel`): length 48, request code
//! `0x54474643` ("TGFC", which PostgreSQL refuses as an unsupported protocol), pid, secret,
//! then HMAC-SHA-256 over pid || secret (big-endian) under the master key's subkey for
//! [`PURPOSE`] (`crate::crypto`: instances must share the master key, as they share the
//! registry's encrypted secrets anyway). A answers [`KNOWN`] or [`UNKNOWN`] and closes; a bad
//! MAC gets no answer, only the close. The key travels in the clear, as in a CancelRequest;
//! the MAC does not hide it, it proves the sender holds the master key. That is what lets A
//! trust the request as a peer's: A never forwards it again (no loops, no amplification) and
//! does not count it against the sending host's failed-cancel throttle (B has throttled the
//! real source already). A replayed forward does nothing a replayed CancelRequest with the
//! same key would not, so there is no nonce or timestamp.
//!
//! This file must not look up keys (`session::cancel` does) or read the registry.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::crypto::MasterKey;
use crate::protocol::startup::forwarded_cancel;
use crate::session::CancelOutcome;

/// The MAC's purpose: its subkey is good for nothing else.
const PURPOSE: &str = "cancel forward v1";

/// A's answer: it held the key (the cancel was delivered, or there was nothing to cancel).
const KNOWN: u8 = b'K';
/// A's answer: no client of A holds the key.
const UNKNOWN: u8 = b'U';

/// What became of a cancel this instance could not serve itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// The key's tag is 0, this instance's own, or no live instance's: dropped.
    NoInstance,
    /// The issuing instance held the key and acted on it.
    Delivered,
    /// The issuing instance holds no such key.
    UnknownKey,
    /// The issuing instance could not be reached, did not answer in time, or refused the MAC.
    Failed,
}

impl Forwarded {
    /// Whether the key counts as a guess against the source's cancel throttle.
    pub fn unknown_key(self) -> bool {
        matches!(self, Forwarded::NoInstance | Forwarded::UnknownKey)
    }
}

fn message(pid: i32, secret: i32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&pid.to_be_bytes());
    out[4..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// The MAC a forward of (pid, secret) carries.
pub fn forward_mac(key: &MasterKey, pid: i32, secret: i32) -> [u8; crate::crypto::MAC_BYTES] {
    key.sign(PURPOSE, &message(pid, secret))
}

/// Whether `mac` authenticates the forward of (pid, secret).
pub(super) fn verify(key: &MasterKey, pid: i32, secret: i32, mac: &[u8]) -> bool {
    key.verify(PURPOSE, &message(pid, secret), mac)
}

/// Sends the forward to `address` and reads the answer, all within `timeout`.
pub(super) async fn send(
    address: &str,
    pid: i32,
    secret: i32,
    key: &MasterKey,
    timeout: Duration,
) -> Forwarded {
    let mac = forward_mac(key, pid, secret);
    let packet = forwarded_cancel(pid, secret, &mac);
    match tokio::time::timeout(timeout, exchange(address, &packet)).await {
        Ok(Ok(KNOWN)) => {
            tracing::info!(%address, "cancel request forwarded to the instance that issued the key");
            Forwarded::Delivered
        }
        Ok(Ok(UNKNOWN)) => {
            tracing::debug!(%address, "the instance the key names does not hold it");
            Forwarded::UnknownKey
        }
        Ok(Ok(other)) => {
            tracing::warn!(%address, answer = other, "forwarding a cancel request: the instance answered something else (an older tenantgate, or not tenantgate)");
            Forwarded::Failed
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::warn!(%address, "forwarding a cancel request: the instance closed without an answer (a different master key?)");
            Forwarded::Failed
        }
        Ok(Err(e)) => {
            tracing::warn!(%address, error = %e, "forwarding a cancel request failed");
            Forwarded::Failed
        }
        Err(_) => {
            tracing::warn!(%address, "forwarding a cancel request timed out");
            Forwarded::Failed
        }
    }
}

async fn exchange(address: &str, packet: &[u8]) -> std::io::Result<u8> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    stream.write_all(packet).await?;
    stream.flush().await?;
    stream.read_u8().await
}

/// A's side, after [`super::Instances::accept_forward`]: the one-byte answer. A peer that has
/// gone away meanwhile is no error worth reporting.
pub async fn answer_forward<S: AsyncWrite + Unpin>(stream: &mut S, outcome: CancelOutcome) {
    let answer = match outcome {
        CancelOutcome::UnknownKey => UNKNOWN,
        CancelOutcome::Delivered | CancelOutcome::Idle | CancelOutcome::Failed => KNOWN,
    };
    if let Err(e) = async {
        stream.write_all(&[answer]).await?;
        stream.flush().await
    }
    .await
    {
        tracing::debug!(error = %e, "answering a forwarded cancel request failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_verifies_only_under_the_same_master_key_and_key() {
        let key = MasterKey::decode(&MasterKey::generate_encoded(), "test").unwrap();
        let other = MasterKey::decode(&MasterKey::generate_encoded(), "test").unwrap();
        let mac = key.sign(PURPOSE, &message(42, 7));
        assert!(verify(&key, 42, 7, &mac));
        assert!(!verify(&other, 42, 7, &mac));
        assert!(!verify(&key, 42, 8, &mac));
        assert!(!verify(&key, 43, 7, &mac));
        assert!(!verify(&key, 42, 7, &[0u8; 32]));
    }

    #[test]
    fn a_rotated_ring_still_believes_the_old_key() {
        let old = MasterKey::generate_encoded();
        let new = MasterKey::generate_encoded();
        let before = MasterKey::decode(&old, "test").unwrap();
        let after = MasterKey::decode(&format!("{new},{old}"), "test").unwrap();
        let mac = before.sign(PURPOSE, &message(1, 2));
        assert!(verify(&after, 1, 2, &mac));
    }
}
