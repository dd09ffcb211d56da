//! Ctrl-C during a run: the target is stopped and reaped, the partial report is written.
//! Its own test binary, because the signal goes to the whole process.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::getpid;
use spindle_bench::{BenchError, BenchOptions, Target, run};

#[test]
fn sigint_stops_the_run_and_its_targets() {
    let dir = std::env::temp_dir().join(format!("spindle-bench-{}-int", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = BenchOptions {
        targets: vec![Target::Ceiling, Target::Ceiling],
        duration: Duration::from_secs(30),
        warmup: Duration::from_millis(100),
        connections: 2,
        // Short, so the signal lands in the first target's measurement, not the baseline.
        idle_baseline: Duration::from_millis(100),
        json: Some(dir.join("report.json")),
        ..BenchOptions::default()
    };
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(1500));
        // To the process, as a Ctrl-C is, not to this thread (raise).
        let _ = kill(getpid(), Signal::SIGINT);
    });
    let began = Instant::now();
    let err = run(&opts, Path::new(env!("CARGO_BIN_EXE_hyper-hello"))).unwrap_err();
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    let BenchError::Interrupted { report } = err else {
        panic!("{err}");
    };
    assert_eq!(
        report.targets[0].skipped.as_deref(),
        Some("interrupted during the measurement")
    );
    assert_eq!(
        report.targets[1].skipped.as_deref(),
        Some("not run: interrupted")
    );
    assert!(dir.join("report.json").is_file());
    // No hyper-hello of ours is left: none of our children exists any more.
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        assert!(
            !(ppid == Some(me.as_str()) && stat.contains("(hyper-hello)")),
            "left running: {stat}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
