//! Replays the committed corpora of the fuzz targets that exercise this crate's wire formats
//! (fuzz/, docs/fuzzing.md) through the targets' own entry functions: every seed and every
//! crash ever found stays a regression test without libFuzzer.

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[path = "../../fuzz/src/image_meta.rs"]
mod image_meta;
#[path = "../../fuzz/src/local_wire.rs"]
mod local_wire;
#[path = "../../fuzz/src/page_frames.rs"]
mod page_frames;

const HERE: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn local_wire_corpus() {
    replay::replay(HERE, "local_wire", local_wire::run);
}

#[test]
fn page_frames_corpus() {
    replay::replay(HERE, "page_frames", page_frames::run);
}

#[test]
fn image_meta_corpus() {
    replay::replay(HERE, "image_meta", image_meta::run);
}
