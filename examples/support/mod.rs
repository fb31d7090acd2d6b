//! Helpers shared by the benchmark examples (`idle_clients`, `long_lived`, `scram_verifier`).
//! A directory module, so Cargo does not take it for an example of its own; each example uses
//! only part of it, hence the `dead_code` allowance.

#![allow(dead_code, reason = "each example uses a different part")]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};

fn hmac_sha256(key: &[u8], data: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in data {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` for an ASCII password, as
/// PostgreSQL stores it (postgres-protocol's `password::scram_sha_256` always uses 4096). The
/// salt is fixed: a bench wants the same verifier in tenantgate's registry, PgBouncer's
/// auth_file and PostgreSQL's pg_authid, and a cheap one (few iterations), so the clients'
/// PBKDF2 does not dominate a login.
pub(crate) fn scram_verifier(password: &str, iterations: u32) -> String {
    let salt = *b"tenantgate-idle!";
    // PBKDF2-HMAC-SHA-256, one block.
    let mut u = hmac_sha256(password.as_bytes(), &[&salt, &1u32.to_be_bytes()]);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac_sha256(password.as_bytes(), &[&u]);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    let client_key = hmac_sha256(&salted, &[b"Client Key"]);
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac_sha256(&salted, &[b"Server Key"]);
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}

/// CPU time a process has used (utime + stime of `/proc/PID/stat`), in seconds. The fields
/// count clock ticks of USER_HZ, which Linux fixes at 100 for user space on every architecture.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?;
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let mut fields = rest.split_whitespace().skip(11);
    let mut next = || -> anyhow::Result<u64> {
        Ok(fields
            .next()
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    let ticks = next()? + next()?;
    #[allow(clippy::cast_precision_loss, reason = "clock ticks for display")]
    Ok(ticks as f64 / USER_HZ)
}
