//! The `instances` table: one row per running tenantgate instance sharing this registry, with
//! its cancel-key tag, the address other instances reach it at, and the counters of its last
//! heartbeat (schema: `migrations/registry/0007_instances.sql`). Every time here is the
//! registry's clock (`now()`), so instances with skewed clocks still agree on who is live.
//!
//! This module only reads and writes rows; when to write them (start, heartbeat, shutdown) and
//! what a tag means belong to `crate::instance`. It must not decide liveness on its own: the
//! caller passes the TTL.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Registry, RegistryError};

/// Highest tag (tags are 1..=255: one byte of a cancel key, 0 meaning "no instance").
const MAX_TAG: i32 = 255;

/// How often `register_instance` tries again when another instance took the tag it picked.
const REGISTER_ATTEMPTS: usize = 5;

/// One live instance as the registry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub id: String,
    pub tag: u8,
    /// host:port, when the instance advertises one.
    pub address: Option<String>,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub clients: i64,
    pub backends: i64,
    pub budget: Option<i64>,
    pub version: String,
}

/// What an instance writes about itself at registration and every heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct InstanceReport<'a> {
    pub id: &'a str,
    pub address: Option<&'a str>,
    pub clients: i64,
    pub backends: i64,
    pub budget: Option<i64>,
}

fn ttl_seconds(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

impl Registry {
    /// Deletes the rows of instances whose heartbeat is older than `ttl`, then inserts this
    /// instance's row with a tag no live instance holds: `prefer` if it is free, else a random
    /// free one (random, so a tag that just fell free is not the first one handed out again).
    /// `None` when all 255 tags are taken. Two instances starting together may pick the same
    /// tag: the UNIQUE constraint lets one win and the other tries again.
    pub async fn register_instance(
        &self,
        me: &InstanceReport<'_>,
        prefer: Option<u8>,
        ttl: Duration,
    ) -> Result<Option<u8>, RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
            &[&ttl_seconds(ttl)],
        )
        .await?;
        let prefer = prefer.map_or(0, i32::from);
        for _ in 0..REGISTER_ATTEMPTS {
            let row = conn
                .query_opt(
                    "INSERT INTO instances (id, tag, address, clients, backends, budget, version) \
                     SELECT $1, free.t::smallint, $2, $3, $4, $5, $6 FROM ( \
                       SELECT t FROM generate_series(1, $7::int) AS t \
                       WHERE t NOT IN (SELECT tag FROM instances) \
                       ORDER BY (t = $8::int) DESC, random() LIMIT 1) AS free \
                     ON CONFLICT DO NOTHING RETURNING tag",
                    &[
                        &me.id,
                        &me.address,
                        &me.clients,
                        &me.backends,
                        &me.budget,
                        &env!("CARGO_PKG_VERSION"),
                        &MAX_TAG,
                        &prefer,
                    ],
                )
                .await?;
            if let Some(row) = row {
                let tag: i16 = row.try_get(0)?;
                return Ok(u8::try_from(tag).ok());
            }
            let taken: i64 = conn
                .query_one("SELECT count(*) FROM instances", &[])
                .await?
                .try_get(0)?;
            if taken >= i64::from(MAX_TAG) {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Records a heartbeat with the instance's counters. False when its row is gone (another
    /// instance deleted it as stale): the caller registers again.
    pub async fn instance_heartbeat(&self, me: &InstanceReport<'_>) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let updated = conn
            .execute(
                "UPDATE instances SET heartbeat_at = now(), address = $2, clients = $3, \
                 backends = $4, budget = $5 WHERE id = $1",
                &[&me.id, &me.address, &me.clients, &me.backends, &me.budget],
            )
            .await?;
        Ok(updated > 0)
    }

    /// The instances whose heartbeat is at most `ttl` old, oldest start first. Rows older than
    /// that are deleted on the way (any instance may clean up after a dead one).
    pub async fn live_instances(&self, ttl: Duration) -> Result<Vec<InstanceRow>, RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
            &[&ttl_seconds(ttl)],
        )
        .await?;
        let rows = conn
            .query(
                "SELECT id, tag, address, started_at, heartbeat_at, clients, backends, budget, \
                 version FROM instances \
                 WHERE heartbeat_at >= now() - make_interval(secs => $1) \
                 ORDER BY started_at, id",
                &[&ttl_seconds(ttl)],
            )
            .await?;
        let mut live = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get(0)?;
            let tag: i16 = row.try_get(1)?;
            let Ok(tag) = u8::try_from(tag) else {
                return Err(RegistryError::BadRow {
                    slug: format!("instance {id}"),
                    what: format!("tag {tag} out of range"),
                });
            };
            live.push(InstanceRow {
                id,
                tag,
                address: row.try_get(2)?,
                started_at: row.try_get(3)?,
                heartbeat_at: row.try_get(4)?,
                clients: row.try_get(5)?,
                backends: row.try_get(6)?,
                budget: row.try_get(7)?,
                version: row.try_get(8)?,
            });
        }
        Ok(live)
    }

    /// Deletes this instance's row (clean shutdown).
    pub async fn remove_instance(&self, id: &str) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute("DELETE FROM instances WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }
}
