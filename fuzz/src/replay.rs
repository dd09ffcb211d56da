//! Replays a fuzz target's committed corpus (`fuzz/corpus/<target>/*`) through its entry
//! function, as an ordinary `#[test]` of the crate the target exercises: no libFuzzer, no
//! instrumentation. Included by `#[path]` from each such crate's `tests/fuzz_corpus.rs`.
//!
//! It fails if the corpus directory is missing or empty (a replay of nothing proves nothing),
//! if an input panics (every failing file is named), or if one runs longer than
//! [`HANG_LIMIT`] (the fuzzer's `-timeout` in `scripts/fuzz.sh` is the same).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// An input taking longer than this is a hang, in replay as in a fuzzing run.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// `fuzz/corpus/<target>` of the repository whose crate `manifest_dir` is.
pub fn corpus_dir(manifest_dir: &str, target: &str) -> PathBuf {
    Path::new(manifest_dir).join("../fuzz/corpus").join(target)
}

/// Runs every file of `target`'s corpus through `run`; panics naming each file that
/// panicked or hung.
pub fn replay(manifest_dir: &str, target: &str, run: fn(&[u8])) {
    let dir = corpus_dir(manifest_dir, target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} of fuzz target {target}: {e}", dir.display()))
        .map(|entry| entry.expect("reading the corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} of fuzz target {target} is empty: commit its seeds",
        dir.display()
    );
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("reading a corpus file");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // On its own thread so a hang is reported instead of stalling the test run; the
        // panic message itself is printed by the default hook.
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{target}/{name}"))
            .spawn(move || {
                let ok = std::panic::catch_unwind(|| run(&data)).is_ok();
                let _ = tx.send(ok);
            })
            .expect("spawning the replay thread");
        match rx.recv_timeout(HANG_LIMIT) {
            Ok(true) => {}
            Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                failed.push(format!("{name}: panicked"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failed.push(format!("{name}: still running after {HANG_LIMIT:?}"));
                // The hung thread cannot be stopped; report at once rather than pile more up.
                break;
            }
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {target}: {} of {} corpus inputs failed:\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
    eprintln!(
        "fuzz target {target}: {} corpus inputs replayed",
        files.len()
    );
}
