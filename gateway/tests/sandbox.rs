//! Workers and zygotes run confined (docs/security.md): checked from outside on the real
//! processes of a running gateway, and from inside with `spindle sandbox-probe`, which tries
//! what an escaped guest would under each layer alone and under all of them.

mod common;

use std::collections::BTreeMap;

use common::Spindle;

const CONFIG: &str = "functions:\n\
  - { name: upper, module: \"{wasm:uppercase}\" }\n\
  - { name: rev, module: \"{wasm:reverse}\", start: exec }\n\
chains:\n\
  - { name: c, route: /c, steps: [upper, rev] }\n";

fn status_fields(pid: i32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Everything observable from outside that says `pid` is confined as uid `uid`.
fn assert_confined(pid: i32, uid: u32, what: &str) {
    let status = status_fields(pid);
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(status["Uid"], ids, "{what}: uids");
    assert_eq!(status["Gid"], ids, "{what}: gids");
    assert_eq!(status["Groups"], "", "{what}: supplementary groups");
    assert_eq!(status["CapEff"], "0000000000000000", "{what}: capabilities");
    assert_eq!(status["CapPrm"], "0000000000000000", "{what}: capabilities");
    assert_eq!(status["NoNewPrivs"], "1", "{what}");
    assert_eq!(status["Seccomp"], "2", "{what}: seccomp filter mode");
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(root, ["proc"], "{what}: its root");
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    for kind in ["net", "mnt"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{what}: {kind} namespace"
        );
    }
    // Every fd is stdio or one of the hand-off's fixed numbers (proto::worker); this config
    // has no `files:`, so none of the preopens' numbers above them.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd: i32 = fd.unwrap().file_name().to_str().unwrap().parse().unwrap();
        assert!(
            fd <= proto::worker::MOUNT_NS_FD,
            "{what}: unexpected fd {fd}"
        );
    }
}

#[tokio::test]
async fn workers_and_zygotes_run_confined_and_still_serve() {
    if !testkit::require_root(
        "workers_and_zygotes_run_confined_and_still_serve",
        "confining workers: namespaces, setuid",
    ) {
        return;
    }
    let mut spindle = Spindle::start("sandbox-confined", CONFIG).await;
    let reply = spindle.post("/c", b"abc").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    for layer in ["namespaces", "credentials", "seccomp"] {
        let series = format!(r#"spindle_sandbox_layer{{layer="{layer}"}}"#);
        assert_eq!(spindle.metric(&series).await, Some(1.0), "{series}");
    }
    // upper is function 0 (uid 200000, forked from its zygote), rev function 1 (exec'd).
    let zygotes = spindle.zygote_pids("upper");
    assert_eq!(zygotes.len(), 1);
    assert_confined(zygotes[0], 200_000, "upper's zygote");
    for pid in spindle.worker_pids("upper") {
        assert_confined(pid, 200_000, "a forked worker of upper");
        // One stacked on the zygote's pair: a child cannot fork as its zygote may.
        assert_eq!(status_fields(pid)["Seccomp_filters"], "3");
    }
    let rev = spindle.worker_pids("rev");
    assert!(!rev.is_empty());
    for pid in rev {
        assert_confined(pid, 200_001, "an exec'd worker of rev");
    }
    spindle.stop();
}

#[tokio::test]
async fn with_the_sandbox_off_workers_keep_the_gateways_privileges() {
    if !testkit::require_root(
        "with_the_sandbox_off_workers_keep_the_gateways_privileges",
        "confining workers: namespaces, setuid",
    ) {
        return;
    }
    let yaml = format!("sandbox: {{ enabled: false }}\n{CONFIG}");
    let mut spindle = Spindle::start("sandbox-off", &yaml).await;
    assert_eq!(spindle.post("/c", b"abc").await.status, 200);
    for layer in ["namespaces", "credentials", "seccomp"] {
        let series = format!(r#"spindle_sandbox_layer{{layer="{layer}"}}"#);
        assert_eq!(spindle.metric(&series).await, Some(0.0), "{series}");
    }
    for pid in spindle.worker_pids("rev") {
        let status = status_fields(pid);
        assert!(status["Uid"].starts_with("0\t"), "{status:?}");
        assert_eq!(status["Seccomp"], "0");
    }
    spindle.stop();
}

/// `spindle sandbox-probe --layers LAYERS`'s outcome for each attempt.
fn probe(layers: &str) -> BTreeMap<String, String> {
    common::build_examples();
    let dir = common::temp_dir("sandbox-probe");
    let config = dir.join("spindle.yaml");
    std::fs::write(
        &config,
        CONFIG
            .replace("{wasm:uppercase}", &common::wasm("uppercase"))
            .replace("{wasm:reverse}", &common::wasm("reverse")),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("sandbox-probe")
        .arg(&config)
        .args(["--function", "rev", "--layers", layers])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (attempt, outcome) = l.split_once(": ").unwrap();
            (attempt.to_string(), outcome.to_string())
        })
        .collect()
}

const KILLED: &str = "killed (SIGSYS: seccomp)";

#[test]
fn each_layer_stops_what_it_should_and_together_they_stop_every_escape() {
    if !testkit::require_root(
        "each_layer_stops_what_it_should_and_together_they_stop_every_escape",
        "confining workers: namespaces, setuid",
    ) {
        return;
    }
    let expected: &[(&str, [&str; 4])] = &[
        // attempt: [namespaces alone, credentials alone, seccomp alone, all]
        (
            "open /etc/shadow",
            [
                "denied (ENOENT)",
                "denied (EACCES)",
                "allowed",
                "denied (ENOENT)",
            ],
        ),
        (
            "read the gateway's /proc/PID/environ",
            ["allowed", "denied (EACCES)", "allowed", "denied (ENOENT)"],
        ),
        (
            "create a file in /",
            [
                "denied (EROFS)",
                "denied (EACCES)",
                "allowed",
                "denied (EROFS)",
            ],
        ),
        (
            "socket(AF_INET) + connect to the host",
            ["denied (ENETUNREACH)", "allowed", KILLED, KILLED],
        ),
        (
            "ptrace the gateway",
            ["allowed", "denied (EPERM)", KILLED, KILLED],
        ),
        (
            "signal the gateway (kill 0)",
            ["allowed", "denied (EPERM)", KILLED, KILLED],
        ),
        ("setuid(0)", ["allowed", "denied (EPERM)", KILLED, KILLED]),
        (
            "unshare a mount namespace",
            ["allowed", "denied (EPERM)", KILLED, KILLED],
        ),
        ("fork", ["allowed", "allowed", KILLED, KILLED]),
        (
            "exec /bin/true",
            ["denied (ENOENT)", "allowed", KILLED, KILLED],
        ),
    ];
    for (column, layers) in ["namespaces", "credentials", "seccomp", "all"]
        .iter()
        .enumerate()
    {
        let got = probe(layers);
        let want: BTreeMap<String, String> = expected
            .iter()
            .map(|(attempt, outcomes)| (attempt.to_string(), outcomes[column].to_string()))
            .collect();
        assert_eq!(got, want, "--layers {layers}");
    }
}

/// Root without the capabilities the sandbox needs (a container's default set, for one)
/// refuses to start and names them, instead of failing later or hanging on a worker it
/// cannot stop (without CAP_KILL, root cannot signal a worker running as another uid).
#[test]
fn root_without_the_sandboxs_capabilities_is_refused_with_their_names() {
    if !testkit::require_root(
        "root_without_the_sandboxs_capabilities_is_refused_with_their_names",
        "dropping capabilities with setpriv",
    ) {
        return;
    }
    common::build_examples();
    let dir = common::temp_dir("sandbox-caps");
    let config = dir.join("spindle.yaml");
    std::fs::write(
        &config,
        format!(
            "functions:\n  - {{ name: a, module: {} }}\nchains:\n  - {{ name: c, route: /c, steps: [a] }}\n",
            common::wasm("uppercase")
        ),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--inh-caps=-kill,-setuid",
            "--bounding-set=-kill,-setuid",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_spindle"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .arg(&config)
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started:\n{stderr}");
    assert!(
        stderr.contains("running as root without CAP_KILL, CAP_SETUID: the sandbox needs them"),
        "{stderr}"
    );
}
