#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/descriptor.rs"]
mod descriptor;

libfuzzer_sys::fuzz_target!(|data: &[u8]| descriptor::arena(data));
