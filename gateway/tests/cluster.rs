//! scripts/cluster.sh, the README's many-nodes-on-one-machine demo, run for real: two nodes
//! in namespaces of their own on a bridge, finding each other through the script's name
//! server, answering from this machine, and gone without a trace after `down`. Root in CI.

mod common;

use std::io::{Read, Write};
use std::process::Command;

fn cluster(tag: &str, state: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(common::repo_root().join("scripts/cluster.sh"))
        .args(args)
        .env("SPINDLE", env!("CARGO_BIN_EXE_spindle"))
        .env("CLUSTER_STATE", state)
        .env("CLUSTER_NET", "10.212.0")
        .env("CLUSTER_TAG", tag)
        .output()
        .expect("running scripts/cluster.sh")
}

fn get(addr: &str, path: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_local_cluster_finds_its_peers_by_dns_and_leaves_nothing_behind() {
    if !testkit::require_root(
        "a_local_cluster_finds_its_peers_by_dns_and_leaves_nothing_behind",
        "network namespaces and a bridge",
    ) {
        return;
    }
    let tag = format!("t{}", std::process::id() % 100_000);
    let state = common::temp_dir("cluster-script");
    let up = cluster(&tag, &state, &["up", "2"]);
    let said =
        String::from_utf8_lossy(&up.stdout).into_owned() + &String::from_utf8_lossy(&up.stderr);
    let result = std::panic::catch_unwind(|| {
        assert!(up.status.success(), "cluster.sh up failed:\n{said}");
        assert!(said.contains("2 node(s) up"), "{said}");
        // Each node lists the other as its peer, found by DNS.
        assert!(said.contains("nodes-0=10.212.0.2:8080"), "{said}");
        assert!(said.contains("nodes-0=10.212.0.1:8080"), "{said}");
        let answer = get("10.212.0.1:8080", "/hello", "hello spindle");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with(r#"{"result":"ELDNIPS OLLEH","bytes":13}"#),
            "{answer}"
        );
    });
    let down = cluster(&tag, &state, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    let namespaces = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!namespaces.contains(&format!("{tag}-")), "{namespaces}");
    let bridge = Command::new("ip")
        .args(["link", "show", &format!("{tag}-br0")])
        .output()
        .unwrap();
    assert!(!bridge.status.success(), "the bridge is still there");
    assert!(!std::path::Path::new(&format!("/etc/netns/{tag}-1")).exists());
}
