#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/local_wire.rs"]
mod local_wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| local_wire::run(data));
