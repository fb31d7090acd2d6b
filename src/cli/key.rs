//! `tenantgate key rotate|retire`: the master key that encrypts stored secrets, through the
//! library's `rekey` (which the admin console's ROTATE MASTER KEY uses too). It prints key ids
//! and counts; it must never print or log a key.

use clap::Subcommand;
use tenantgate::config::{Config, ConfigError};
use tenantgate::crypto::{KeySource, MasterKey};
use tenantgate::registry::Registry;
use tenantgate::rekey;

use super::open_registry;
use super::terminal::say;

#[derive(Subcommand)]
pub(super) enum KeyCommand {
    /// Generate a new master key, write the key file as the new key then the old ones, and
    /// re-encrypt every stored secret under the new key. Prints the new key's id, never the
    /// key.
    Rotate,
    /// Once every stored secret is under the current key (and every instance has re-read the
    /// key file), drop the old keys from the key file.
    Retire,
}

/// `key rotate` and `key retire`. A key from the environment cannot be rewritten: one line,
/// exit code 2, as for a broken config.
pub(super) async fn run(config: &Config, cmd: KeyCommand) -> anyhow::Result<()> {
    let key = MasterKey::load(&config.secrets)?;
    if let KeySource::Env(var) = key.source() {
        let shown = config
            .source
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        return Err(ConfigError::Invalid {
            path: shown,
            key: "secrets.master_key_file".to_owned(),
            message: rekey::RekeyError::EnvSource { var: var.clone() }.to_string(),
        }
        .into());
    }
    let registry = open_registry(config).await?;
    match cmd {
        KeyCommand::Rotate => {
            let done = rekey::rotate(&registry, &key).await?;
            let detail = format!(
                "key id {}, {} secrets re-encrypted",
                done.key_id, done.reencrypted
            );
            log(&registry, "key.rotate", &detail).await;
            say(&format!(
                "master key rotated: new key id {}, {} secret(s) re-encrypted, {} key(s) in the key file; run `tenantgate key retire` once every instance has re-read it (RELOAD)",
                done.key_id, done.reencrypted, done.keys
            ))
        }
        KeyCommand::Retire => {
            let done = rekey::retire(&registry, &key).await?;
            let detail = format!("key id {}, {} old keys dropped", done.key_id, done.dropped);
            log(&registry, "key.retire", &detail).await;
            say(&format!(
                "old master keys retired: {} dropped, {} secret(s) under key id {}",
                done.dropped, done.secrets, done.key_id
            ))
        }
    }
}

/// Records the change in the activity log, as the admin console's commands do; a failure to
/// log does not undo it.
async fn log(registry: &Registry, action: &str, detail: &str) {
    drop(
        registry
            .log_activity(None, "cli", action, Some(detail))
            .await,
    );
}
