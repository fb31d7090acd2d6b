//! The SCRAM server exchange over arbitrary client-first and client-final messages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tenantgate::fuzz::scram_exchange(data);
});
