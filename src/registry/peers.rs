//! Messages between tenantgate instances through the registry's NOTIFY: admin commands that act
//! on live state (`COMMANDS_CHANNEL`) and the answers of the instances that ran them
//! (`ANSWERS_CHANNEL`). This module only carries text: what a message means, and running it,
//! is the admin console's. It must not execute anything. Whoever can NOTIFY in the registry
//! database can send commands here: registry access is control of every instance.

use super::{Registry, RegistryError};

/// The channel an instance announces an admin command on, for every other instance to run.
pub const COMMANDS_CHANNEL: &str = "tenantgate_commands";

/// The channel instances answer a command on (the payload names the command's id).
pub const ANSWERS_CHANNEL: &str = "tenantgate_command_answers";

/// A notification from another instance (or this one: a listener hears its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// A payload sent on [`COMMANDS_CHANNEL`].
    Command(String),
    /// A payload sent on [`ANSWERS_CHANNEL`].
    Answer(String),
}

impl PeerMessage {
    /// The message a notification on `channel` carries, if it is a channel of ours.
    pub(super) fn on(channel: &str, payload: &str) -> Option<PeerMessage> {
        match channel {
            COMMANDS_CHANNEL => Some(PeerMessage::Command(payload.to_owned())),
            ANSWERS_CHANNEL => Some(PeerMessage::Answer(payload.to_owned())),
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
