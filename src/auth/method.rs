//! Logging a user in by its auth method (`scram`, `cert`, `cert+scram`, as pg_hba's
//! `scram-sha-256` and `cert`): the verified client certificate's CN against the user name and
//! its OU against the database it is for (the tenant's slug, or the admin console's name),
//! SCRAM, or both.
//!
//! What an unauthenticated client may learn: a client without a certificate is never told that
//! a user needs one before it proves something. A `cert` user then gets the same SCRAM exchange
//! against a mock secret as an unknown user, and the same 28P01; a `cert+scram` user is told
//! (28000) only after the right password. A client whose certificate chains to our client CA
//! is known to that CA, and is told at once (28000) that its CN does not match the user.
//!
//! This module must not query the registry or look at TLS state: the caller hands it the
//! user's method, verifier and the certificate's CN that rustls verified.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{AuthError, Credential, ScramSecret, accept_without_password, authenticate};
use crate::registry::AuthMethod;

/// What the client's connection proves besides a password.
#[derive(Debug, Clone, Copy, Default)]
pub struct Proof<'a> {
    /// tls-server-end-point data, when the client speaks TLS.
    pub channel_binding: Option<&'a [u8]>,
    /// The subject CN of the client certificate rustls verified, if any.
    pub client_cn: Option<&'a str>,
    /// That certificate's subject OU: what it was issued for.
    pub client_ou: Option<&'a str>,
    /// What the OU must be: the tenant's slug, or the admin console's database name. One
    /// client CA serves every tenant; the OU keeps acme's certificate out of globex and out of
    /// the admin console.
    pub scope: &'a str,
}

/// Logs `user` in by `method`: `credential` is the user's (or a mock) SCRAM secret, `mock` the
/// secret an unknown user would get. On success it returns the last messages of the exchange
/// (AuthenticationOk last), unsent: the caller sends them before anything else.
pub async fn authenticate_by_method<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    method: AuthMethod,
    credential: Credential,
    mock: ScramSecret,
    proof: Proof<'_>,
) -> Result<BytesMut, AuthError> {
    let cb = proof.channel_binding;
    if !method.needs_certificate() {
        return authenticate(stream, user, credential, cb).await;
    }
    match proof.client_cn {
        Some(cn) if cn == user && proof.client_ou != Some(proof.scope) => {
            Err(AuthError::CertificateForElsewhere {
                user: user.to_owned(),
                ou: proof.client_ou.map(str::to_owned),
                scope: proof.scope.to_owned(),
            })
        }
        Some(cn) if cn == user => {
            if method.needs_password() {
                authenticate(stream, user, credential, cb).await
            } else {
                Ok(accept_without_password())
            }
        }
        Some(cn) => Err(AuthError::CertificateMismatch {
            user: user.to_owned(),
            cn: cn.to_owned(),
        }),
        None if method.needs_password() => {
            authenticate(stream, user, credential, cb).await?;
            Err(AuthError::CertificateRequired {
                user: user.to_owned(),
            })
        }
        None => {
            let as_unknown = Credential {
                secret: mock,
                is_mock: true,
            };
            authenticate(stream, user, as_unknown, cb).await
        }
    }
}
