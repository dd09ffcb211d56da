//! Replays the committed corpus of the `page_server` fuzz target (fuzz/, docs/fuzzing.md)
//! through its entry function: the page server against unauthenticated and authenticated
//! clients saying arbitrary things, and the page client against a parent that does.

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[path = "../../fuzz/src/page_server.rs"]
mod page_server;

#[test]
fn page_server_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "page_server", page_server::run);
}
