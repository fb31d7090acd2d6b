//! The startup packet reader and parser over arbitrary first bytes of a client.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tenantgate::fuzz::startup_packet(data);
});
