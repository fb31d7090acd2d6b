//! Messages between tenantgate instances through the registry's NOTIFY: admin commands that act
//! on live state (`COMMANDS_CHANNEL`), the answers of the instances that ran them
//! (`ANSWERS_CHANNEL`), and calls to look at a server's budget shares again (`BUDGET_CHANNEL`). This module only carries text: what a message means, and running it,
//! is the admin console's. It must not execute anything. Whoever can NOTIFY in the registry
//! database can send commands here: registry access is control of every instance.

use super::{Registry, RegistryError};

/// The channel an instance announces an admin command on, for every other instance to run.
pub const COMMANDS_CHANNEL: &str = "tenantgate_commands";

/// The channel instances answer a command on (the payload names the command's id).
pub const ANSWERS_CHANNEL: &str = "tenantgate_command_answers";

/// The channel an instance calls the others on to renew their lease on a server's budget now,
/// not at their next heartbeat: it wants more than they leave, or it gave some back. The
/// payload is `instance_id server`.
pub const BUDGET_CHANNEL: &str = "tenantgate_budget";

/// A notification from another instance (or this one: a listener hears its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// A payload sent on [`COMMANDS_CHANNEL`].
    Command(String),
    /// A payload sent on [`ANSWERS_CHANNEL`].
    Answer(String),
    /// A payload sent on [`BUDGET_CHANNEL`].
    Budget(String),
}

impl PeerMessage {
    /// The message a notification on `channel` carries, if it is a channel of ours.
    pub(super) fn on(channel: &str, payload: &str) -> Option<PeerMessage> {
        match channel {
            COMMANDS_CHANNEL => Some(PeerMessage::Command(payload.to_owned())),
            ANSWERS_CHANNEL => Some(PeerMessage::Answer(payload.to_owned())),
            BUDGET_CHANNEL => Some(PeerMessage::Budget(payload.to_owned())),
            _ => None,
        }
    }
}

impl Registry {
    /// Sends `payload` on `channel` (one of this module's); every instance listening hears it
    /// once the statement commits. PostgreSQL refuses payloads of 8000 bytes or more.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await?;
        Ok(())
    }
}
