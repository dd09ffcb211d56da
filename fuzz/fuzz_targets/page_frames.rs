#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/page_frames.rs"]
mod page_frames;

libfuzzer_sys::fuzz_target!(|data: &[u8]| page_frames::run(data));
