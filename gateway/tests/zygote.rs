//! Local fork: instances forked from their function's zygote serve, are supervised like
//! exec'd workers (restart by fork after a crash, 502 for what they held), outlive a dead
//! zygote, and `start: exec` still starts them the old way.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Spindle;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const FORKRAND: &str = r#"
functions:
  - name: forkrand
    module: {wasm:forkrand}
    instances: 2
  - name: upper
    module: {wasm:uppercase}
chains:
  - name: rand
    route: /rand
    steps: [forkrand]
  - name: up
    route: /up
    steps: [upper]
    content_type: text/plain
"#;

fn starts(function: &str, chain: &str, mode: &str) -> String {
    format!(
        r#"spindle_instance_starts_total{{chain="{chain}",function="{function}",mode="{mode}"}}"#
    )
}

/// Waits up to 10 s for `probe` to hold.
async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 10 s: {what}");
}

/// (fd number → what /proc says it is) for the fixed hand-off numbers of `pid`.
/// Every open fd of `pid` above stdio and its link target; none once `pid` has exited
/// and been reaped (a late child can vanish between listing /proc and reading its fds).
fn all_fds(pid: i32) -> Vec<(i32, String)> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("/proc/{pid}/fd: {e}"),
    };
    let mut fds: Vec<(i32, String)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            (fd > 2).then(|| (fd, link.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

fn fixed_fds(pid: i32) -> Vec<(i32, String)> {
    (3..=proto::worker::HIGHEST_FIXED_FD)
        .filter_map(|fd| {
            let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            Some((fd, link.display().to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_start_by_fork_with_their_fds_in_place_and_serve() {
    let spindle = Spindle::start_file("zygote-hello", "configs/hello.yaml").await;
    let r = spindle.post("/hello", "hello spindle").await;
    assert_eq!(r.text(), r#"{"result":"ELDNIPS OLLEH","bytes":13}"#);
    for f in ["uppercase", "reverse", "frame"] {
        assert_eq!(
            spindle.metric(&starts(f, "hello", "fork")).await,
            Some(1.0),
            "{f}"
        );
        assert_eq!(
            spindle.metric(&starts(f, "hello", "exec")).await,
            None,
            "{f}"
        );
        assert_eq!(spindle.zygote_pids(f).len(), 1, "one zygote of {f}");
        // worker_pids only lists children of the gateway: the fork made it the gateway's.
        let workers = spindle.worker_pids(f);
        assert_eq!(workers.len(), 1, "one forked worker of {f}");
        let fds = fixed_fds(workers[0]);
        let at = |n: i32| fds.iter().find(|(fd, _)| *fd == n).map(|(_, l)| l.as_str());
        assert!(
            at(3).is_some_and(|l| l.contains("memfd:spindle-hello (")),
            "arena payload: {fds:?}"
        );
        assert!(
            at(12).is_some_and(|l| l.contains("memfd:spindle-hello-meta")),
            "arena metadata: {fds:?}"
        );
        assert!(
            at(4).is_some_and(|l| l.starts_with("socket:")),
            "socket: {fds:?}"
        );
        assert!(
            at(6).is_some_and(|l| l.contains(&format!("memfd:{f}"))),
            "module: {fds:?}"
        );
        assert!(
            at(9).is_some_and(|l| l.starts_with("socket:")),
            "control socket: {fds:?}"
        );
        // Not the zygote's socket, nor its fd-number reservations (/dev/null): every other
        // open fd is one the worker made itself (its eventfd doorbell, a clone of its socket).
        let all = all_fds(workers[0]);
        let own_sockets = [at(4).unwrap(), at(9).unwrap()];
        for (fd, link) in &all {
            assert!(
                link != "/dev/null",
                "fd {fd}: a zygote fd reservation left open: {all:?}"
            );
            assert!(
                !link.starts_with("socket:") || own_sockets.contains(&link.as_str()),
                "fd {fd}: a socket that is not the worker's: {all:?}"
            );
        }
    }
    let page = spindle.get("/metrics").await.text();
    assert!(
        page.contains(r#"spindle_process_resident_memory_bytes{chain="hello",function="frame",process="zygote"}"#),
        "zygote memory exported"
    );
    assert!(page.contains(
        r#"spindle_instance_start_seconds_count{chain="hello",function="frame",mode="fork"} 1"#
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_children_run_spindle_on_fork_and_draw_their_own_numbers() {
    let spindle = Spindle::start("zygote-rand", FORKRAND).await;
    let mut randoms = std::collections::HashSet::new();
    for _ in 0..8 {
        let r = spindle.post("/rand", "").await;
        let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        // Reseeded once in the child (the zygote's own instance never forked itself).
        assert_eq!(v["forks"], 1, "{v}");
        randoms.insert(v["random"].as_u64().unwrap());
    }
    assert_eq!(randoms.len(), 8, "every answer draws a fresh number");
    assert_eq!(
        spindle.metric(&starts("forkrand", "rand", "fork")).await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_forked_worker_is_replaced_by_a_fork_under_load() {
    let spindle = Arc::new(Spindle::start("zygote-kill", FORKRAND).await);
    let before = spindle.worker_pids("upper");
    assert_eq!(before.len(), 1);
    let load = {
        let s = Arc::clone(&spindle);
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..300 {
                let r = s.post("/up", format!("load {i}")).await;
                if r.status == 200 {
                    assert_eq!(r.text(), format!("LOAD {i}"));
                }
                codes.push(r.status);
            }
            codes
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = kill(Pid::from_raw(before[0]), Signal::SIGKILL);
    let codes = tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .expect("the load finishes: nothing hangs")
        .unwrap();
    assert!(
        codes.iter().all(|c| [200, 502, 503].contains(c)),
        "statuses during the crash: {codes:?}"
    );
    eventually("a new forked worker", async || {
        let now = spindle.worker_pids("upper");
        now.len() == 1 && now[0] != before[0]
    })
    .await;
    assert_eq!(spindle.post("/up", "back").await.text(), "BACK");
    assert_eq!(
        spindle.metric(&starts("upper", "up", "fork")).await,
        Some(2.0)
    );
    assert_eq!(spindle.metric(&starts("upper", "up", "exec")).await, None);
    assert_eq!(
        spindle
            .metric(r#"spindle_instance_restarts_total{chain="up",function="upper"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_outlive_a_killed_zygote_and_a_new_one_comes_back() {
    let spindle = Spindle::start("zygote-die", FORKRAND).await;
    let zygote = spindle.zygote_pids("upper");
    assert_eq!(zygote.len(), 1);
    let worker = spindle.worker_pids("upper");
    let _ = kill(Pid::from_raw(zygote[0]), Signal::SIGKILL);
    // The forked worker is the gateway's child, not the zygote's: it keeps serving.
    for i in 0..20 {
        assert_eq!(
            spindle.post("/up", format!("x{i}")).await.text(),
            format!("X{i}")
        );
    }
    assert_eq!(spindle.worker_pids("upper"), worker, "same worker process");
    eventually("a new zygote", async || {
        let now = spindle.zygote_pids("upper");
        now.len() == 1 && now != zygote
    })
    .await;
    assert_eq!(
        spindle
            .metric(r#"spindle_zygote_restarts_total{chain="up",function="upper"}"#)
            .await,
        Some(1.0)
    );
    // The new zygote forks the next restart.
    eventually("the new zygote is up", async || {
        spindle
            .metric(r#"spindle_process_cpu_seconds_total{chain="up",function="upper",process="zygote"}"#)
            .await
            .is_some()
    })
    .await;
    let _ = kill(Pid::from_raw(worker[0]), Signal::SIGKILL);
    eventually("the worker restarted", async || {
        spindle.metric(&starts("upper", "up", "fork")).await == Some(2.0)
    })
    .await;
    assert_eq!(spindle.post("/up", "again").await.text(), "AGAIN");
    // The other function's zygote was not touched.
    assert_eq!(
        spindle
            .metric(r#"spindle_zygote_restarts_total{chain="rand",function="forkrand"}"#)
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_exec_runs_no_zygote_and_restarts_by_exec() {
    let yaml = FORKRAND.replace(
        "module: {wasm:uppercase}",
        "module: {wasm:uppercase}\n    start: exec",
    );
    let spindle = Spindle::start("zygote-exec", &yaml).await;
    assert!(
        spindle.zygote_pids("upper").is_empty(),
        "no zygote for start: exec"
    );
    assert_eq!(spindle.zygote_pids("forkrand").len(), 1);
    // A forked worker's hand-off numbers (3 to 8) hold what an exec'd worker's do. (Above,
    // an exec'd worker's own first open fds land on free numbers.)
    let kinds = |pid: i32| -> Vec<(i32, &'static str)> {
        fixed_fds(pid)
            .into_iter()
            .filter(|(fd, _)| *fd <= 8)
            .map(|(fd, link)| {
                (
                    fd,
                    if link.starts_with("socket:") {
                        "socket"
                    } else if link.contains("memfd:") {
                        "memfd"
                    } else {
                        "other"
                    },
                )
            })
            .collect()
    };
    let exec = kinds(spindle.worker_pids("upper")[0]);
    for forked in spindle.worker_pids("forkrand") {
        assert_eq!(
            kinds(forked),
            exec,
            "fd layout of a forked worker vs an exec'd one"
        );
    }
    assert_eq!(spindle.post("/up", "exec").await.text(), "EXEC");
    assert_eq!(
        spindle.metric(&starts("upper", "up", "exec")).await,
        Some(1.0)
    );
    let worker = spindle.worker_pids("upper");
    let _ = kill(Pid::from_raw(worker[0]), Signal::SIGKILL);
    eventually("the worker restarted by exec", async || {
        spindle.metric(&starts("upper", "up", "exec")).await == Some(2.0)
    })
    .await;
    assert_eq!(spindle.post("/up", "again").await.text(), "AGAIN");
    assert_eq!(spindle.metric(&starts("upper", "up", "fork")).await, None);
}

/// (pid, state letter) of every child of `parent`.
fn children(parent: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let mut fields = stat[stat.rfind(')').map_or(0, |i| i + 2)..].split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse().ok()) == Some(parent) {
            out.push((pid, state));
        }
    }
    out
}

/// Other children of `gateway` than `owner` holding `link` (a `socket:[inode]`) open.
fn other_holders(gateway: i32, owner: i32, link: &str) -> Vec<i32> {
    children(gateway)
        .into_iter()
        .filter(|&(pid, _)| pid != owner && all_fds(pid).iter().any(|(_, l)| l == link))
        .map(|(pid, _)| pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_whose_reply_is_late_gives_up_its_sockets_and_the_late_child_is_reaped() {
    let spindle = Spindle::start_with(
        "zygote-late",
        FORKRAND,
        &["--zygote-reply-timeout", "300ms"],
    )
    .await;
    let gateway = spindle.pid();
    let zygote = spindle.zygote_pids("upper");
    assert_eq!(zygote.len(), 1);
    let before = spindle.worker_pids("upper");
    assert_eq!(before.len(), 1);
    // A stopped zygote takes the next spawn request into its socket and answers nothing.
    kill(Pid::from_raw(zygote[0]), Signal::SIGSTOP).unwrap();
    let _ = kill(Pid::from_raw(before[0]), Signal::SIGKILL);
    eventually("the instance restarted by exec", async || {
        spindle.metric(&starts("upper", "up", "exec")).await == Some(1.0)
    })
    .await;
    assert!(
        spindle.log().contains("gave up this start's sockets"),
        "the timed-out fork gave its sockets up"
    );
    let exec = spindle.worker_pids("upper");
    assert_eq!(exec.len(), 1, "one worker: {exec:?}");
    assert_ne!(exec, before);
    let socket = fixed_fds(exec[0])
        .into_iter()
        .find(|(fd, _)| *fd == 4)
        .map(|(_, l)| l)
        .expect("the exec'd worker's socket at fd 4");
    assert_eq!(spindle.post("/up", "exec'd").await.text(), "EXEC'D");

    // Now the zygote reads the old request and forks a child with that request's fds.
    kill(Pid::from_raw(zygote[0]), Signal::SIGCONT).unwrap();
    for _ in 0..100 {
        let others = other_holders(gateway, exec[0], &socket);
        assert!(
            others.is_empty(),
            "processes {others:?} share the exec'd worker's socket {socket}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually("the late reply was handled", async || {
        spindle.log().contains("the zygote answered late")
    })
    .await;
    eventually(
        "the late child is reaped and the zygote came back",
        async || {
            let zombies: Vec<_> = children(gateway)
                .into_iter()
                .filter(|&(_, state)| state == 'Z')
                .collect();
            let now = spindle.zygote_pids("upper");
            zombies.is_empty() && now.len() == 1 && now != zygote
        },
    )
    .await;
    assert_eq!(spindle.worker_pids("upper"), exec, "only the exec'd worker");
    assert!(other_holders(gateway, exec[0], &socket).is_empty());
    for i in 0..10 {
        assert_eq!(
            spindle.post("/up", format!("after {i}")).await.text(),
            format!("AFTER {i}")
        );
    }
    assert_eq!(
        spindle.metric(&starts("upper", "up", "fork")).await,
        Some(1.0),
        "the late child never counted as a start"
    );
}

/// An echo reactor holding an externref table: it runs, but its warm instance cannot be
/// captured (externrefs are host state), so its zygote cannot start.
const UNCAPTURABLE: &str = r#"(module
  (import "spindle" "output" (func $out (param i32 i32)))
  (memory (export "memory") 1)
  (table 1 externref)
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param i32 i32) (result i32)
    (call $out (local.get 0) (local.get 1)) (i32.const 0)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_whose_zygote_cannot_start_falls_back_to_exec() {
    let dir = common::temp_dir("zygote-wat");
    let wat = dir.join("echo.wat");
    std::fs::write(&wat, UNCAPTURABLE).unwrap();
    let yaml = format!(
        "functions:\n  - {{ name: echo, module: \"{}\" }}\n\
         chains:\n  - {{ name: e, route: /e, steps: [echo] }}\n",
        wat.display()
    );
    let spindle = Spindle::start("zygote-fallback", &yaml).await;
    assert_eq!(
        spindle.post("/e", "still served").await.text(),
        "still served"
    );
    assert_eq!(
        spindle.metric(&starts("echo", "e", "exec")).await,
        Some(1.0)
    );
    assert_eq!(spindle.metric(&starts("echo", "e", "fork")).await, None);
    assert!(spindle.zygote_pids("echo").is_empty());
    // The zygote's own error line lands in the shared log as it exits.
    eventually("the reason is logged", async || {
        let log = spindle.log();
        log.contains("zygote failed to start") && log.contains("externref")
    })
    .await;
}
