//! How each user logs in: the auth method (`scram`, `cert`, `cert+scram`) next to its SCRAM
//! verifier, for tenant users and admin users, and the tenant users' rows themselves (a
//! verifier set or replaced, a user removed). Read on the login path (through the directory's
//! cache for tenant users), written by the admin console and the CLI.
//!
//! This module stores and reads; it must not decide whether a login succeeds (`server::client`
//! does, with the verified client certificate rustls hands it).

use std::fmt;

use super::{Registry, RegistryError, TenantSlug};

/// A user's authentication method, as PostgreSQL's pg_hba `scram-sha-256` and `cert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 with the stored verifier (the default).
    #[default]
    Scram,
    /// A verified client certificate whose subject CN is the user name; no password.
    Cert,
    /// Both: the certificate, then SCRAM.
    CertScram,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Scram => "scram",
            AuthMethod::Cert => "cert",
            AuthMethod::CertScram => "cert+scram",
        }
    }

    /// `scram`, `cert` or `cert+scram` (any case).
    pub fn parse(text: &str) -> Option<AuthMethod> {
        match text.to_ascii_lowercase().as_str() {
            "scram" | "scram-sha-256" => Some(AuthMethod::Scram),
            "cert" => Some(AuthMethod::Cert),
            "cert+scram" => Some(AuthMethod::CertScram),
            _ => None,
        }
    }

    /// Whether a verified client certificate naming the user is required.
    pub fn needs_certificate(self) -> bool {
        matches!(self, AuthMethod::Cert | AuthMethod::CertScram)
    }

    /// Whether the SCRAM exchange is part of the login.
    pub fn needs_password(self) -> bool {
        matches!(self, AuthMethod::Scram | AuthMethod::CertScram)
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the login path needs to know about one user.
#[derive(Debug, Clone)]
pub struct UserLogin {
    pub method: AuthMethod,
    /// `SCRAM-SHA-256$...`.
    pub verifier: String,
}

fn login_from_row(row: &tokio_postgres::Row, who: &str) -> Result<UserLogin, RegistryError> {
    let method: String = row.try_get(1)?;
    Ok(UserLogin {
        verifier: row.try_get(0)?,
        method: AuthMethod::parse(&method).ok_or_else(|| RegistryError::BadRow {
            slug: who.to_owned(),
            what: format!("unknown auth_method {method:?}"),
        })?,
    })
}

impl Registry {
    /// A tenant user's auth method and verifier; `None` if there is no such user.
    pub async fn user_login(
        &self,
        slug: &TenantSlug,
        user: &str,
    ) -> Result<Option<UserLogin>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT scram_verifier, auth_method FROM tenant_users \
                 WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user],
            )
            .await?;
        row.map(|r| login_from_row(&r, slug.as_str())).transpose()
    }

    /// The stored SCRAM verifier of a tenant's user.
    pub async fn user_verifier(
        &self,
        slug: &TenantSlug,
        user: &str,
    ) -> Result<Option<String>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT scram_verifier FROM tenant_users WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Creates or replaces a tenant user's verifier.
    pub async fn set_user(
        &self,
        slug: &TenantSlug,
        user: &str,
        verifier: &str,
    ) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO tenant_users (tenant_slug, username, scram_verifier) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_slug, username) DO UPDATE \
             SET scram_verifier = EXCLUDED.scram_verifier, updated_at = now()",
            &[&slug.as_str(), &user, &verifier],
        )
        .await?;
        Ok(())
    }

    /// Removes a tenant user. Returns false if there was no such user.
    pub async fn delete_user(&self, slug: &TenantSlug, user: &str) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM tenant_users WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user],
            )
            .await?;
        Ok(n > 0)
    }

    /// The key mock SCRAM salts are derived from (registry migration 5): the same for every
    /// instance and across restarts.
    pub async fn mock_scram_key(&self) -> Result<[u8; 32], RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one("SELECT key FROM proxy_keys WHERE name = 'mock_scram'", &[])
            .await?;
        let stored: Vec<u8> = row.try_get(0)?;
        // Hashed to 32 bytes whatever length is stored (at least 16, by the table's check).
        Ok(<sha2::Sha256 as sha2::Digest>::digest(&stored).into())
    }

    /// An admin user's auth method and verifier; `None` if there is no such admin user.
    pub async fn admin_login(&self, user: &str) -> Result<Option<UserLogin>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT scram_verifier, auth_method FROM admin_users WHERE username = $1",
                &[&user],
            )
            .await?;
        row.map(|r| login_from_row(&r, "admin_users")).transpose()
    }

    /// Sets a tenant user's auth method. Returns false if there is no such user.
    pub async fn set_user_auth(
        &self,
        slug: &TenantSlug,
        user: &str,
        method: AuthMethod,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenant_users SET auth_method = $3, updated_at = now() \
                 WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user, &method.as_str()],
            )
            .await?;
        Ok(n > 0)
    }

    /// Sets an admin user's auth method. Returns false if there is no such admin user.
    pub async fn set_admin_auth(
        &self,
        user: &str,
        method: AuthMethod,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE admin_users SET auth_method = $2 WHERE username = $1",
                &[&user, &method.as_str()],
            )
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_round_trip_and_say_what_they_need() {
        for m in [AuthMethod::Scram, AuthMethod::Cert, AuthMethod::CertScram] {
            assert_eq!(AuthMethod::parse(m.as_str()), Some(m));
        }
        assert_eq!(AuthMethod::parse("CERT"), Some(AuthMethod::Cert));
        assert_eq!(AuthMethod::parse("md5"), None);
        assert!(!AuthMethod::Scram.needs_certificate());
        assert!(AuthMethod::Cert.needs_certificate() && !AuthMethod::Cert.needs_password());
        assert!(
            AuthMethod::CertScram.needs_certificate() && AuthMethod::CertScram.needs_password()
        );
    }
}
