//! Replays the committed corpora of the fuzz targets that exercise this crate (fuzz/,
//! docs/fuzzing.md) through the targets' own entry functions: the config loader on bytes and
//! on structured YAML, the worker's descriptor check, and the WASI/host layer on wasm-smith
//! modules (live fuzzing of that one is on demand only: it links wasmer).

#[path = "../../fuzz/src/replay.rs"]
mod replay;

// The entry functions name the loader as `crate::config` and `crate::plan`, as the fuzz
// targets that compile them from source do.
use chain_runtime::{config, plan};

#[path = "../../fuzz/src/config_bytes.rs"]
mod config_bytes;
#[path = "../../fuzz/src/config_yaml.rs"]
mod config_yaml;
#[path = "../../fuzz/src/descriptor.rs"]
#[allow(dead_code)]
mod descriptor;
#[path = "../../fuzz/src/descriptor_worker.rs"]
mod descriptor_worker;
#[path = "../../fuzz/src/wasi_guest.rs"]
mod wasi_guest;

const HERE: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn config_bytes_corpus() {
    replay::replay(HERE, "config_bytes", config_bytes::run);
}

#[test]
fn config_yaml_corpus() {
    replay::replay(HERE, "config_yaml", config_yaml::run);
}

#[test]
fn descriptor_worker_corpus() {
    replay::replay(HERE, "descriptor_worker", descriptor_worker::run);
}

#[test]
fn wasi_guest_corpus() {
    replay::replay(HERE, "wasi_guest", wasi_guest::run);
}
