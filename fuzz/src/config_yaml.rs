//! Structured YAML for the config loader: documents shaped like a Spindle config (the known
//! sections and keys, values from pools of names, numbers at and past the limits, units,
//! keywords), with random nodes, unknown and repeated keys mixed in, written in block or flow
//! style. Random bytes almost never get past the YAML parser into the checks; these do.
//! Each document goes through the same checks as `config_bytes.rs`.

use arbitrary::{Result, Unstructured};

// The sections' keys come from the checker itself (`crate::config` is chain-runtime's
// config module, as in config_bytes.rs), so keys are generated as soon as they land.
use crate::config::keys::{
    ARENA, CHAIN, FAST_PATH, FUNCTION, GUARD, HTTP, INGRESS, INSTANCES, LARGE, LOCAL_REDIRECT,
    NODE, PEER, SANDBOX, TOP,
};

const NAMES: &[&str] = &["a", "b", "c", "hello", "x-1", "A", "a b", "", "f_2"];
const SCALARS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "16",
    "32",
    "33",
    "64",
    "255",
    "256",
    "1000",
    "1_000",
    "4096",
    "65536",
    "65537",
    "1000000",
    "86400000",
    "86400001",
    "2147483648",
    "4000000000",
    "4000000001",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "1e3",
    "0x10",
    "0o7",
    "1.5",
    "_1",
    "1__0",
    "64KiB",
    "64 KiB",
    "1MiB",
    "64MiB",
    "65MiB",
    "4GiB",
    "5GiB",
    "3B",
    "1.5MiB",
    "64kib",
    "0KiB",
    "none",
    "None",
    "auto",
    "sockmap",
    "userspace",
    "reactor",
    "command",
    "fork",
    "exec",
    "reuse",
    "fresh_per_request",
    "lo",
    "eth0",
    "tc",
    "xdp",
    "strict",
    "rate_only",
    "cpu",
    "source_hash",
    "incoming_cpu",
    "/run/netns/n",
    "true",
    "false",
    "null",
    "~",
    "127.0.0.1:8080",
    "[::1]:0",
    "localhost:80",
    "0.0.0.0:99999",
    "80%",
    "0.5",
    "101%",
    "-5%",
    "/",
    "/a",
    "/b",
    "/healthz",
    "/metrics",
    "a/b",
    "text/plain",
    "/abs/m.wasm",
    "missing.wasm",
    "a.wasm",
    "b.wasm",
    "c.wasm",
    "key",
    "\u{e9}t\u{e9}",
    "!!str 5",
    "&anchor 1",
    "*anchor",
];

/// Guest paths of `files:`, in and out of normal form.
const GUEST_PATHS: &[&str] = &[
    "/", "/data", "/a/b", "data", "/a/../b", "/a//b", "/x/", "/.",
];
/// Host directories of `files:`: the system's, relative ones that may not exist, a file.
const HOST_DIRS: &[&str] = &["/", "/tmp", ".", "..", "data", "missing", "/etc/hostname"];

/// A YAML node to write.
enum Node {
    Scalar(String, bool),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

fn pick(u: &mut Unstructured<'_>, pool: &[&str]) -> Result<String> {
    Ok(if u.ratio(1, 16)? {
        // Now and then something no pool holds.
        let n = u.int_in_range(0..=6)?;
        (0..n)
            .map(|_| Ok(char::from(u.int_in_range(b' '..=b'~')?)))
            .collect::<Result<String>>()?
    } else {
        u.choose(pool)?.to_string()
    })
}

fn scalar(u: &mut Unstructured<'_>, pool: &[&str]) -> Result<Node> {
    Ok(Node::Scalar(pick(u, pool)?, u.ratio(1, 6)?))
}

/// Any node at all, `depth` levels deep at most.
fn random(u: &mut Unstructured<'_>, depth: u32) -> Result<Node> {
    if depth == 0 {
        return scalar(u, SCALARS);
    }
    Ok(match u.int_in_range(0..=2)? {
        0 => scalar(u, SCALARS)?,
        1 => Node::Seq(list(u, |u| random(u, depth - 1))?),
        _ => Node::Map(list(u, |u| Ok((pick(u, TOP)?, random(u, depth - 1)?)))?),
    })
}

fn list<T>(
    u: &mut Unstructured<'_>,
    mut item: impl FnMut(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=4)?;
    (0..n).map(|_| item(u)).collect()
}

/// A mapping with keys from `keys` (sometimes repeated, sometimes unknown), each valued as
/// its key suggests in section `section`.
fn map(u: &mut Unstructured<'_>, section: &str, keys: &[&str]) -> Result<Node> {
    let n = u.int_in_range(0..=keys.len() + 1)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let key = if u.ratio(1, 20)? {
            pick(u, SCALARS)?
        } else {
            u.choose(keys)?.to_string()
        };
        let value = value(u, section, &key)?;
        entries.push((key, value));
    }
    Ok(Node::Map(entries))
}

fn value(u: &mut Unstructured<'_>, section: &str, key: &str) -> Result<Node> {
    if u.ratio(1, 12)? {
        return random(u, 2);
    }
    Ok(match (section, key) {
        ("top", "functions") => Node::Seq(list(u, |u| map(u, "function", FUNCTION))?),
        ("top", "chains") => Node::Seq(list(u, |u| map(u, "chain", CHAIN))?),
        ("top", "node") => map(u, "node", NODE)?,
        ("top", "peers") => Node::Seq(list(u, |u| map(u, "peer", PEER))?),
        ("top", "http") => map(u, "http", HTTP)?,
        ("top", "sandbox") => map(u, "sandbox", SANDBOX)?,
        ("top", "ingress") => map(u, "ingress", INGRESS)?,
        ("ingress", "guard") => map(u, "guard", GUARD)?,
        ("ingress", "fast_path") => map(u, "fast_path", FAST_PATH)?,
        ("ingress", "local_redirect") if u.arbitrary()? => {
            map(u, "local_redirect", LOCAL_REDIRECT)?
        }
        ("guard", "allow_tcp" | "allow_udp") | ("fast_path", "interfaces") => {
            Node::Seq(list(u, |u| scalar(u, SCALARS))?)
        }
        ("function", "instances") if u.arbitrary()? => map(u, "instances", INSTANCES)?,
        ("function", "env") => Node::Map(list(u, |u| {
            Ok((pick(u, &["A", "B", "PATH", "1"])?, scalar(u, SCALARS)?))
        })?),
        ("function", "args") => Node::Seq(list(u, |u| scalar(u, SCALARS))?),
        ("function", "files") => Node::Map(list(u, |u| {
            Ok((pick(u, GUEST_PATHS)?, scalar(u, HOST_DIRS)?))
        })?),
        ("chain", "steps" | "functions") => Node::Seq(list(u, |u| scalar(u, NAMES))?),
        ("chain", "arena") => map(u, "arena", ARENA)?,
        ("arena", "large") if u.arbitrary()? => map(u, "large", LARGE)?,
        (_, "name" | "entry") => scalar(u, NAMES)?,
        _ => scalar(u, SCALARS)?,
    })
}

fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn flow(node: &Node, out: &mut String) {
    match node {
        Node::Scalar(s, quoted) => out.push_str(&if *quoted { quote(s) } else { s.clone() }),
        Node::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                flow(item, out);
            }
            out.push(']');
        }
        Node::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(k);
                out.push_str(": ");
                flow(v, out);
            }
            out.push('}');
        }
    }
}

/// Block style, except nodes the input asks to write in flow style.
fn block(u: &mut Unstructured<'_>, node: &Node, indent: usize, out: &mut String) -> Result<()> {
    let pad = " ".repeat(indent);
    match node {
        Node::Seq(items) if !items.is_empty() && !u.ratio(1, 5)? => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                match item {
                    Node::Scalar(..) => {
                        flow(item, out);
                        out.push('\n');
                    }
                    _ => {
                        out.push('\n');
                        block(u, item, indent + 2, out)?;
                    }
                }
            }
        }
        Node::Map(entries) if !entries.is_empty() && !u.ratio(1, 5)? => {
            for (k, v) in entries {
                out.push_str(&pad);
                out.push_str(k);
                out.push(':');
                match v {
                    Node::Scalar(..) => {
                        out.push(' ');
                        flow(v, out);
                        out.push('\n');
                    }
                    _ => {
                        out.push('\n');
                        block(u, v, indent + 2, out)?;
                    }
                }
            }
        }
        _ => {
            out.push_str(&pad);
            flow(node, out);
            out.push('\n');
        }
    }
    Ok(())
}

/// The document `data` describes, as text.
pub fn document(data: &[u8]) -> String {
    let mut u = Unstructured::new(data);
    let mut out = String::new();
    let doc = if u.ratio(1, 16).unwrap_or(false) {
        random(&mut u, 3)
    } else {
        map(&mut u, "top", TOP)
    };
    // Out of input: whatever was built so far is still a document.
    if let Ok(doc) = doc {
        let _ = block(&mut u, &doc, 0, &mut out);
    }
    out
}

pub fn run(data: &[u8]) {
    crate::config_bytes::check(&document(data));
}
