//! Any bytes as a startup-phase packet body: the parser must answer or refuse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = secrets_proxy::frontend::parse_packet(body);
});
