//! Message authentication between tenantgate instances that share a master key: HMAC-SHA-256
//! under a subkey derived from a master key for one purpose (HMAC-SHA-256 of the master key
//! over `tenantgate\0derive\0<purpose>`), so a MAC made for one use is worthless for any
//! other, and the master key itself never keys anything but AES-GCM and this derivation.
//! This module must not log keys or MACs, and never compares MACs with `==` (constant time
//! only, through `Mac::verify_slice`).

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// Bytes of a MAC.
pub const MAC_BYTES: usize = 32;

/// SHA-256's block size: a 32-byte key zero-padded to it is the same HMAC key (RFC 2104), and
/// lets us use the infallible constructor.
const BLOCK_BYTES: usize = 64;

fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = [0u8; BLOCK_BYTES];
    for (b, k) in block.iter_mut().zip(key) {
        *b = *k;
    }
    Hmac::<Sha256>::new(&block.into())
}

/// The subkey of `master` for `purpose`.
fn subkey(master: &[u8; 32], purpose: &str) -> [u8; 32] {
    let mut mac = hmac(master);
    mac.update(b"tenantgate\0derive\0");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The MAC of `message` under `master`'s subkey for `purpose`.
pub(super) fn sign(master: &[u8; 32], purpose: &str, message: &[u8]) -> [u8; MAC_BYTES] {
    let mut mac = hmac(&subkey(master, purpose));
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Whether `tag` is the MAC of `message` under `master`'s subkey for `purpose`, compared in
/// constant time.
pub(super) fn verify(master: &[u8; 32], purpose: &str, message: &[u8], tag: &[u8]) -> bool {
    let mut mac = hmac(&subkey(master, purpose));
    mac.update(message);
    mac.verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_for_its_key_purpose_and_message() {
        let (a, b) = ([7u8; 32], [8u8; 32]);
        let tag = sign(&a, "p", b"hello");
        assert!(verify(&a, "p", b"hello", &tag));
        assert!(!verify(&b, "p", b"hello", &tag));
        assert!(!verify(&a, "q", b"hello", &tag));
        assert!(!verify(&a, "p", b"hellp", &tag));
        assert!(!verify(&a, "p", b"hello", &tag[..31]));
        let mut flipped = tag;
        flipped[0] ^= 1;
        assert!(!verify(&a, "p", b"hello", &flipped));
    }
}
