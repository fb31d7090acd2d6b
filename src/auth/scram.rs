//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677) as `PostgreSQL` implements it
//! (`src/backend/libpq/auth-scram.c`), verified against a stored `PostgreSQL` secret
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
//!
//! This is a pure state machine over bytes: it performs no I/O and knows nothing about
//! the wire framing. The caller sends `AuthenticationSASL` (advertising [`MECHANISM`]),
//! passes the mechanism and data of `SASLInitialResponse` to
//! [`ScramExchange::client_first`], sends its result in `AuthenticationSASLContinue`,
//! passes the data of the next `SASLResponse` to [`ScramExchange::client_final`], and on
//! success sends its result in `AuthenticationSASLFinal`.
//!
//! Only HMAC / SHA-256 with the stored keys is computed here (no PBKDF2), so an exchange
//! is cheap for the server.
//!
//! Channel binding (`SCRAM-SHA-256-PLUS`, type `tls-server-end-point`, RFC 5929) is
//! offered when the caller gives the exchange the binding data of its TLS connection
//! ([`ScramExchange::with_channel_binding`]). The gs2 header is checked as
//! `read_client_first_message` in auth-scram.c does: `n` is fine unless the client selected
//! PLUS; `y` ("I support channel binding but think the server does not") is a downgrade
//! attack when PLUS was offered; `p=tls-server-end-point` needs the PLUS mechanism; and the
//! client-final `c=` must carry the gs2 header followed by the binding data.

#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::as_conversions,
    clippy::panic
)]

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};

/// The SASL mechanism name handled here.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The same with channel binding, offered over TLS.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel-binding type PostgreSQL (and so every client) supports.
const CHANNEL_BINDING_TYPE: &[u8] = b"tls-server-end-point";

/// Largest client message accepted (client-first or client-final), in bytes.
const MAX_MESSAGE_LEN: usize = 8 * 1024;
/// Raw random bytes in the server part of the nonce (`SCRAM_RAW_NONCE_LEN` in `PostgreSQL`).
const RAW_NONCE_LEN: usize = 18;
/// Iteration count of a mock secret (`PostgreSQL`'s default `scram_iterations`).
const MOCK_ITERATIONS: u32 = 4096;
/// Salt length of a mock secret (`SCRAM_DEFAULT_SALT_LEN` in `PostgreSQL`).
const MOCK_SALT_LEN: usize = 16;
/// SHA-256 output length, also the length of `StoredKey`, `ServerKey` and the proof.
const KEY_LEN: usize = 32;
/// SHA-256 block length; HMAC keys shorter than this are zero-padded to it.
const HMAC_BLOCK_LEN: usize = 64;

/// A stored SCRAM-SHA-256 secret (or a mock one).
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    /// Decoded salt.
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramSecret {
    /// Parses a `PostgreSQL` verifier:
    /// `SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>`.
    ///
    /// Returns `None` on anything malformed: wrong prefix, non-numeric or zero iteration
    /// count, invalid base64, empty salt, or keys that are not exactly 32 bytes.
    #[must_use]
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        ScramSecret::from_verifier(verifier).ok()
    }

    /// As [`ScramSecret::parse`], saying what is wrong (for an operator who pasted one, e.g.
    /// from `pg_authid.rolpassword`; as `parse_scram_secret` in auth-scram.c checks it).
    pub fn from_verifier(verifier: &str) -> Result<ScramSecret, VerifierError> {
        let rest = verifier
            .strip_prefix(MECHANISM)
            .and_then(|r| r.strip_prefix('$'))
            .ok_or(VerifierError::Prefix)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(VerifierError::Shape)?;
        let (iterations, salt) = iter_salt.split_once(':').ok_or(VerifierError::Shape)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(VerifierError::Shape)?;

        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifierError::Iterations);
        }
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(VerifierError::Iterations)?;
        let salt = B64
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(VerifierError::Salt)?;
        let stored_key = decode_key(stored_key).ok_or(VerifierError::Key("StoredKey"))?;
        let server_key = decode_key(server_key).ok_or(VerifierError::Key("ServerKey"))?;
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A mock secret for an unknown tenant/user or a broken setup, like `PostgreSQL`'s
    /// `mock_scram_secret`: the salt is derived deterministically from
    /// `HMAC-SHA256(mock_key, name)` (so repeated probes for the same name see the same
    /// salt), the iteration count is 4096, and the stored/server keys are random. The
    /// exchange looks like a real one and always fails at the proof (use it with
    /// `is_mock = true` in [`ScramExchange::new`]).
    #[must_use]
    pub fn mock(mock_key: &[u8; 32], name: &str) -> ScramSecret {
        let digest = hmac_sha256(mock_key, &[name.as_bytes()]);
        let salt = digest.iter().copied().take(MOCK_SALT_LEN).collect();
        let mut stored_key = [0u8; KEY_LEN];
        let mut server_key = [0u8; KEY_LEN];
        rand::fill(&mut stored_key);
        rand::fill(&mut server_key);
        ScramSecret {
            iterations: MOCK_ITERATIONS,
            salt,
            stored_key,
            server_key,
        }
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramSecret(***)")
    }
}

fn decode_key(b64: &str) -> Option<[u8; KEY_LEN]> {
    B64.decode(b64).ok()?.try_into().ok()
}

/// Why a stored verifier is not one: each says which part, never the verifier itself.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error("it does not start with SCRAM-SHA-256$")]
    Prefix,
    #[error("it is not of the form SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")]
    Shape,
    #[error("its iteration count is not a whole number from 1 to 4294967295")]
    Iterations,
    #[error("its salt is not non-empty base64")]
    Salt,
    #[error("its {0} is not base64 of 32 bytes")]
    Key(&'static str),
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// A protocol violation by the client (map to SQLSTATE 08P01).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding (gs2 flag `p`) on a connection without TLS.
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The gs2 header contradicts the mechanism or what was offered, or the binding data
    /// does not match (map to SQLSTATE 08P01); the text is PostgreSQL's detail.
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelBinding(&'static str),
    /// The client selected a mechanism other than [`MECHANISM`].
    #[error("client selected an invalid SASL authentication mechanism")]
    WrongMechanism,
    /// The nonce in client-final-message does not match the one the server sent.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// Wrong password, or a mock secret (map to SQLSTATE 28P01).
    #[error("password authentication failed")]
    AuthenticationFailed,
}

enum State {
    /// Waiting for `SASLInitialResponse`.
    ClientFirst,
    /// server-first-message sent, waiting for client-final-message.
    ClientFinal {
        /// client-first-message-bare, as received.
        client_first_bare: Vec<u8>,
        /// server-first-message, as sent.
        server_first: Vec<u8>,
        /// Expected `c=` value: base64 of the gs2 header the client sent, followed by the
        /// channel-binding data when it sent `p`.
        cbind_b64: String,
        /// The client bound to the channel (gs2 flag `p`).
        channel_bound: bool,
        /// Client nonce followed by server nonce.
        nonce: Vec<u8>,
    },
    /// Finished (successfully or not); any further call is a protocol violation.
    Done,
}

/// One server-side SCRAM-SHA-256 exchange.
pub struct ScramExchange {
    secret: ScramSecret,
    is_mock: bool,
    /// tls-server-end-point data of this connection; PLUS is offered when set.
    channel_binding: Option<Vec<u8>>,
    state: State,
}

impl fmt::Debug for ScramExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::ClientFirst => "ClientFirst",
            State::ClientFinal { .. } => "ClientFinal",
            State::Done => "Done",
        };
        f.debug_struct("ScramExchange")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramExchange {
    /// Starts an exchange. `secret` is the stored (or mock) secret; `is_mock = true`
    /// forces failure at the proof even if it were to match.
    #[must_use]
    pub fn new(secret: ScramSecret, is_mock: bool) -> Self {
        ScramExchange {
            secret,
            is_mock,
            channel_binding: None,
            state: State::ClientFirst,
        }
    }

    /// Offers SCRAM-SHA-256-PLUS with this tls-server-end-point data (the hash of the
    /// server certificate the client saw).
    #[must_use]
    pub fn with_channel_binding(mut self, data: &[u8]) -> Self {
        self.channel_binding = Some(data.to_vec());
        self
    }

    /// The mechanisms to advertise in AuthenticationSASL, in PostgreSQL's order.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() {
            &[MECHANISM_PLUS, MECHANISM]
        } else {
            &[MECHANISM]
        }
    }

    /// Handles `SASLInitialResponse`: the selected mechanism and the client-first-message.
    /// Returns the server-first-message to send in `AuthenticationSASLContinue`.
    ///
    /// # Errors
    ///
    /// [`ScramError::WrongMechanism`] for a mechanism other than [`MECHANISM`],
    /// [`ScramError::ChannelBindingUnsupported`] for gs2 flag `p`, and
    /// [`ScramError::Malformed`] for anything else invalid or a call out of order.
    /// After an error the exchange is finished and every further call fails.
    pub fn client_first(
        &mut self,
        mechanism: &str,
        client_first: &[u8],
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(
            std::mem::replace(&mut self.state, State::Done),
            State::ClientFirst
        ) {
            return Err(ScramError::Malformed("unexpected SASL initial response"));
        }
        let plus = match mechanism {
            MECHANISM => false,
            MECHANISM_PLUS if self.channel_binding.is_some() => true,
            _ => return Err(ScramError::WrongMechanism),
        };
        check_message(client_first)?;
        let parsed = parse_client_first(client_first)?;
        let cbind_data = self.check_gs2_flag(parsed.flag, plus)?;

        let mut raw_nonce = [0u8; RAW_NONCE_LEN];
        rand::fill(&mut raw_nonce);
        let mut nonce = parsed.client_nonce.to_vec();
        nonce.extend_from_slice(B64.encode(raw_nonce).as_bytes());

        let mut server_first = Vec::with_capacity(nonce.len() + 64);
        server_first.extend_from_slice(b"r=");
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(B64.encode(&self.secret.salt).as_bytes());
        server_first.extend_from_slice(b",i=");
        server_first.extend_from_slice(self.secret.iterations.to_string().as_bytes());

        self.state = State::ClientFinal {
            client_first_bare: parsed.bare.to_vec(),
            server_first: server_first.clone(),
            cbind_b64: B64.encode([parsed.gs2_header, cbind_data].concat()),
            channel_bound: matches!(parsed.flag, Gs2Flag::Plus(_)),
            nonce,
        };
        Ok(server_first)
    }

    /// The gs2 channel-binding flag against the selected mechanism and what was offered;
    /// returns the binding data the client-final `c=` must carry after the header.
    fn check_gs2_flag(&self, flag: Gs2Flag<'_>, plus: bool) -> Result<&[u8], ScramError> {
        match flag {
            Gs2Flag::No | Gs2Flag::Yes if plus => Err(ScramError::ChannelBinding(
                "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not \
                 include channel binding data.",
            )),
            Gs2Flag::Yes if self.channel_binding.is_some() => Err(ScramError::ChannelBinding(
                "The client supports SCRAM channel binding but thinks the server does not. \
                 However, this server does support channel binding.",
            )),
            Gs2Flag::No | Gs2Flag::Yes => Ok(&[]),
            Gs2Flag::Plus(_) if self.channel_binding.is_none() => {
                Err(ScramError::ChannelBindingUnsupported)
            }
            Gs2Flag::Plus(_) if !plus => Err(ScramError::ChannelBinding(
                "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM \
                 message includes channel binding data.",
            )),
            Gs2Flag::Plus(name) if name != CHANNEL_BINDING_TYPE => Err(ScramError::ChannelBinding(
                "unsupported SCRAM channel-binding type",
            )),
            Gs2Flag::Plus(_) => Ok(self.channel_binding.as_deref().unwrap_or_default()),
        }
    }

    /// Handles `SASLResponse`: the client-final-message. On success returns the
    /// server-final-message (`v=...`) to send in `AuthenticationSASLFinal`.
    ///
    /// # Errors
    ///
    /// [`ScramError::NonceMismatch`] if the nonce is not the one sent,
    /// [`ScramError::AuthenticationFailed`] for a wrong proof (or a mock secret), and
    /// [`ScramError::Malformed`] for anything else invalid or a call out of order.
    /// The exchange is finished afterwards, whatever the outcome.
    pub fn client_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::ClientFinal {
            client_first_bare,
            server_first,
            cbind_b64,
            channel_bound,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected SASL response"));
        };
        check_message(client_final)?;

        // The proof is the last attribute; everything before ",p=" is signed.
        let (without_proof, proof_attr) = rsplit_once(client_final, b',').ok_or(
            ScramError::Malformed("missing proof in client-final-message"),
        )?;
        let proof_b64 = attr_value(proof_attr, b'p').ok_or(ScramError::Malformed(
            "missing proof in client-final-message",
        ))?;

        let mut fields = without_proof.split(|&b| b == b',');
        let cbind =
            fields
                .next()
                .and_then(|f| attr_value(f, b'c'))
                .ok_or(ScramError::Malformed(
                    "missing channel-binding in client-final-message",
                ))?;
        if cbind != cbind_b64.as_bytes() {
            // With `p`, the data the client bound to differs from our certificate's hash:
            // someone in the middle terminated TLS with another certificate.
            return Err(if channel_bound {
                ScramError::ChannelBinding("SCRAM channel binding check failed")
            } else {
                ScramError::Malformed(
                    "unexpected channel-binding attribute in client-final-message",
                )
            });
        }
        let client_nonce =
            fields
                .next()
                .and_then(|f| attr_value(f, b'r'))
                .ok_or(ScramError::Malformed(
                    "missing nonce in client-final-message",
                ))?;
        if client_nonce != nonce.as_slice() {
            return Err(ScramError::NonceMismatch);
        }
        for field in fields {
            // Extensions are ignored; an earlier `p` means garbage after the proof.
            match any_attr(field) {
                Some((name, _)) if name != b'p' => {}
                _ => {
                    return Err(ScramError::Malformed(
                        "invalid attribute in client-final-message",
                    ));
                }
            }
        }
        let proof: [u8; KEY_LEN] = B64
            .decode(proof_b64)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed(
                "invalid proof in client-final-message",
            ))?;

        let auth_message: [&[u8]; 5] =
            [&client_first_bare, b",", &server_first, b",", without_proof];

        // ClientKey = proof XOR HMAC(StoredKey, AuthMessage); valid iff H(ClientKey) == StoredKey.
        let client_signature = hmac_sha256(&self.secret.stored_key, &auth_message);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let computed: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        let proof_ok = constant_time_eq(&computed, &self.secret.stored_key);

        let server_signature = hmac_sha256(&self.secret.server_key, &auth_message);
        if !proof_ok || self.is_mock {
            return Err(ScramError::AuthenticationFailed);
        }
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(B64.encode(server_signature).as_bytes());
        Ok(server_final)
    }
}

/// The gs2 channel-binding flag of a client-first-message.
#[derive(Debug, Clone, Copy)]
enum Gs2Flag<'a> {
    /// `n`: the client does not support channel binding.
    No,
    /// `y`: the client supports it but thinks the server does not.
    Yes,
    /// `p=<type>`: the client binds to the channel with this type.
    Plus(&'a [u8]),
}

/// Parts of a client-first-message.
struct ClientFirst<'a> {
    flag: Gs2Flag<'a>,
    /// gs2 header, including its trailing comma (e.g. `n,,`).
    gs2_header: &'a [u8],
    /// client-first-message-bare.
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let (flag, rest) = split_once(msg, b',').ok_or(ScramError::Malformed("missing gs2 header"))?;
    let gs2_flag = match flag {
        b"n" => Gs2Flag::No,
        b"y" => Gs2Flag::Yes,
        [b'p', b'=', name @ ..] => Gs2Flag::Plus(name),
        _ => return Err(ScramError::Malformed("invalid channel-binding flag")),
    };
    let (authzid, bare) =
        split_once(rest, b',').ok_or(ScramError::Malformed("missing gs2 header"))?;
    match authzid {
        b"" | b"a=" => {}
        _ => {
            return Err(ScramError::Malformed(
                "authorization identity is not supported",
            ));
        }
    }
    let header_len = flag.len() + authzid.len() + 2;
    let gs2_header = msg
        .get(..header_len)
        .ok_or(ScramError::Malformed("missing gs2 header"))?;

    let mut fields = bare.split(|&b| b == b',');
    let user = fields.next().unwrap_or_default();
    if user.first() == Some(&b'm') {
        return Err(ScramError::Malformed(
            "mandatory extensions are not supported",
        ));
    }
    // The SCRAM user name is ignored, as in PostgreSQL (libpq sends an empty one).
    attr_value(user, b'n').ok_or(ScramError::Malformed("missing user name"))?;
    let client_nonce = fields
        .next()
        .and_then(|f| attr_value(f, b'r'))
        .ok_or(ScramError::Malformed("missing nonce"))?;
    if client_nonce.is_empty() || !client_nonce.iter().all(|&b| is_printable(b)) {
        return Err(ScramError::Malformed("non-printable characters in nonce"));
    }
    for field in fields {
        // Optional extensions are ignored, but must be well-formed.
        any_attr(field).ok_or(ScramError::Malformed(
            "invalid attribute in client-first-message",
        ))?;
    }
    Ok(ClientFirst {
        flag: gs2_flag,
        gs2_header,
        bare,
        client_nonce,
    })
}

/// Rejects empty, oversized and NUL-containing messages (`PostgreSQL` treats the
/// input as a C string and rejects embedded NULs).
fn check_message(msg: &[u8]) -> Result<(), ScramError> {
    if msg.is_empty() {
        return Err(ScramError::Malformed("the message is empty"));
    }
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Malformed("the message is too long"));
    }
    if msg.contains(&0) {
        return Err(ScramError::Malformed("the message contains a NUL byte"));
    }
    Ok(())
}

/// `printable` from RFC 5802: `%x21-2B / %x2D-7E` (printable ASCII except `,`).
fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x2B | 0x2D..=0x7E)
}

/// Value of `<name>=<value>`, if `field` has that form.
fn attr_value(field: &[u8], name: u8) -> Option<&[u8]> {
    match any_attr(field) {
        Some((n, value)) if n == name => Some(value),
        _ => None,
    }
}

/// Splits `<letter>=<value>` into the attribute letter and its value.
fn any_attr(field: &[u8]) -> Option<(u8, &[u8])> {
    let (&name, rest) = field.split_first()?;
    let (&eq, value) = rest.split_first()?;
    (name.is_ascii_alphabetic() && eq == b'=').then_some((name, value))
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    let (head, tail) = s.split_at_checked(i)?;
    Some((head, tail.get(1..)?))
}

fn rsplit_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().rposition(|&b| b == sep)?;
    let (head, tail) = s.split_at_checked(i)?;
    Some((head, tail.get(1..)?))
}

/// HMAC-SHA-256 over the concatenation of `parts`, keyed with a 32-byte key.
///
/// A key shorter than the block size is zero-padded to it by HMAC's definition, so
/// padding here gives the same result while using the infallible constructor.
fn hmac_sha256(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut block = [0u8; HMAC_BLOCK_LEN];
    for (b, k) in block.iter_mut().zip(key) {
        *b = *k;
    }
    let mut mac = Hmac::<Sha256>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::as_conversions,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::password::scram_sha_256;

    const MOCK_KEY: [u8; 32] = [7; 32];

    fn secret(password: &str) -> ScramSecret {
        ScramSecret::parse(&scram_sha_256(password.as_bytes())).unwrap()
    }

    /// Runs a full exchange with the real client; returns the server's results.
    fn run(
        server_secret: ScramSecret,
        is_mock: bool,
        password: &str,
        cb: ChannelBinding,
    ) -> Result<Vec<u8>, ScramError> {
        let mut server = ScramExchange::new(server_secret, is_mock);
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let server_first = server.client_first(MECHANISM, client.message())?;
        client.update(&server_first).unwrap();
        let server_final = server.client_final(client.message())?;
        client.finish(&server_final).unwrap();
        Ok(server_final)
    }

    #[test]
    fn round_trip_with_real_client() {
        for cb in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
            let server_final = run(secret("hunter2"), false, "hunter2", cb).unwrap();
            assert!(server_final.starts_with(b"v="));
        }
        // Non-ASCII password (client SASLprep's it, as PostgreSQL's verifier does).
        run(
            secret("pässwörd ☃"),
            false,
            "pässwörd ☃",
            ChannelBinding::unsupported(),
        )
        .unwrap();
    }

    #[test]
    fn server_first_shape() {
        let s = secret("pw");
        let mut server = ScramExchange::new(s.clone(), false);
        let out = server.client_first(MECHANISM, b"n,,n=,r=abc").unwrap();
        let out = String::from_utf8(out).unwrap();
        let (nonce, rest) = out.strip_prefix("r=abc").unwrap().split_once(',').unwrap();
        assert_eq!(nonce.len(), 24); // base64 of 18 bytes
        assert_eq!(B64.decode(nonce).unwrap().len(), RAW_NONCE_LEN);
        assert_eq!(
            rest,
            format!("s={},i={}", B64.encode(&s.salt), s.iterations)
        );
    }

    #[test]
    fn wrong_password_fails() {
        let err = run(
            secret("right"),
            false,
            "wrong",
            ChannelBinding::unsupported(),
        )
        .unwrap_err();
        assert_eq!(err, ScramError::AuthenticationFailed);
    }

    #[test]
    fn mock_secret_fails() {
        let mock = ScramSecret::mock(&MOCK_KEY, "tenant/alice");
        for password in ["", "hunter2"] {
            let err = run(mock.clone(), true, password, ChannelBinding::unsupported()).unwrap_err();
            assert_eq!(err, ScramError::AuthenticationFailed);
        }
        // is_mock forces failure even with a secret the password would match.
        let err = run(secret("pw"), true, "pw", ChannelBinding::unsupported()).unwrap_err();
        assert_eq!(err, ScramError::AuthenticationFailed);
    }

    #[test]
    fn mock_salt_deterministic_per_name() {
        let a1 = ScramSecret::mock(&MOCK_KEY, "alice");
        let a2 = ScramSecret::mock(&MOCK_KEY, "alice");
        let b = ScramSecret::mock(&MOCK_KEY, "bob");
        let a_other_key = ScramSecret::mock(&[8; 32], "alice");
        assert_eq!(a1.salt, a2.salt);
        assert_eq!(a1.salt.len(), MOCK_SALT_LEN);
        assert_ne!(a1.salt, b.salt);
        assert_ne!(a1.salt, a_other_key.salt);
        assert_eq!(a1.iterations, 4096);
        assert_ne!(a1.stored_key, a2.stored_key);
        assert_ne!(a1.server_key, a2.server_key);
    }

    #[test]
    fn tampered_nonce_is_rejected() {
        let mut server = ScramExchange::new(secret("pw"), false);
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let server_first = server.client_first(MECHANISM, client.message()).unwrap();
        client.update(&server_first).unwrap();
        let msg = String::from_utf8(client.message().to_vec()).unwrap();
        let tampered = msg.replacen(",r=", ",r=X", 1);
        assert_eq!(
            server.client_final(tampered.as_bytes()),
            Err(ScramError::NonceMismatch)
        );
        // The exchange is over.
        assert!(matches!(
            server.client_final(msg.as_bytes()),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn channel_binding_flag_p_is_unsupported() {
        let mut server = ScramExchange::new(secret("pw"), false);
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
        assert_eq!(
            server.client_first(MECHANISM, client.message()),
            Err(ScramError::ChannelBindingUnsupported)
        );
    }

    /// Runs an exchange offering channel binding with `server_cb`.
    fn run_plus(
        server_cb: &[u8],
        mechanism: &str,
        cb: ChannelBinding,
    ) -> Result<Vec<u8>, ScramError> {
        let mut server = ScramExchange::new(secret("pw"), false).with_channel_binding(server_cb);
        assert_eq!(server.mechanisms(), &[MECHANISM_PLUS, MECHANISM]);
        let mut client = ScramSha256::new(b"pw", cb);
        let server_first = server.client_first(mechanism, client.message())?;
        client.update(&server_first).unwrap();
        let server_final = server.client_final(client.message())?;
        client.finish(&server_final).unwrap();
        Ok(server_final)
    }

    #[test]
    fn channel_binding_plus_round_trip() {
        let hash = [9u8; 32];
        run_plus(
            &hash,
            MECHANISM_PLUS,
            ChannelBinding::tls_server_end_point(hash.to_vec()),
        )
        .unwrap();
        // A client without channel binding still logs in over TLS.
        run_plus(&hash, MECHANISM, ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn channel_binding_gs2_rules_follow_auth_scram_c() {
        let hash = [9u8; 32];
        let negotiation = |r: Result<Vec<u8>, ScramError>| {
            assert!(matches!(r, Err(ScramError::ChannelBinding(_))), "{r:?}");
        };
        // Another certificate's hash: a man in the middle.
        negotiation(run_plus(
            &hash,
            MECHANISM_PLUS,
            ChannelBinding::tls_server_end_point(vec![8u8; 32]),
        ));
        // `y` when PLUS was offered is a downgrade.
        negotiation(run_plus(&hash, MECHANISM, ChannelBinding::unrequested()));
        // PLUS selected without binding data.
        negotiation(run_plus(
            &hash,
            MECHANISM_PLUS,
            ChannelBinding::unsupported(),
        ));
        // Binding data with the plain mechanism.
        negotiation(run_plus(
            &hash,
            MECHANISM,
            ChannelBinding::tls_server_end_point(hash.to_vec()),
        ));
        // An unknown binding type.
        let mut server = ScramExchange::new(secret("pw"), false).with_channel_binding(&hash);
        negotiation(
            server
                .client_first(MECHANISM_PLUS, b"p=tls-unique,,n=,r=abc")
                .map(|_| Vec::new()),
        );
        // Without TLS, PLUS is neither offered nor accepted.
        let server = ScramExchange::new(secret("pw"), false);
        assert_eq!(server.mechanisms(), &[MECHANISM]);
    }

    #[test]
    fn wrong_mechanism_and_order() {
        let mut server = ScramExchange::new(secret("pw"), false);
        assert_eq!(
            server.client_first("SCRAM-SHA-256-PLUS", b"n,,n=,r=abc"),
            Err(ScramError::WrongMechanism)
        );
        let mut server = ScramExchange::new(secret("pw"), false);
        assert!(matches!(
            server.client_final(b"c=biws,r=abc,p=AAAA"),
            Err(ScramError::Malformed(_))
        ));
        let mut server = ScramExchange::new(secret("pw"), false);
        server.client_first(MECHANISM, b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            server.client_first(MECHANISM, b"n,,n=,r=abc"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_client_first() {
        let too_long = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_LEN));
        let cases: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"x,,n=,r=abc",
            b"n,a=bob,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=a b",
            b"n,,n=,r=\xff",
            b"n,,r=abc",
            b"n,,n=",
            b"n,,n=,r=abc,",
            b"n,,n=,r=abc,1=x",
            b"n,,n=\0,r=abc",
            too_long.as_bytes(),
        ];
        for case in cases {
            let mut server = ScramExchange::new(secret("pw"), false);
            let res = server.client_first(MECHANISM, case);
            assert!(
                matches!(res, Err(ScramError::Malformed(_))),
                "{:?} -> {res:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    /// A hand-rolled client for messages the real client never sends. Uses a secret
    /// built from a known salted password, so no PBKDF2 is needed.
    struct ManualClient {
        salted_password: [u8; 32],
    }

    impl ManualClient {
        fn new() -> (Self, ScramSecret) {
            let salted_password = [42u8; 32];
            let client_key = hmac_sha256(&salted_password, &[b"Client Key"]);
            let secret = ScramSecret {
                iterations: 4096,
                salt: vec![1; 16],
                stored_key: Sha256::digest(client_key).into(),
                server_key: hmac_sha256(&salted_password, &[b"Server Key"]),
            };
            (Self { salted_password }, secret)
        }

        /// Builds client-final for the given pieces; returns (message, expected server-final).
        fn client_final(
            &self,
            bare: &[u8],
            server_first: &[u8],
            without_proof: &[u8],
        ) -> (Vec<u8>, Vec<u8>) {
            let auth: [&[u8]; 5] = [bare, b",", server_first, b",", without_proof];
            let client_key = hmac_sha256(&self.salted_password, &[b"Client Key"]);
            let stored_key: [u8; 32] = Sha256::digest(client_key).into();
            let sig = hmac_sha256(&stored_key, &auth);
            let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
            let mut msg = without_proof.to_vec();
            msg.extend_from_slice(format!(",p={}", B64.encode(proof)).as_bytes());
            let server_key = hmac_sha256(&self.salted_password, &[b"Server Key"]);
            let v = format!("v={}", B64.encode(hmac_sha256(&server_key, &auth)));
            (msg, v.into_bytes())
        }
    }

    /// Runs an exchange with a manual client. `final_ext` is inserted before the proof.
    fn manual(
        header: &[u8],
        bare: &[u8],
        cbind: &str,
        final_ext: &[u8],
    ) -> Result<Vec<u8>, ScramError> {
        let (client, s) = ManualClient::new();
        let mut server = ScramExchange::new(s, false);
        let mut first = header.to_vec();
        first.extend_from_slice(bare);
        let server_first = server.client_first(MECHANISM, &first)?;
        let nonce = server_first
            .split(|&b| b == b',')
            .next()
            .unwrap()
            .strip_prefix(b"r=")
            .unwrap();
        let mut without_proof = format!("c={cbind},r=").into_bytes();
        without_proof.extend_from_slice(nonce);
        without_proof.extend_from_slice(final_ext);
        let (msg, expected) = client.client_final(bare, &server_first, &without_proof);
        let out = server.client_final(&msg)?;
        assert_eq!(out, expected);
        Ok(out)
    }

    #[test]
    fn manual_client_variants() {
        manual(b"n,,", b"n=,r=abc", "biws", b"").unwrap();
        manual(b"y,,", b"n=,r=abc", "eSws", b"").unwrap();
        manual(b"n,a=,", b"n=,r=abc", "bixhPSw=", b"").unwrap();
        // User name is ignored and may be anything, even non-UTF-8.
        manual(b"n,,", b"n=bob\xff,r=abc", "biws", b"").unwrap();
        // Optional extensions in both messages are ignored but signed.
        manual(b"n,,", b"n=*,r=a~b!c,x=ext", "biws", b",x=final-ext").unwrap();
        // c= must be exactly the base64 of the header sent.
        for (header, cbind) in [(&b"n,,"[..], "eSws"), (b"y,,", "biws"), (b"n,,", "cCws")] {
            assert!(matches!(
                manual(header, b"n=,r=abc", cbind, b""),
                Err(ScramError::Malformed(_))
            ));
        }
        // An attribute named p before the proof, or garbage, is malformed.
        assert!(matches!(
            manual(b"n,,", b"n=,r=abc", "biws", b",p=AAAA"),
            Err(ScramError::Malformed(_))
        ));
        assert!(matches!(
            manual(b"n,,", b"n=,r=abc", "biws", b",,"),
            Err(ScramError::Malformed(_))
        ));
    }

    /// Starts an exchange and returns it with the combined nonce it sent.
    fn started(secret: ScramSecret) -> (ScramExchange, String) {
        let mut server = ScramExchange::new(secret, false);
        let server_first = server.client_first(MECHANISM, b"n,,n=,r=abc").unwrap();
        let server_first = String::from_utf8(server_first).unwrap();
        let nonce = server_first
            .split(',')
            .next()
            .unwrap()
            .strip_prefix("r=")
            .unwrap();
        let nonce = nonce.to_owned();
        (server, nonce)
    }

    #[test]
    fn malformed_client_final() {
        let proof = B64.encode([0u8; 32]);
        let cases: [fn(&str, &str) -> String; 10] = [
            |_, _| String::new(),
            |n, _| format!("c=biws,r={n}"),
            |n, _| format!("c=biws,r={n},p="),
            |n, _| format!("c=biws,r={n},p=AAAA"),
            |n, _| format!("c=biws,r={n},p=!!!"),
            |n, p| format!("c=biws,r={n},p={p},"),
            |n, p| format!("c=biws,r={n},p={p},x=1"),
            |n, p| format!("r={n},p={p}"),
            |_, p| format!("c=biws,p={p}"),
            |n, p| format!("c=biws,r={n},p={p}\0"),
        ];
        for case in cases {
            let (mut server, nonce) = started(secret("pw"));
            let msg = case(&nonce, &proof);
            let res = server.client_final(msg.as_bytes());
            assert!(
                matches!(res, Err(ScramError::Malformed(_))),
                "{msg:?} -> {res:?}"
            );
        }
        // Right shape, wrong proof value.
        let (mut server, nonce) = started(secret("pw"));
        assert_eq!(
            server.client_final(format!("c=biws,r={nonce},p={proof}").as_bytes()),
            Err(ScramError::AuthenticationFailed)
        );
        // Nonce of another exchange.
        let (_, other) = started(secret("pw"));
        let (mut server, _) = started(secret("pw"));
        assert_eq!(
            server.client_final(format!("c=biws,r={other},p={proof}").as_bytes()),
            Err(ScramError::NonceMismatch)
        );
    }

    /// xorshift64*: deterministic pseudo-random bytes without extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }
        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
        fn bytes(&mut self) -> Vec<u8> {
            const ALPHABET: &[u8] = b"nyprcsima=,0AZz+/\0\xff";
            let len = self.below(64);
            (0..len)
                .map(|_| {
                    if self.next().is_multiple_of(2) {
                        ALPHABET[self.below(ALPHABET.len())]
                    } else {
                        self.byte()
                    }
                })
                .collect()
        }
    }

    #[test]
    fn garbage_never_panics_and_mutations_never_authenticate() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let s = secret("pw");

        // Random client-first, then random client-final.
        for _ in 0..5000 {
            let mut server = ScramExchange::new(s.clone(), false);
            let mut first = rng.bytes();
            if rng.next().is_multiple_of(2) {
                let mut prefixed = b"n,,n=,r=x".to_vec();
                prefixed.append(&mut first);
                first = prefixed;
            }
            drop(server.client_first(MECHANISM, &first));
            drop(server.client_final(&rng.bytes()));
        }

        // A valid transcript, then truncations and single-byte mutations of it.
        let mut server = ScramExchange::new(s.clone(), false);
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let first = client.message().to_vec();
        let server_first = server.client_first(MECHANISM, &first).unwrap();
        client.update(&server_first).unwrap();
        let fin = client.message().to_vec();

        for cut in 0..=first.len() {
            let mut server = ScramExchange::new(s.clone(), false);
            drop(server.client_first(MECHANISM, &first[..cut]));
        }
        // Replaying the client-final against a fresh exchange (new server nonce) must fail,
        // as must every truncation and mutation of it.
        let mut candidates: Vec<Vec<u8>> = (0..fin.len()).map(|cut| fin[..cut].to_vec()).collect();
        for _ in 0..3000 {
            let mut m = fin.clone();
            let i = rng.below(m.len());
            let byte = rng.byte();
            if m[i] == byte {
                continue;
            }
            m[i] = byte;
            candidates.push(m);
        }
        for candidate in candidates {
            // Keep the same server nonce by reusing the transcript's server state.
            let (bare, nonce) = (first[3..].to_vec(), server_first.clone());
            let mut server = ScramExchange {
                secret: s.clone(),
                is_mock: false,
                channel_binding: None,
                state: State::ClientFinal {
                    client_first_bare: bare,
                    server_first: nonce.clone(),
                    cbind_b64: "biws".to_owned(),
                    channel_bound: false,
                    nonce: nonce[2..nonce.iter().position(|&b| b == b',').unwrap()].to_vec(),
                },
            };
            assert!(server.client_final(&candidate).is_err());
        }

        // And the untouched transcript succeeds.
        let out = server.client_final(&fin).unwrap();
        client.finish(&out).unwrap();
    }

    #[test]
    fn parse_verifiers() {
        let v = scram_sha_256(b"pw");
        let s = ScramSecret::parse(&v).unwrap();
        assert_eq!(s.iterations, 4096);
        assert_eq!(s.salt.len(), 16);

        let salt = B64.encode([1u8; 16]);
        let key = B64.encode([2u8; 32]);
        let ok = format!("SCRAM-SHA-256$4096:{salt}${key}:{key}");
        assert!(ScramSecret::parse(&ok).is_some());

        let short = B64.encode([2u8; 31]);
        let bad = [
            String::new(),
            "md5abcdef".to_owned(),
            format!("SCRAM-SHA-1$4096:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$0:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$-1:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$+1:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:!!${key}:{key}"),
            format!("SCRAM-SHA-256$4096:{salt}${short}:{key}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{short}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{key}$"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{key}:"),
            format!("SCRAM-SHA-256$4096{salt}${key}:{key}"),
            format!("SCRAM-SHA-2564096:{salt}${key}:{key}"),
        ];
        for b in bad {
            assert!(ScramSecret::parse(&b).is_none(), "{b}");
        }
        let reason = |v: &str| ScramSecret::from_verifier(v).err();
        assert_eq!(reason("md5abc"), Some(VerifierError::Prefix));
        assert_eq!(
            reason(&format!("SCRAM-SHA-256$4096:{salt}${key}")),
            Some(VerifierError::Shape)
        );
        assert_eq!(
            reason(&format!("SCRAM-SHA-256$x:{salt}${key}:{key}")),
            Some(VerifierError::Iterations)
        );
        assert_eq!(
            reason(&format!("SCRAM-SHA-256$4096:!!${key}:{key}")),
            Some(VerifierError::Salt)
        );
        assert_eq!(
            reason(&format!("SCRAM-SHA-256$4096:{salt}${key}:{short}")),
            Some(VerifierError::Key("ServerKey"))
        );
    }

    #[test]
    fn debug_hides_keys() {
        let s = secret("pw");
        assert_eq!(format!("{s:?}"), "ScramSecret(***)");
        let e = ScramExchange::new(s, false);
        let dbg = format!("{e:?}");
        assert!(!dbg.contains(&B64.encode(e.secret.stored_key)));
        assert!(dbg.contains("ClientFirst"));
    }
}
