//! What a password given to tenantgate is (CREATE/ALTER USER, CREATE/ALTER ADMIN USER, `user
//! add`), decided as PostgreSQL's `get_password_type` decides it for `CREATE ROLE ... PASSWORD`:
//! a SCRAM-SHA-256 verifier is stored as it is, so users moved over from another server keep
//! their password without anyone knowing it; an md5 hash is refused (logins here are SCRAM
//! only); anything else is a plaintext password that becomes a verifier.
//!
//! One difference from PostgreSQL: a text that starts like a SCRAM verifier but does not parse
//! is refused, where PostgreSQL would take it for a plaintext password. Nobody means that as a
//! password, and storing its hash would lock the user out without a word.
//!
//! This module must not store anything, and must not put a password or a verifier in an error
//! or a log line.

use super::scram::{MECHANISM, ScramSecret, VerifierError};
use crate::crypto::Secret;

/// A password as given: to be hashed, or already a verifier.
pub enum Password {
    Plain(Secret),
    /// A checked `SCRAM-SHA-256$...` verifier.
    Verifier(String),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Password::Plain(_) => f.write_str("Password::Plain(***)"),
            Password::Verifier(_) => f.write_str("Password::Verifier(***)"),
        }
    }
}

/// Why a given password cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password looks like a SCRAM-SHA-256 verifier, but {0}")]
    BadVerifier(VerifierError),
    #[error(
        "the password is an md5 hash, and tenantgate logs users in with SCRAM-SHA-256 only: \
         give a SCRAM-SHA-256 verifier (set the role's password again under \
         password_encryption = 'scram-sha-256' and copy pg_authid.rolpassword) or the password \
         itself"
    )]
    Md5,
}

impl Password {
    /// Decides what `text` is.
    pub fn classify(text: String) -> Result<Password, PasswordError> {
        if text
            .strip_prefix(MECHANISM)
            .is_some_and(|rest| rest.starts_with('$'))
        {
            ScramSecret::from_verifier(&text).map_err(PasswordError::BadVerifier)?;
            return Ok(Password::Verifier(text));
        }
        if is_md5_hash(&text) {
            return Err(PasswordError::Md5);
        }
        Ok(Password::Plain(Secret::from(text)))
    }

    /// The verifier to store: the given one, or a new one for a plaintext password (PBKDF2 on
    /// the blocking pool, see [`super::scram_verifier`]).
    pub async fn into_verifier(self) -> String {
        match self {
            Password::Plain(secret) => super::scram_verifier(&secret).await,
            Password::Verifier(verifier) => verifier,
        }
    }
}

/// `md5` and 32 hex digits: what PostgreSQL stores for `password_encryption = md5`
/// (`isMD5` in its crypt.c).
fn is_md5_hash(text: &str) -> bool {
    text.len() == 35
        && text.starts_with("md5")
        && text.bytes().skip(3).all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_md5_hashes_and_passwords_are_told_apart() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(
            Password::classify(verifier.clone()),
            Ok(Password::Verifier(v)) if v == verifier
        ));
        assert!(matches!(
            Password::classify("a-strong-password".to_owned()),
            Ok(Password::Plain(s)) if s.expose() == "a-strong-password"
        ));
        // "SCRAM-SHA-256" alone, or followed by something other than `$`, is a password.
        assert!(matches!(
            Password::classify("SCRAM-SHA-256 is my password".to_owned()),
            Ok(Password::Plain(_))
        ));
        let broken = format!("{}x", &verifier[..verifier.len() - 4]);
        assert!(matches!(
            Password::classify(broken),
            Err(PasswordError::BadVerifier(VerifierError::Key("ServerKey")))
        ));
        assert_eq!(
            Password::classify("md5".to_owned() + &"0f".repeat(16)).err(),
            Some(PasswordError::Md5)
        );
        // Not 32 hex digits: an ordinary password.
        assert!(matches!(
            Password::classify("md5-is-not-a-hash".to_owned()),
            Ok(Password::Plain(_))
        ));
        let shown = PasswordError::BadVerifier(VerifierError::Salt).to_string();
        assert!(shown.contains("salt"), "{shown}");
    }
}
