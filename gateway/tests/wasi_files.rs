//! `args:` and `files:` through the real binary: a C command (examples/src/cat_args.c) reads
//! its argv and files of its preopened directories, and never anything outside them nor a
//! write; reactors read preopens whether forked from their zygote, reset per request or
//! exec'd, inside the sandbox when the tests run as root.

mod common;

use std::path::{Path, PathBuf};

use common::Spindle;

/// The host side: `data/` (preopened) and a secret beside it.
///
/// ```text
/// secret.txt                 "the secret"
/// data/hello.txt             "hello from the host\n"
/// data/sub/inner.txt         "inner\n"
/// data/in -> sub/inner.txt
/// data/abs -> <dir>/secret.txt
/// data/out -> ../secret.txt
/// data/loop -> loop
/// more/x.txt                 "x\n"
/// ```
fn host_tree(tag: &str) -> PathBuf {
    let dir = common::temp_dir(tag);
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::create_dir_all(dir.join("more")).unwrap();
    std::fs::write(dir.join("secret.txt"), "the secret").unwrap();
    std::fs::write(data.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(data.join("sub/inner.txt"), "inner\n").unwrap();
    std::fs::write(dir.join("more/x.txt"), "x\n").unwrap();
    let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, data.join(at)).unwrap();
    link(Path::new("sub/inner.txt"), "in");
    link(&dir.join("secret.txt"), "abs");
    link(Path::new("../secret.txt"), "out");
    link(Path::new("loop"), "loop");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reads_its_args_and_files_and_nothing_else() {
    let host = host_tree("files-cmd-host");
    let (data, more) = (host.join("data"), host.join("more"));
    let yaml = format!(
        r#"
functions:
  - name: cat
    module: {{wasm:cat_args}}
    mode: command
    args: [/data/hello.txt]
    files: {{ /data: "{data}" }}
  - name: catany
    module: {{wasm:cat_args}}
    mode: command
    args: ["-", two words]
    files: {{ /data: "{data}", /more: "{more}" }}
  - name: catwrite
    module: {{wasm:cat_args}}
    mode: command
    args: [/data/hello.txt, --write]
    files: {{ /data: "{data}" }}
  - name: nofiles
    module: {{wasm:cat_args}}
    mode: command
    args: [/data/hello.txt]
chains:
  - {{ name: cat, route: /cat, steps: [cat], content_type: text/plain }}
  - {{ name: catany, route: /catany, steps: [catany], content_type: text/plain }}
  - {{ name: catwrite, route: /catwrite, steps: [catwrite] }}
  - {{ name: nofiles, route: /nofiles, steps: [nofiles] }}
"#,
        data = data.display(),
        more = more.display(),
    );
    let mut spindle = Spindle::start("files-cmd", &yaml).await;

    let r = spindle.post("/cat", "").await;
    assert_eq!(
        (r.status, r.text()),
        (
            200,
            "argv: cat /data/hello.txt\nhello from the host\n".into()
        )
    );
    for (path, answer) in [
        ("/data/hello.txt", "hello from the host\n"),
        ("/data/sub/inner.txt", "inner\n"),
        ("/data/in", "inner\n"),
        ("/data/sub/../hello.txt", "hello from the host\n"),
        ("/more/x.txt", "x\n"),
    ] {
        let r = spindle.post("/catany", path).await;
        assert_eq!(
            (r.status, r.text()),
            (200, format!("argv: catany - two words\n{answer}")),
            "{path}"
        );
    }
    for (path, why) in [
        ("/data/../secret.txt", "Capabilities insufficient"),
        ("/data/abs", "Capabilities insufficient"),
        ("/data/out", "Capabilities insufficient"),
        ("/data/sub/../../secret.txt", "Capabilities insufficient"),
        ("/data/loop", "Symbolic link loop"),
        ("/data/missing", "No such file or directory"),
        ("/etc/passwd", "Capabilities insufficient"),
    ] {
        let r = spindle.post("/catany", path).await;
        assert_eq!(
            (r.status, r.text()),
            (
                500,
                format!("function catany: exited with status 1: cannot open {path}: {why}\n")
            ),
            "{path}"
        );
    }
    let r = spindle.post("/catwrite", "").await;
    assert_eq!(
        (r.status, r.text()),
        (
            500,
            "function catwrite: exited with status 1: cannot write /data/hello.txt: Read-only file system\n".into()
        )
    );
    // Without `files:` the guest has no filesystem at all.
    let r = spindle.post("/nofiles", "").await;
    assert_eq!(
        (r.status, r.text()),
        (
            500,
            "function nofiles: exited with status 1: cannot open /data/hello.txt: Capabilities insufficient\n".into()
        )
    );
    assert_eq!(
        std::fs::read_to_string(data.join("hello.txt")).unwrap(),
        "hello from the host\n",
        "the file is as it was"
    );
    assert!(spindle.stop().success(), "{}", spindle.log());
    let _ = std::fs::remove_dir_all(&host);
}

/// Opens `hello.txt` beneath preopen fd 3 on every request, keeps it open, and answers the
/// fd number and what it read.
const READER: &str = r#"(module
    (import "spindle" "output" (func $out (param i32 i32)))
    (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (data (i32.const 100) "hello.txt")
    (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
    (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
        (if (i32.ne (call $open (i32.const 3) (i32.const 1) (i32.const 100) (i32.const 9)
                (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200))
                (i32.const 0))
            (then (return (i32.const 1))))
        (i32.store8 (i32.const 2047) (i32.add (i32.const 48) (i32.load (i32.const 200))))
        (i32.store (i32.const 300) (i32.const 2048))
        (i32.store (i32.const 304) (i32.const 64))
        (drop (call $read (i32.load (i32.const 200)) (i32.const 300) (i32.const 1) (i32.const 308)))
        (call $out (i32.const 2047) (i32.add (i32.const 1) (i32.load (i32.const 308))))
        (i32.const 0)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactors_read_their_preopens_forked_reset_or_exec() {
    let host = host_tree("files-reactor-host");
    let data = host.join("data");
    let reader = host.join("reader.wat");
    std::fs::write(&reader, READER).unwrap();
    let yaml = format!(
        r#"
functions:
  - {{ name: forked, module: "{m}", files: {{ /data: "{d}" }} }}
  - {{ name: fresh, module: "{m}", isolation: fresh_per_request, files: {{ /data: "{d}" }} }}
  - {{ name: exec, module: "{m}", start: exec, files: {{ /data: "{d}" }} }}
chains:
  - {{ name: forked, route: /forked, steps: [forked] }}
  - {{ name: fresh, route: /fresh, steps: [fresh] }}
  - {{ name: exec, route: /exec, steps: [exec] }}
"#,
        m = reader.display(),
        d = data.display(),
    );
    let mut spindle = Spindle::start("files-reactor", &yaml).await;
    // The guest's fd 3 is the preopen; the file gets 4, then (kept open) 5 where requests
    // share an instance, 4 every time where each request starts from the warm image.
    for (route, fds) in [("/forked", "45"), ("/fresh", "44"), ("/exec", "45")] {
        for fd in fds.chars() {
            let r = spindle.post(route, "x").await;
            assert_eq!(
                (r.status, r.text()),
                (200, format!("{fd}hello from the host\n")),
                "{route}"
            );
        }
    }
    // The gateway opened the directory and handed it over at fd 15 (proto::worker): a
    // confined worker's own root is empty.
    for function in ["forked", "fresh", "exec"] {
        let pids = spindle.worker_pids(function);
        assert!(!pids.is_empty(), "{function} has workers");
        for pid in pids {
            let fd = std::fs::read_link(format!("/proc/{pid}/fd/{}", proto::worker::PREOPEN_FD))
                .unwrap();
            assert_eq!(fd, data, "{function} worker {pid}");
            if testkit::is_root() {
                let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert_eq!(root, ["proc"], "{function} worker {pid} is in the sandbox");
            }
        }
    }
    assert_eq!(
        spindle.zygote_pids("forked").len(),
        1,
        "forked from a zygote"
    );
    assert!(spindle.stop().success(), "{}", spindle.log());
    let _ = std::fs::remove_dir_all(&host);
}

/// configs/files.yaml answers as its comment says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_config_answers_as_documented() {
    let mut spindle = Spindle::start_file("cfg-files", "configs/files.yaml").await;
    let r = spindle.post("/cat", "/data/notes/readme.txt").await;
    assert_eq!(
        (r.status, r.text()),
        (
            200,
            "argv: cat -\nDirectories beneath it can be read too.\n".into()
        )
    );
    let r = spindle.post("/cat", "/data/../files.yaml").await;
    assert_eq!(
        (r.status, r.text()),
        (
            500,
            "function cat: exited with status 1: cannot open /data/../files.yaml: Capabilities insufficient\n".into()
        )
    );
    let r = spindle.post("/hello", "").await;
    assert_eq!(
        (r.status, r.text()),
        (
            200,
            "argv: hello /data/hello.txt\nHello from a file Spindle preopened read-only.\n".into()
        )
    );
    assert!(spindle.stop().success(), "{}", spindle.log());
}
