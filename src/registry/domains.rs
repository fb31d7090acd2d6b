//! Custom domains: `tenant_domains` rows mapping a DNS name (a TLS server name) to a tenant,
//! so `db.acme.com` reaches tenant `acme` as `acme.<sni_base_domain>` does. Changes NOTIFY the
//! same channel as tenant changes (the row's tenant slug), and the directory drops its domain
//! cache on any change.
//!
//! This module stores and reads; routing lives in `server::client`.

use super::{Registry, RegistryError, TenantSlug};

/// Why a domain could not be added.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("{0:?} is not a DNS name (lower-case letters, digits, hyphens, at least two labels)")]
    Invalid(String),
    #[error("domain {domain} already belongs to tenant {tenant}")]
    Taken { domain: String, tenant: String },
    #[error("no such tenant")]
    NoSuchTenant,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A server name as stored: lower case, no trailing dot; `None` if it is not a DNS name of
/// two or more labels.
pub fn normalize_domain(name: &str) -> Option<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    (labels_ok && name.contains('.') && name.len() <= 253).then_some(name)
}

impl Registry {
    /// The tenant a custom domain belongs to.
    pub async fn tenant_for_domain(
        &self,
        domain: &str,
    ) -> Result<Option<TenantSlug>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT tenant_slug FROM tenant_domains WHERE domain = $1",
                &[&domain],
            )
            .await?;
        Ok(row
            .map(|r| r.try_get::<_, String>(0))
            .transpose()?
            .and_then(|s| TenantSlug::parse(&s)))
    }

    /// Every custom domain, as (domain, tenant), by domain.
    pub async fn domains(&self) -> Result<Vec<(String, String)>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT domain, tenant_slug FROM tenant_domains ORDER BY domain",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Gives `domain` to the tenant. Adding a domain the tenant already has is not an error.
    pub async fn add_domain(&self, slug: &TenantSlug, domain: &str) -> Result<(), DomainError> {
        let domain =
            normalize_domain(domain).ok_or_else(|| DomainError::Invalid(domain.to_owned()))?;
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "WITH t AS (SELECT slug FROM tenants WHERE slug = $1 AND state <> 'deleted'), \
                 ins AS (INSERT INTO tenant_domains (domain, tenant_slug) \
                         SELECT $2, slug FROM t ON CONFLICT (domain) DO NOTHING RETURNING 1) \
                 SELECT (SELECT count(*) FROM t), \
                        (SELECT tenant_slug FROM tenant_domains WHERE domain = $2), \
                        (SELECT count(*) FROM ins)",
                &[&slug.as_str(), &domain],
            )
            .await
            .map_err(RegistryError::from)?;
        let tenants: i64 = row
            .as_ref()
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(RegistryError::from)?;
        if tenants == 0 {
            return Err(DomainError::NoSuchTenant);
        }
        let owner: Option<String> = row
            .as_ref()
            .map_or(Ok(None), |r| r.try_get(1))
            .map_err(RegistryError::from)?;
        let inserted: i64 = row
            .as_ref()
            .map_or(Ok(0), |r| r.try_get(2))
            .map_err(RegistryError::from)?;
        match owner {
            // The CTE's snapshot does not see its own insert.
            None if inserted > 0 => Ok(()),
            Some(owner) if owner == slug.as_str() => Ok(()),
            Some(owner) => Err(DomainError::Taken {
                domain,
                tenant: owner,
            }),
            None => Err(DomainError::Taken {
                domain,
                tenant: "another tenant".to_owned(),
            }),
        }
    }

    /// Takes `domain` from the tenant. Returns false if the tenant did not have it.
    pub async fn drop_domain(
        &self,
        slug: &TenantSlug,
        domain: &str,
    ) -> Result<bool, RegistryError> {
        let Some(domain) = normalize_domain(domain) else {
            return Ok(false);
        };
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM tenant_domains WHERE domain = $1 AND tenant_slug = $2",
                &[&domain, &slug.as_str()],
            )
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_lower_case_dns_names() {
        assert_eq!(
            normalize_domain("DB.Acme.com.").as_deref(),
            Some("db.acme.com")
        );
        for bad in [
            "localhost",
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a b.c",
            "a_b.c",
            "é.com",
        ] {
            assert_eq!(normalize_domain(bad), None, "{bad}");
        }
    }
}
