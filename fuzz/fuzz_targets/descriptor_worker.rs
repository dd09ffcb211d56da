#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
#[path = "../src/descriptor.rs"]
#[allow(dead_code)]
mod descriptor;
#[path = "../src/descriptor_worker.rs"]
mod descriptor_worker;

libfuzzer_sys::fuzz_target!(|data: &[u8]| descriptor_worker::run(data));
