//! Replays the committed corpora of the fuzz targets that exercise the gateway (fuzz/,
//! docs/fuzzing.md) through the targets' own entry functions: the userspace router under
//! lying workers, and the peer-control channel's handshake and frames.

#[path = "../../fuzz/src/replay.rs"]
mod replay;

// The entry function names the module as `crate::wire`, as the fuzz target that compiles
// it from source does.
use gateway::peers::wire;

#[path = "../../fuzz/src/peers_wire.rs"]
mod peers_wire;
#[path = "../../fuzz/src/router.rs"]
mod router;

const HERE: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn router_corpus() {
    replay::replay(HERE, "router", router::run);
}

#[test]
fn peers_wire_corpus() {
    replay::replay(HERE, "peers_wire", peers_wire::run);
}
