#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/image_meta.rs"]
mod image_meta;

libfuzzer_sys::fuzz_target!(|data: &[u8]| image_meta::run(data));
