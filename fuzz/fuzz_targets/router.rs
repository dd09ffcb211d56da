#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/router.rs"]
mod router;

libfuzzer_sys::fuzz_target!(|data: &[u8]| router::run(data));
