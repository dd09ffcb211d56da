#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
// chain-runtime's config loader and plan, compiled from its sources: they need no wasmer, so
// this target is cheap to build (chain-runtime's replay test runs the same code as
// `chain_runtime::config`).
#[path = "../../chain-runtime/src/config/mod.rs"]
#[allow(dead_code, unused_imports)]
mod config;
#[path = "../src/config_bytes.rs"]
mod config_bytes;
#[path = "../../chain-runtime/src/plan.rs"]
#[allow(dead_code)]
mod plan;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config_bytes::run(data));
