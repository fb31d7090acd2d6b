//! Appending to the activity log (`activity_log`): who did what to which tenant, from the
//! admin console and the CLI. Reading it back is `listing`'s. This module must not be given a
//! password or a key to record.

use super::{Registry, RegistryError, TenantSlug};

impl Registry {
    /// Appends to the activity log.
    pub async fn log_activity(
        &self,
        slug: Option<&TenantSlug>,
        actor: &str,
        action: &str,
        detail: Option<&str>,
    ) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO activity_log (tenant_slug, actor, action, detail) VALUES ($1, $2, $3, $4)",
            &[&slug.map(TenantSlug::as_str), &actor, &action, &detail],
        )
        .await?;
        Ok(())
    }
}
