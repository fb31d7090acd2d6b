//! `[admin]`: the admin console's section. It lives here rather than in `admin` because the
//! console reads the whole config (SHOW CONFIG, and RELOAD diffs it), so `admin` depends on
//! `config`; the console's own code (creating the bootstrap user) stays in `admin`.

use serde::{Deserialize, Serialize};

use crate::crypto::Secret;

/// `[admin]`: the admin console.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Database name that reaches the admin console instead of a tenant. It cannot be a
    /// tenant slug too. Default "tenantgate".
    #[serde(default = "default_database")]
    pub database: String,
    /// Admin user created at start-up when it does not exist yet (an existing user keeps its
    /// password). Default: none.
    #[serde(default)]
    pub bootstrap_user: Option<String>,
    /// Password of `bootstrap_user`. Prefer `bootstrap_password_env`. Default: none.
    #[serde(default)]
    pub bootstrap_password: Option<Secret>,
    /// Environment variable holding `bootstrap_user`'s password; overrides
    /// `bootstrap_password`. Default: none.
    #[serde(default)]
    pub bootstrap_password_env: Option<String>,
}

fn default_database() -> String {
    "tenantgate".to_owned()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            database: default_database(),
            bootstrap_user: None,
            bootstrap_password: None,
            bootstrap_password_env: None,
        }
    }
}

impl AdminConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        if self.database.is_empty() {
            return Err(("admin.database".to_owned(), "must not be empty".to_owned()));
        }
        if self.bootstrap_user.as_deref() == Some("") {
            return Err((
                "admin.bootstrap_user".to_owned(),
                "must not be empty".to_owned(),
            ));
        }
        if self.bootstrap_user.is_some()
            && self.bootstrap_password.is_none()
            && self.bootstrap_password_env.is_none()
        {
            return Err((
                "admin.bootstrap_user".to_owned(),
                "needs bootstrap_password or bootstrap_password_env".to_owned(),
            ));
        }
        Ok(())
    }
}
