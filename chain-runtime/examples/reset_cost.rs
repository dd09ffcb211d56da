//! What `isolation: fresh_per_request` costs per request, measured in process against the
//! reused instance: one module whose `spindle_handle` writes one byte into each of K pages
//! (K = the input's length), run as three functions that differ only in their isolation:
//!
//! - `reuse`: the same warm instance every time (the pages stay private, no faults);
//! - `fresh`: reset in place after every call (the written pages are copied back from the
//!   image while at most `KEEP_RESIDENT_PAGES`, else dropped back to it and faulted in
//!   again, copy-on-write, by the next write);
//! - `rebuild`: the same module plus one never-called function that holds a `table.set`,
//!   which makes fresh_per_request rebuild the instance from the image after every call
//!   instead (what a reset in place saves).
//!
//! Per request it times what a worker does: `invoke` plus the `prepare` after it (where the
//! reset runs). Rounds interleave every (K, mode) pair, so drift hits all of them alike.
//!
//! ```sh
//! cargo run --release -p chain-runtime --example reset_cost -- [ROUNDS] [REQUESTS]
//! ```

use std::time::Instant;

use chain_runtime::host::{BufferIo, Outcome};
use chain_runtime::instance::{Instance, InstanceBuilder};

const TOUCH: &str = r#"(module
  (import "spindle" "output" (func $output (param i32 i32)))
  (memory (export "memory") 40)
  (global $calls (mut i32) (i32.const 0))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    (local $i i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (block $done
      (loop $page
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        ;; page 16 + i: past the input, output and stack of page 0
        (i32.store8 (i32.shl (i32.add (local.get $i) (i32.const 16)) (i32.const 12))
          (global.get $calls))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $page)))
    (i32.store (i32.const 200) (global.get $calls))
    (call $output (i32.const 200) (i32.const 4))
    (i32.const 0))
  ;;EXTRA
)"#;

/// Never called: its `table.set` alone makes resets rebuild the instance.
const TABLE_SET: &str = r#"(table $t 1 funcref)
  (func $nothing)
  (elem declare func $nothing)
  (func $never (table.set $t (i32.const 0) (ref.func $nothing)))"#;

const MODES: [&str; 3] = ["reuse", "fresh", "rebuild"];
const PAGES: [usize; 6] = [0, 1, 16, 64, 256, 600];

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));
    let requests: usize = args.next().map_or(2000, |a| a.parse().expect("REQUESTS"));

    let dir = std::env::temp_dir().join(format!("spindle-reset-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("touch.wat"), TOUCH).unwrap();
    std::fs::write(
        dir.join("touch-table.wat"),
        TOUCH.replace(";;EXTRA", TABLE_SET),
    )
    .unwrap();
    let yaml = "functions:\n\
        \x20 - { name: reuse, module: touch.wat }\n\
        \x20 - { name: fresh, module: touch.wat, isolation: fresh_per_request }\n\
        \x20 - { name: rebuild, module: touch-table.wat, isolation: fresh_per_request }\n\
        chains:\n\
        \x20 - { name: c, route: /c, steps: [reuse, fresh, rebuild] }\n";
    let config = dir.join("spindle.yaml");
    std::fs::write(&config, yaml).unwrap();

    let mut instances: Vec<Instance> = MODES
        .iter()
        .map(|mode| {
            InstanceBuilder::from_config_text(yaml, &config, "c", mode)
                .and_then(|b| b.cold_from_file())
                .unwrap_or_else(|e| panic!("{mode}: {e}"))
        })
        .collect();
    for instance in &mut instances {
        // What the worker does before it reports ready (arms the fresh ones).
        instance.host_mut().prepare().unwrap();
    }

    // samples[k][mode]: per-request ns; resets[k][mode]: (reset ns, pages, copied back).
    let mut samples = vec![vec![Vec::new(); MODES.len()]; PAGES.len()];
    let mut resets = vec![vec![Vec::new(); MODES.len()]; PAGES.len()];
    for round in 0..=rounds {
        for (k, &pages) in PAGES.iter().enumerate() {
            let input = vec![b'x'; pages];
            for (m, instance) in instances.iter_mut().enumerate() {
                let host = instance.host_mut();
                for _ in 0..requests {
                    let mut io = BufferIo::new(64, &input);
                    let started = Instant::now();
                    let outcome = host.invoke(&mut io);
                    host.prepare().unwrap();
                    let took = started.elapsed();
                    assert!(
                        matches!(outcome, Outcome::Done { .. }),
                        "{}: {outcome:?}",
                        MODES[m]
                    );
                    let reports: Vec<_> = host.take_resets().collect();
                    // Round 0 warms up (and faults the reused instance's pages in once).
                    if round > 0 {
                        samples[k][m].push(took.as_nanos() as u64);
                        for r in reports {
                            resets[k][m].push((r.elapsed.as_nanos() as u64, r.pages, r.copied));
                        }
                    }
                }
            }
        }
    }

    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "{rounds} rounds x {requests} requests per (pages written, mode), interleaved; \
         per request: invoke + prepare (the reset)\n"
    );
    println!(
        "| pages written | reuse p50 µs | fresh p50 µs | fresh / reuse | fresh − reuse µs | \
         reset p50 µs | pages per reset | copied back | fresh p99 µs | rebuild p50 µs | \
         rebuild / fresh |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (k, &pages) in PAGES.iter().enumerate() {
        let [reuse, fresh, rebuild] = [0, 1, 2].map(|m| {
            let mut s = samples[k][m].clone();
            s.sort_unstable();
            s
        });
        let mut reset_ns: Vec<u64> = resets[k][1].iter().map(|r| r.0).collect();
        reset_ns.sort_unstable();
        let n = resets[k][1].len().max(1) as f64;
        let mean_pages = resets[k][1].iter().map(|r| r.1).sum::<u64>() as f64 / n;
        let copied = resets[k][1].iter().filter(|r| r.2).count() as f64 / n;
        let (r50, f50, b50) = (pct(&reuse, 50.0), pct(&fresh, 50.0), pct(&rebuild, 50.0));
        println!(
            "| {pages} | {:.2} | {:.2} | {:.2}× | {:.2} | {:.2} | {mean_pages:.0} | {:.0}% | {:.2} | {:.2} | {:.2}× |",
            us(r50),
            us(f50),
            f50 as f64 / r50 as f64,
            us(f50) - us(r50),
            us(pct(&reset_ns, 50.0)),
            100.0 * copied,
            us(pct(&fresh, 99.0)),
            us(b50),
            b50 as f64 / f50 as f64,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `p`th percentile of sorted `s`.
fn pct(s: &[u64], p: f64) -> u64 {
    if s.is_empty() {
        return 0;
    }
    s[((s.len() - 1) as f64 * p / 100.0).round() as usize]
}
