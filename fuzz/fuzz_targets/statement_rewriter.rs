//! The transaction-mode statement rewriter over arbitrary client messages and backend replies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tenantgate::fuzz::statement_rewriter(data);
});
