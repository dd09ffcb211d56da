#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/wasi_guest.rs"]
mod wasi_guest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasi_guest::run(data));
