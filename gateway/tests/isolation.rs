//! `isolation: fresh_per_request` over real HTTP: every request of such a function sees a
//! fresh copy of the warm image, in the same worker process, whether its workers are forked
//! from the zygote or exec'd; a reused instance keeps counting.

mod common;

use std::time::Duration;

use common::Spindle;

/// Counts calls in a non-exported global and in linear memory (trapping if the two ever
/// disagree), grows memory by a page per call, and answers the count in decimal. A body
/// starting with `t` traps after all of that.
const COUNTER: &str = r#"(module
  (import "spindle" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    (local $v i32) (local $at i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 4096) (i32.add (i32.load (i32.const 4096)) (i32.const 1)))
    (drop (memory.grow (i32.const 1)))
    (if (i32.ne (i32.load (i32.const 4096)) (global.get $calls)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 0x74)) (then unreachable))
    (local.set $v (global.get $calls))
    (local.set $at (i32.const 300))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digit (local.get $v)))
    (call $output (local.get $at) (i32.sub (i32.const 300) (local.get $at)))
    (i32.const 0)))"#;

const N: usize = 20;

fn config(module: &std::path::Path) -> String {
    let m = module.display();
    format!(
        "functions:\n\
         \x20 - {{ name: fresh-fork, module: \"{m}\", isolation: fresh_per_request, start: fork }}\n\
         \x20 - {{ name: fresh-exec, module: \"{m}\", isolation: fresh_per_request, start: exec }}\n\
         \x20 - {{ name: reused, module: \"{m}\" }}\n\
         chains:\n\
         \x20 - {{ name: fork, route: /fork, steps: [fresh-fork], content_type: text/plain }}\n\
         \x20 - {{ name: exec, route: /exec, steps: [fresh-exec], content_type: text/plain }}\n\
         \x20 - {{ name: reuse, route: /reuse, steps: [reused], content_type: text/plain }}\n"
    )
}

fn series(name: &str, chain: &str, function: &str, extra: &str) -> String {
    format!(r#"{name}{{chain="{chain}",function="{function}"{extra}}}"#)
}

/// Waits up to 10 s for metric `what` to reach `want`.
async fn metric_reaches(spindle: &Spindle, what: &str, want: f64) {
    for _ in 0..200 {
        if spindle.metric(what).await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{what} is {:?}, not {want}, after 10 s",
        spindle.metric(what).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_per_request_answers_one_every_time_forked_or_execd_and_reuse_counts() {
    let dir = common::temp_dir("isolation-wat");
    let module = dir.join("counter.wat");
    std::fs::write(&module, COUNTER).unwrap();
    let spindle = Spindle::start("isolation", &config(&module)).await;

    for (chain, function, mode) in [
        ("fork", "fresh-fork", "fork"),
        ("exec", "fresh-exec", "exec"),
    ] {
        let pids = spindle.worker_pids(function);
        assert_eq!(pids.len(), 1, "{function}: one worker");
        for i in 0..N {
            let r = spindle.post(&format!("/{chain}"), "x").await;
            assert_eq!(
                (r.status, r.text()),
                (200, "1".into()),
                "{function}, request {i}"
            );
        }
        // A trap needs no new instance: the reset after it puts everything back.
        let trapped = spindle.post(&format!("/{chain}"), "trap").await;
        assert_ne!(trapped.status, 200, "{function}: {}", trapped.text());
        assert_eq!(spindle.post(&format!("/{chain}"), "x").await.text(), "1");
        // Same process throughout: reset in place, never restarted.
        assert_eq!(spindle.worker_pids(function), pids, "{function}");
        let resets = series(
            "spindle_function_resets_total",
            chain,
            function,
            r#",how="in_place""#,
        );
        metric_reaches(&spindle, &resets, (N + 2) as f64).await;
        let rebuilds = series(
            "spindle_function_resets_total",
            chain,
            function,
            r#",how="rebuild""#,
        );
        assert_eq!(spindle.metric(&rebuilds).await, Some(0.0), "{function}");
        let shrinks = series(
            "spindle_function_reset_memory_shrinks_total",
            chain,
            function,
            "",
        );
        assert_eq!(spindle.metric(&shrinks).await, Some((N + 2) as f64));
        // A few pages per call: copied back from the image, never dropped.
        let pages = |how: &str| {
            series(
                "spindle_function_reset_pages_total",
                chain,
                function,
                &format!(r#",how="{how}""#),
            )
        };
        assert!(
            spindle
                .metric(&pages("copied"))
                .await
                .is_some_and(|p| p >= (N + 2) as f64),
            "{function}: each reset copies back at least the counter's page"
        );
        assert_eq!(spindle.metric(&pages("dropped")).await, Some(0.0));
        let count = series("spindle_function_reset_seconds_count", chain, function, "");
        assert_eq!(spindle.metric(&count).await, Some((N + 2) as f64));
        let starts = format!(
            r#"spindle_instance_starts_total{{chain="{chain}",function="{function}",mode="{mode}"}}"#
        );
        assert_eq!(spindle.metric(&starts).await, Some(1.0), "{function}");
    }

    for i in 1..=N {
        let r = spindle.post("/reuse", "x").await;
        assert_eq!(r.text(), i.to_string(), "reused, request {i}");
    }
    let page = spindle.get("/metrics").await.text();
    assert!(
        !page.contains(r#"function="reused",how="#),
        "no reset rows for a reused function"
    );
}

#[test]
fn a_fresh_per_request_function_cannot_resume_from_a_remote_image() {
    let dir = common::temp_dir("isolation-resume");
    let module = dir.join("counter.wat");
    std::fs::write(&module, COUNTER).unwrap();
    let config = dir.join("spindle.yaml");
    std::fs::write(&config, self::config(&module)).unwrap();
    // Refused before the descriptor is even read.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("run")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--dataplane", "userspace"])
        .args(["--resume", "fresh-exec=@/nonexistent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--resume fresh-exec: `isolation: fresh_per_request`"),
        "{stderr}"
    );
}
