//! Replays the committed corpus of the `descriptor_arena` fuzz target (fuzz/,
//! docs/fuzzing.md) through its entry function: `Arena::check` against the model of which
//! descriptors a well-behaved sender could send.

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[path = "../../fuzz/src/descriptor.rs"]
mod descriptor;

#[test]
fn descriptor_arena_corpus() {
    replay::replay(
        env!("CARGO_MANIFEST_DIR"),
        "descriptor_arena",
        descriptor::arena,
    );
}
