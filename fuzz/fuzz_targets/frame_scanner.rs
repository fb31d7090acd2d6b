//! The relay's frame scanner over arbitrary client traffic arriving in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tenantgate::fuzz::frame_scanner(data);
});
