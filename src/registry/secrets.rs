//! The stored secrets (today the tenants' encrypted backend passwords) as the master-key
//! rotation sees them: how many are not bound to their row yet, and one locked rewrite of all
//! of them. This module moves ciphertext only; it must not encrypt or decrypt (`crypto` and
//! `rekey` do) nor log a secret.

use super::{Registry, RegistryError, TenantSlug};

/// One stored secret: the tenant it belongs to and its ciphertext (`crate::crypto` format).
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub slug: TenantSlug,
    pub blob: Vec<u8>,
}

/// The advisory lock key that serializes secret rewrites (key rotation) across instances.
const SECRETS_LOCK: i64 = 0x7465_6e61_6e74_6b72; // "tenantkr"

impl Registry {
    /// How many stored secrets are not bound to their row yet (formats v1 and v2; bound ones
    /// start with the byte 3).
    pub async fn unbound_secrets(&self) -> Result<i64, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT count(*) FROM tenants \
                 WHERE substring(backend_password_enc FROM 1 FOR 1) IS DISTINCT FROM '\\x03'::bytea",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Rewrites every stored secret (today: `tenants.backend_password_enc`) in one
    /// transaction: every tenant row is locked (`FOR UPDATE`), `rewrite` sees each secret
    /// and returns the ones to replace, and those are written before the commit. An
    /// advisory lock makes two rewrites (two instances rotating at once) take turns. If
    /// `rewrite` fails, nothing changes. Returns how many secrets were replaced.
    pub async fn rewrite_secrets<F, E>(&self, rewrite: F) -> Result<usize, E>
    where
        F: FnOnce(Vec<StoredSecret>) -> Result<Vec<StoredSecret>, E>,
        E: From<RegistryError>,
    {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(RegistryError::from)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SECRETS_LOCK])
            .await
            .map_err(RegistryError::from)?;
        let rows = tx
            .query(
                "SELECT slug, backend_password_enc FROM tenants ORDER BY slug FOR UPDATE",
                &[],
            )
            .await
            .map_err(RegistryError::from)?;
        let mut secrets = Vec::with_capacity(rows.len());
        for row in &rows {
            let slug: String = row.try_get(0).map_err(RegistryError::from)?;
            let slug = TenantSlug::parse(&slug).ok_or_else(|| RegistryError::BadRow {
                slug: slug.clone(),
                what: "slug".to_owned(),
            })?;
            secrets.push(StoredSecret {
                slug,
                blob: row.try_get(1).map_err(RegistryError::from)?,
            });
        }
        let replaced = rewrite(secrets)?;
        if !replaced.is_empty() {
            let slugs: Vec<&str> = replaced.iter().map(|s| s.slug.as_str()).collect();
            let blobs: Vec<&[u8]> = replaced.iter().map(|s| s.blob.as_slice()).collect();
            tx.execute(
                "UPDATE tenants AS t SET backend_password_enc = d.enc \
                 FROM unnest($1::text[], $2::bytea[]) AS d(slug, enc) WHERE t.slug = d.slug",
                &[&slugs, &blobs],
            )
            .await
            .map_err(RegistryError::from)?;
        }
        tx.commit().await.map_err(RegistryError::from)?;
        Ok(replaced.len())
    }
}
