#![no_main]
// The entry function is shared with the corpus replay test (docs/fuzzing.md).
// The gateway's peer-channel wire, compiled from its source: it needs no wasmer, so this
// target is cheap to build (the gateway's replay test runs it as `gateway::peers::wire`).
#[path = "../src/peers_wire.rs"]
mod peers_wire;
#[path = "../../gateway/src/peers/wire.rs"]
#[allow(dead_code)]
mod wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| peers_wire::run(data));
