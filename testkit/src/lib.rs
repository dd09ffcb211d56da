//! Test support shared by the workspace's tests (a dev-dependency only; nothing shipped uses
//! it). It owns two things:
//!
//! - **Tests that cannot run here.** With `CI=true` in the environment (CI sets it) such a
//!   test fails with its reason, so a green CI run means every test ran. Elsewhere it prints a
//!   `SKIPPED` line straight to the terminal (past the test harness's output capture, which
//!   would otherwise hide it for a passing test) and, when `SPINDLE_SKIP_LOG` names a file,
//!   appends the line there so `scripts/test.sh` can count the skips.
//! - **The example Wasm modules** the tests run: built once per test binary with
//!   `make -C examples`, found by name.
//!
//! It must not weaken a test: no helper here turns a failure into a pass.

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Declares that `test` cannot run here because of `reason`. Under CI this fails the test;
/// elsewhere it reports the skip and returns, and the caller returns too.
#[track_caller]
pub fn cannot_run(test: &str, reason: impl Display) {
    let log = std::env::var_os("SPINDLE_SKIP_LOG").map(PathBuf::from);
    // io::stderr() is not captured by the test harness (only the print macros are).
    report(
        in_ci(),
        test,
        &reason,
        log.as_deref(),
        &mut std::io::stderr().lock(),
    );
}

#[track_caller]
fn report(ci: bool, test: &str, reason: &dyn Display, log: Option<&Path>, out: &mut dyn Write) {
    if ci {
        panic!("{test} cannot run in CI: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}\n");
    let _ = out.write_all(line.as_bytes());
    if let Some(log) = log
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when running as root; otherwise declares that `test` cannot run ([`cannot_run`])
/// because it needs root for `what`, and returns false.
#[track_caller]
pub fn require_root(test: &str, what: &str) -> bool {
    if is_root() {
        return true;
    }
    cannot_run(test, format!("needs root ({what})"));
    false
}

/// The workspace's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace root")
        .to_path_buf()
}

/// Builds examples/wasm/*.wasm once per test binary (make is incremental).
pub fn build_examples() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let status = Command::new("make")
            .args(["-s", "-C"])
            .arg(repo_root().join("examples"))
            .status()
            .expect("running make -C examples (is make installed? run scripts/setup.sh)");
        assert!(
            status.success(),
            "building the example Wasm functions failed (see above)"
        );
    });
}

/// The path of example module `name` (examples/wasm/NAME.wasm); call [`build_examples`] first.
pub fn wasm(name: &str) -> PathBuf {
    repo_root()
        .join("examples/wasm")
        .join(format!("{name}.wasm"))
}

/// IP `ForwDatagrams` of the network namespace the calling thread is in (/proc/thread-self:
/// /proc/net would show the process's namespace): how many packets its stack routed.
pub fn forwarded_datagrams() -> u64 {
    let snmp =
        std::fs::read_to_string("/proc/thread-self/net/snmp").expect("/proc/thread-self/net/snmp");
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        lines.next().expect("Ip: names"),
        lines.next().expect("Ip: values"),
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .expect("ForwDatagrams");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("a ForwDatagrams count")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_detection_reads_the_variable() {
        // Only the parsing is checked: the variable itself belongs to whoever runs the tests.
        let ci = in_ci();
        let var = std::env::var("CI").unwrap_or_default();
        assert_eq!(ci, !matches!(var.trim(), "" | "0" | "false"));
    }

    #[test]
    fn a_test_that_cannot_run_fails_under_ci() {
        let outcome = std::panic::catch_unwind(|| {
            report(true, "probe", &"a reason", None, &mut Vec::new());
        });
        let message = outcome.unwrap_err();
        let message = message.downcast_ref::<String>().unwrap();
        assert_eq!(message, "probe cannot run in CI: a reason");
    }

    #[test]
    fn elsewhere_it_says_skipped_and_logs_the_line() {
        let log = std::env::temp_dir().join(format!("testkit-skip-{}", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut out = Vec::new();
        report(false, "probe", &"a reason", Some(&log), &mut out);
        report(false, "other", &"another", Some(&log), &mut out);
        assert_eq!(out, b"SKIPPED probe: a reason\nSKIPPED other: another\n");
        assert_eq!(std::fs::read(&log).unwrap(), out);
        let _ = std::fs::remove_file(&log);
    }

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").exists());
        assert!(repo_root().join("examples/Makefile").exists());
    }
}
