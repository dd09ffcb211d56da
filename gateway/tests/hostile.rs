//! Hostile guests, over real HTTP against the real binary: each gets its status code and a
//! message naming the function, its instance is rebuilt (or, for what fails at start, the
//! gateway says why and does not start), and nothing else is disturbed — a well-behaved
//! chain on the same gateway answers throughout.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Spindle;

/// An echo reactor that misbehaves when the body asks: `recurse` (unbounded recursion),
/// `grow` (memory.grow in a loop until refused, then answers the pages it got), `huge`
/// (asks the host to output 1 GiB), `wild` (outputs from an address past its memory).
const HOSTILE: &str = r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (memory (export "memory") 1)
  (func $recurse (param i32) (result i32)
    (call $recurse (i32.add (local.get 0) (i32.const 1))))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func $is (param $p i32) (param $n i32) (param $word i64) (param $len i32) (result i32)
    (i32.and (i32.eq (local.get $n) (local.get $len))
             (i64.eq (i64.and (i64.load (local.get $p))
                              (i64.shr_u (i64.const -1)
                                         (i64.extend_i32_u (i32.mul (i32.sub (i32.const 8) (local.get $len)) (i32.const 8)))))
                     (local.get $word))))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    (local $pages i32)
    ;; "recurse" = 0x65737275636572, 7 bytes
    (if (call $is (local.get $p) (local.get $n) (i64.const 0x65737275636572) (i32.const 7))
      (then (drop (call $recurse (i32.const 0)))))
    ;; "grow" = 0x776f7267
    (if (call $is (local.get $p) (local.get $n) (i64.const 0x776f7267) (i32.const 4))
      (then
        (block $done
          (loop $more
            (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
            (local.set $pages (i32.add (local.get $pages) (i32.const 1)))
            (br $more)))
        ;; Answer the page count as one byte.
        (i32.store8 (i32.const 0) (local.get $pages))
        (call $out (i32.const 0) (i32.const 1))
        (return (i32.const 0))))
    ;; "huge" = 0x65677568
    (if (call $is (local.get $p) (local.get $n) (i64.const 0x65677568) (i32.const 4))
      (then (call $out (i32.const 0) (i32.const 0x40000000)) (return (i32.const 0))))
    ;; "wild" = 0x646c6977
    (if (call $is (local.get $p) (local.get $n) (i64.const 0x646c6977) (i32.const 4))
      (then (call $out (i32.const 0x7fff0000) (i32.const 16)) (return (i32.const 0))))
    (call $out (local.get $p) (local.get $n))
    (i32.const 0)))"#;

fn write_module(tag: &str, name: &str, wat: &str) -> PathBuf {
    let dir = common::temp_dir(&format!("{tag}-wat"));
    let path = dir.join(name);
    std::fs::write(&path, wat).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_status_and_disturb_nothing_else() {
    let module = write_module("hostile", "hostile.wat", HOSTILE);
    let yaml = format!(
        r#"
functions:
  - {{ name: hostile, module: "{}", memory: 1MiB }}
  - {{ name: upper, module: "{{wasm:uppercase}}" }}
chains:
  - {{ name: h, route: /h, steps: [hostile], content_type: text/plain }}
  - {{ name: up, route: /up, steps: [upper], content_type: text/plain }}
"#,
        module.display()
    );
    let spindle = Spindle::start("hostile", &yaml).await;
    assert_eq!(spindle.post("/h", "hello").await.text(), "hello");
    let cases = [
        ("recurse", 500, "call stack exhausted"),
        ("huge", 500, "output"),
        ("wild", 500, "output"),
    ];
    for (body, status, says) in cases {
        let r = spindle.post("/h", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(
            r.text().contains("function hostile"),
            "{body}: {}",
            r.text()
        );
        assert!(
            r.text().to_lowercase().contains(says),
            "{body}: {} (expected it to mention {says})",
            r.text()
        );
        // The instance is usable again, and the other chain never noticed.
        assert_eq!(
            spindle.post("/h", "after").await.text(),
            "after",
            "after {body}"
        );
        assert_eq!(spindle.post("/up", "fine").await.text(), "FINE");
    }
    // memory.grow up to the function's 1 MiB limit: refused there (16 pages of 64 KiB in
    // all, 1 already), and the guest carries on.
    let r = spindle.post("/h", "grow").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, vec![15u8], "grown to the limit and no further");
    assert_eq!(spindle.post("/h", "after").await.text(), "after");
}

/// What fails before an instance can serve stops the gateway's start with the reason.
fn start_fails(tag: &str, wat: &str, extra: &str) -> String {
    common::build_examples();
    let module = write_module(tag, "bad.wat", wat);
    let dir = common::temp_dir(tag);
    let config = dir.join("spindle.yaml");
    std::fs::write(
        &config,
        format!(
            "functions:\n  - {{ name: bad, module: \"{}\"{extra} }}\n\
             chains:\n  - {{ name: b, route: /b, steps: [bad] }}\n",
            module.display()
        ),
    )
    .unwrap();
    let began = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("run")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--dataplane", "userspace"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{tag}: it must not start");
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "{tag}: failed promptly, not at the ready timeout"
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_endless_initialize_and_too_much_declared_memory_stop_the_start_with_the_reason() {
    let endless = r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "_initialize") (loop $forever (br $forever)))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    let said = start_fails("hostile-init", endless, "");
    assert!(said.contains("function bad"), "{said}");
    assert!(said.contains("_initialize"), "{said}");
    assert!(said.to_lowercase().contains("fuel"), "{said}");

    let greedy = r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (memory (export "memory") 2000)
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    let said = start_fails("hostile-memory", greedy, ", memory: 1MiB");
    assert!(said.contains("function bad"), "{said}");
    assert!(said.to_lowercase().contains("memory"), "{said}");
}
