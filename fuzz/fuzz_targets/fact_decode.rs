//! Fuzzes VerifiedFact::decode: no panic, and a decodable input re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tend_sim::corpus::check_fact(data);
});
