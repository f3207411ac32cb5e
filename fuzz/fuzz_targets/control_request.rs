//! Fuzzes control::parse_request: no panic on any line, and a request that parses
//! survives an encode/parse round trip unchanged (what the client sends is what the
//! device reads).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Refusing a line is fine; panicking (or a request changing on re-encoding) is not.
    let _ = tend_node::control::check_request_line(data);
});
