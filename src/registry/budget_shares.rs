//! The `budget_shares` table: per backend server and instance, a lease on a share of the
//! server's connection budget (schema: `migrations/registry/0008_budget_shares.sql`). Times are
//! the registry's clock, as for `instances`.
//!
//! This module reads and writes rows, and keeps the table's one invariant: a share grows only
//! inside [`Registry::renew_share`]'s transaction, under an advisory lock keyed by the server,
//! where the caller sees every live lease of that server before deciding. What share to ask
//! for belongs to `crate::instance::budget`; this module must not decide it, nor liveness (the
//! caller passes the TTL).

use std::time::Duration;

use super::{Registry, RegistryError};

/// Key space of the per-server advisory lock ("tgbudget"); the second key is the server's
/// name hashed by PostgreSQL.
const LOCK_SPACE: i32 = 0x7467_6275;

/// One live lease of a server's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    pub instance_id: String,
    pub share: u32,
    pub demand: u32,
}

/// What an instance records at a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareRecord {
    pub share: u32,
    pub demand: u32,
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl Registry {
    /// Renews `me`'s lease on `server`: in one transaction under the server's lock, deletes
    /// the lapsed leases (renewed more than `ttl` ago), reads the live ones (`me`'s included,
    /// if it has one), records what `decide` makes of them, and commits. Returns the rows
    /// `decide` saw.
    pub async fn renew_share(
        &self,
        server: &str,
        me: &str,
        ttl: Duration,
        decide: impl FnOnce(&[ShareRow]) -> ShareRecord,
    ) -> Result<(Vec<ShareRow>, ShareRecord), RegistryError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&LOCK_SPACE, &server],
        )
        .await?;
        tx.execute(
            "DELETE FROM budget_shares \
             WHERE server = $1 AND renewed_at < now() - make_interval(secs => $2)",
            &[&server, &ttl.as_secs_f64()],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT instance_id, share, demand FROM budget_shares \
                 WHERE server = $1 ORDER BY instance_id",
                &[&server],
            )
            .await?;
        let mut live = Vec::with_capacity(rows.len());
        for row in rows {
            let instance_id: String = row.try_get(0)?;
            let share: i32 = row.try_get(1)?;
            let demand: i32 = row.try_get(2)?;
            let (Ok(share), Ok(demand)) = (u32::try_from(share), u32::try_from(demand)) else {
                return Err(RegistryError::BadRow {
                    slug: format!("budget share {server}/{instance_id}"),
                    what: format!("share {share} or demand {demand} negative"),
                });
            };
            live.push(ShareRow {
                instance_id,
                share,
                demand,
            });
        }
        let record = decide(&live);
        tx.execute(
            "INSERT INTO budget_shares (server, instance_id, share, demand) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (server, instance_id) DO UPDATE \
             SET share = EXCLUDED.share, demand = EXCLUDED.demand, renewed_at = now()",
            &[&server, &me, &int(record.share), &int(record.demand)],
        )
        .await?;
        tx.commit().await?;
        Ok((live, record))
    }

    /// Lowers `me`'s share of `server` (never raises it: growing takes `renew_share`), once
    /// the instance holds no more than `share` connections there. Needs no lock: a smaller
    /// share cannot break the sum.
    pub async fn lower_share(
        &self,
        server: &str,
        me: &str,
        share: u32,
    ) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE budget_shares SET share = $3 \
             WHERE server = $1 AND instance_id = $2 AND share > $3",
            &[&server, &me, &int(share)],
        )
        .await?;
        Ok(())
    }

    /// Deletes `me`'s leases (clean shutdown, once its backend connections are closed).
    pub async fn remove_shares(&self, me: &str) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute("DELETE FROM budget_shares WHERE instance_id = $1", &[&me])
            .await?;
        Ok(())
    }
}
