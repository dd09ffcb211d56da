//! A function that cannot start says why, in its own words: `spindle run` exits non-zero
//! with the worker's (or zygote's) reason as its error, whether the instance was forked from
//! a zygote or exec'd, and `spindle validate` reports the same problems at the function's
//! `module:` key without running anything. One case per kind of failure, each message checked
//! whole.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A reactor with every export it needs: the cases break one thing each.
const GOOD_EXPORTS: &str = r#"
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param i32 i32) (result i32) (i32.const 0))"#;

struct Case {
    tag: &'static str,
    /// The module's text (WAT).
    wat: String,
    /// Extra keys of the function (indented as its other keys).
    keys: &'static str,
    /// The error `spindle run` ends with, after `error: function bad of chain c failed to
    /// start: `; `{module}` stands for the module's path.
    run: &'static str,
    /// What `spindle validate` says at the module key, one problem a line, each after
    /// `function `bad`: `; empty when only running the module can tell.
    validate: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            tag: "compile",
            wat: "(module (func (result i32) (i64.const 0)))".into(),
            keys: "",
            run: "cannot compile module {module}: Validation error: type mismatch: expected i32, found i64 (at offset 0x1a)",
            validate: &[
                "cannot compile module {module}: Validation error: type mismatch: expected i32, found i64 (at offset 0x1a)",
            ],
        },
        Case {
            tag: "imports",
            wat: format!(
                r#"(module
  (import "env" "log" (func (param i32 i32)))
  (import "env" "heap" (memory 1))
  (import "spindle" "emit" (func (param i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32) (result i32)))
  (memory (export "memory") 1){GOOD_EXPORTS})"#
            ),
            keys: "",
            run: "module {module} cannot run as function `bad`:\n  \
                  - imports `env.log` (func (param i32 i32)), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)\n  \
                  - imports `env.heap` (memory 1), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)\n  \
                  - imports `spindle.emit` (func (param i32)), which Spindle does not provide (the `spindle` module has `output`, `error`, `next`)\n  \
                  - imports `wasi_snapshot_preview1.fd_write` as (func (param i32) (result i32)), but Spindle provides (func (param i32 i32 i32 i32) (result i32))",
            validate: &[
                "imports `env.log` (func (param i32 i32)), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `env.heap` (memory 1), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `spindle.emit` (func (param i32)), which Spindle does not provide (the `spindle` module has `output`, `error`, `next`)",
                "imports `wasi_snapshot_preview1.fd_write` as (func (param i32) (result i32)), but Spindle provides (func (param i32 i32 i32 i32) (result i32))",
            ],
        },
        Case {
            tag: "memory",
            wat: format!(r#"(module (memory (export "memory") 4){GOOD_EXPORTS})"#),
            keys: "    memory: 128KiB\n",
            run: "module {module} cannot run as function `bad`:\n  \
                  - memory `memory` needs 4 pages (256KiB) at start, more than its `memory:` limit of 2 pages (128KiB)",
            validate: &[
                "memory `memory` needs 4 pages (256KiB) at start, more than its `memory:` limit of 2 pages (128KiB)",
            ],
        },
        Case {
            tag: "exports",
            wat: r#"(module (memory (export "memory") 1) (func (export "_start"))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 0)))"#
                .into(),
            keys: "",
            run: "module {module} cannot run as function `bad`:\n  \
                  - does not export `spindle_handle` (func (param i32 i32) (result i32)), which a reactor must (it exports `_start`: set `mode: command` to run it as a WASI command)",
            validate: &[
                "does not export `spindle_handle` (func (param i32 i32) (result i32)), which a reactor must (it exports `_start`: set `mode: command` to run it as a WASI command)",
            ],
        },
        Case {
            tag: "command",
            wat: format!(r#"(module (memory (export "memory") 1){GOOD_EXPORTS})"#),
            keys: "    mode: command\n",
            run: "module {module} cannot run as function `bad`:\n  \
                  - does not export `_start` (func), which a command (`mode: command`) must (it exports `spindle_handle`: leave out `mode: command` to run it as a reactor)",
            validate: &[
                "does not export `_start` (func), which a command (`mode: command`) must (it exports `spindle_handle`: leave out `mode: command` to run it as a reactor)",
            ],
        },
        Case {
            tag: "instantiate",
            wat: format!(
                r#"(module (memory (export "memory") 1) (data (i32.const 70000) "x"){GOOD_EXPORTS})"#
            ),
            keys: "",
            run: "cannot instantiate module {module}: it trapped while instantiating: out of bounds memory access",
            validate: &[],
        },
        Case {
            tag: "initialize",
            wat: format!(
                r#"(module (memory (export "memory") 1)
  (func $boom unreachable)
  (func (export "_initialize") (call $boom)){GOOD_EXPORTS})"#
            ),
            keys: "",
            run: "cannot instantiate module {module}: `_initialize` trapped: unreachable\n    \
                  at boom (<module>[0]:0x65)\n    \
                  at <unnamed> (<module>[1]:0x6b)",
            validate: &[],
        },
    ]
}

/// Writes the case's module and a config running it (with `start`), returns the config.
fn config(dir: &Path, case: &Case, start: &str) -> std::path::PathBuf {
    let module = dir.join(format!("{}.wat", case.tag));
    std::fs::write(&module, &case.wat).unwrap();
    let start = match start {
        "exec" => "    start: exec\n",
        _ => "",
    };
    let yaml = format!(
        "functions:\n  - name: bad\n    module: {}.wat\n{}{start}  - name: fine\n    module: {}\nchains:\n  - name: c\n    route: /c\n    steps: [fine, bad]\n",
        case.tag,
        case.keys,
        common::wasm("uppercase"),
    );
    let path = dir.join(format!("{}-{}.yaml", case.tag, start.trim().len()));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Runs `spindle ARGS` to its end (at most 60 s): (success, stdout, stderr).
fn spindle(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("spindle {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_function_that_cannot_start_says_why_when_run_and_when_validated() {
    common::build_examples();
    let dir = common::temp_dir("startup-errors");
    for case in cases() {
        for start in ["fork", "exec"] {
            let config = config(&dir, &case, start);
            let config = config.canonicalize().unwrap();
            let module = dir
                .join(format!("{}.wat", case.tag))
                .canonicalize()
                .unwrap();
            let module = module.display().to_string();
            let (ok, _, stderr) = spindle(&[
                "run",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--dataplane",
                "userspace",
            ]);
            let what = format!("{} ({start})", case.tag);
            assert!(!ok, "{what}: spindle run started:\n{stderr}");
            let expected = format!(
                "error: function bad of chain c failed to start: {}\n",
                case.run.replace("{module}", &module)
            );
            let at = stderr
                .find("error: function bad")
                .unwrap_or_else(|| panic!("{what}: no start failure in:\n{stderr}"));
            assert_eq!(&stderr[at..], expected, "{what}; the whole log:\n{stderr}");
            assert!(
                !stderr.contains("killed by signal") && !stderr.contains("exited before"),
                "{what}: the exit status stood in for the reason:\n{stderr}"
            );
            // Said once: the worker or zygote leaves the telling to the gateway.
            assert_eq!(
                stderr
                    .matches(&case.run.replace("{module}", &module))
                    .count(),
                1,
                "{what}:\n{stderr}"
            );
        }

        let config = config(&dir, &case, "fork");
        let (ok, stdout, stderr) = spindle(&["validate", config.to_str().unwrap()]);
        let module = dir.join(format!("{}.wat", case.tag));
        let relative = format!("{}.wat", case.tag);
        let lines: Vec<String> = case
            .validate
            .iter()
            .map(|p| {
                format!(
                    "{}:3:13: function `bad`: {}",
                    config.display(),
                    p.replace("{module}", &module.display().to_string())
                )
            })
            .collect();
        if lines.is_empty() {
            assert!(
                ok,
                "{}: validate refused a module only running can fault:\n{stdout}{stderr}",
                case.tag
            );
            continue;
        }
        assert!(!ok, "{}: validate passed:\n{stdout}", case.tag);
        assert_eq!(
            stdout,
            format!("{}\n", lines.join("\n")),
            "{} ({relative})",
            case.tag
        );
        assert_eq!(
            stderr,
            format!(
                "error: {} problem(s) in {}\n",
                lines.len(),
                config.display()
            ),
            "{}",
            case.tag
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
