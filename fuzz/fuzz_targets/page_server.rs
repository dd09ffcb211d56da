#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/page_server.rs"]
mod page_server;

libfuzzer_sys::fuzz_target!(|data: &[u8]| page_server::run(data));
