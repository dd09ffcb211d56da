//! The `node:` and `peers:` sections: this node's resource budget, where its peers' gateways
//! listen, and how the gateways authenticate each other (docs/autoscaling.md "Peers").
//!
//! ```yaml
//! node:
//!   name: node-a               # [a-z0-9_-]+; names this node to its peers (default: the
//!                              #   listen address)
//!   cpu_budget: 80%            # 0%..=100%, default 80%: over it, scale-out goes to peers
//!   memory_budget: 85%         # 0%..=100%, default 85%
//!   peer_listen: 10.0.0.1:7070 # where this node's peer-control channel listens (0.0.0.0:P:
//!                              #   every address; optional:
//!                              #   without it, this node asks peers but never serves them)
//!   cluster_key: cluster.key   # file with the shared key (>= 32 bytes), relative to this file;
//!                              #   required with `peers` or `peer_listen`
//! peers:
//!   - name: node-b             # [a-z0-9_-]+, unique
//!     http: 10.0.0.2:8080      # the peer gateway's HTTP address (forwarded requests)
//!     control: 10.0.0.2:7070   # its peer-control address (its `peer_listen`)
//!   - name: nodes              # or peers found by DNS (a Kubernetes headless Service):
//!     dns: spindle-peers.spindle.svc.cluster.local   # every address the name resolves
//!                              #   to, but this node's own, is a peer: slots nodes-0,
//!                              #   nodes-1, … (names in metrics and headers)
//!     http_port: 8080          # their gateways' HTTP port
//!     control_port: 7070       # their peer-control port
//!     refresh_ms: 30000        # re-resolved this often, 1000..=3600000, default 30000
//!     max_peers: 8             # slots, 1..=64, default 8: addresses past them wait
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::Checker;
use super::yaml::{describe, pos, untag};

pub const NODE_KEYS: &[&str] = &[
    "name",
    "cpu_budget",
    "memory_budget",
    "peer_listen",
    "cluster_key",
];
pub const PEER_KEYS: &[&str] = &[
    "name",
    "http",
    "control",
    "dns",
    "http_port",
    "control_port",
    "refresh_ms",
    "max_peers",
];
const DEFAULT_REFRESH_MS: i64 = 30_000;
const MAX_REFRESH_MS: i64 = 3_600_000;
const DEFAULT_MAX_PEERS: i64 = 8;
/// Peers of one DNS name at most: every one gets a control link and its share of the work.
pub const MAX_DNS_PEERS: i64 = 64;

/// Budgets when the file names none: room for the gateway, its workers' bursts and the
/// kernel before the node is called full.
pub const DEFAULT_CPU_BUDGET: f64 = 0.80;
pub const DEFAULT_MEMORY_BUDGET: f64 = 0.85;

/// This node among its peers (`node:`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub name: Option<String>,
    /// Fraction of the node's CPU time (0.0..=1.0) above which it is over budget.
    pub cpu_budget: f64,
    /// Fraction of the node's memory in use (0.0..=1.0) above which it is over budget.
    pub memory_budget: f64,
    pub peer_listen: Option<SocketAddr>,
    /// Absolute, or joined onto the configuration file's directory.
    pub cluster_key: Option<PathBuf>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            name: None,
            cpu_budget: DEFAULT_CPU_BUDGET,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            peer_listen: None,
            cluster_key: None,
        }
    }
}

// The budgets are parsed from decimal percentages and never NaN.
impl Eq for NodeSpec {}

/// One peer node's gateway (`peers:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// Its HTTP address: requests forwarded to it go here.
    pub http: SocketAddr,
    /// Its peer-control channel: scale requests go here.
    pub control: SocketAddr,
}

/// Peers found by resolving a DNS name (`peers:` entries with `dns:`), again every
/// `refresh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPeerSpec {
    /// Slot `i` is peer `{name}-{i}`.
    pub name: String,
    pub dns: String,
    pub http_port: u16,
    pub control_port: u16,
    pub refresh: std::time::Duration,
    pub max_peers: u32,
}

/// `N%` with N a decimal number in 0..=100, as a fraction.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let digits = text
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| format!("`{text}` is not a percentage such as 80%"))?;
    match digits.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
        Ok(_) => Err(format!("`{text}` is out of range: expected 0%..=100%")),
        Err(_) => Err(format!("`{text}` is not a percentage such as 80%")),
    }
}

impl Checker<'_> {
    pub(super) fn node(&mut self, node: &MarkedYaml<'_>) -> NodeSpec {
        let mut spec = NodeSpec::default();
        let Some(fields) = self.fields(node, "`node`", Some(NODE_KEYS)) else {
            return spec;
        };
        if let Some(n) = fields.get("name")
            && let Some(name) = self.string(n, "name")
        {
            if self.plain_name(name).is_ok() {
                spec.name = Some(name.to_owned());
            } else {
                self.error(pos(n), format!("invalid node name `{name}`: {NAME_RULE}"));
            }
        }
        for (key, slot) in [
            ("cpu_budget", &mut spec.cpu_budget),
            ("memory_budget", &mut spec.memory_budget),
        ] {
            if let Some(n) = fields.get(key)
                && let Some(p) = self.percent(n, key)
            {
                *slot = p;
            }
        }
        // Where this node listens: 0.0.0.0 (every address) is fine, unlike a peer's address.
        spec.peer_listen = fields
            .get("peer_listen")
            .and_then(|n| self.listen_address(n, "peer_listen"));
        if let Some(n) = fields.get("cluster_key")
            && let Some(path) = self.string(n, "cluster_key")
        {
            if path.is_empty() {
                self.error(pos(n), "`cluster_key` must name a file");
            } else {
                let dir = self.source.parent().map(PathBuf::from).unwrap_or_default();
                spec.cluster_key = Some(dir.join(path));
            }
        }
        spec
    }

    pub(super) fn peers(&mut self, node: &MarkedYaml<'_>) -> (Vec<PeerSpec>, Vec<DnsPeerSpec>) {
        let Some(items) = self.list(node, "peers", "peer") else {
            return (Vec::new(), Vec::new());
        };
        let (mut names, mut addrs) = (HashMap::new(), HashMap::new());
        let (mut peers, mut by_dns) = (Vec::new(), Vec::new());
        for item in items {
            let Some(fields) = self.fields(item, "a peer", Some(PEER_KEYS)) else {
                continue;
            };
            let name = self.name_field(&fields, "peer", &mut names);
            if let Some(dns) = fields.get("dns") {
                for key in ["http", "control"] {
                    if let Some(f) = fields.field(key) {
                        self.error(
                            f.key_at,
                            format!(
                                "a peer with `dns` takes `http_port` and `control_port`, not `{key}`"
                            ),
                        );
                    }
                }
                let host = self.dns_name(dns);
                let port = |this: &mut Self, key: &str| {
                    this.required(&fields, key, "a peer with `dns`")
                        .and_then(|n| this.int_in(n, &format!("peers.{key}"), 1, 65_535))
                };
                let http_port = port(self, "http_port");
                let control_port = port(self, "control_port");
                let refresh = fields
                    .get("refresh_ms")
                    .and_then(|n| self.int_in(n, "peers.refresh_ms", 1000, MAX_REFRESH_MS))
                    .unwrap_or(DEFAULT_REFRESH_MS);
                let max_peers = fields
                    .get("max_peers")
                    .and_then(|n| self.int_in(n, "peers.max_peers", 1, MAX_DNS_PEERS))
                    .unwrap_or(DEFAULT_MAX_PEERS);
                if let (Some(dns), Some(http_port), Some(control_port)) =
                    (host, http_port, control_port)
                {
                    by_dns.push(DnsPeerSpec {
                        name,
                        dns,
                        http_port: http_port as u16,
                        control_port: control_port as u16,
                        refresh: std::time::Duration::from_millis(refresh as u64),
                        max_peers: max_peers as u32,
                    });
                }
                continue;
            }
            for key in ["http_port", "control_port", "refresh_ms", "max_peers"] {
                if let Some(f) = fields.field(key) {
                    self.error(
                        f.key_at,
                        format!("`{key}` goes with `dns`; this peer has none"),
                    );
                }
            }
            let http = self
                .required(&fields, "http", "a peer")
                .and_then(|n| self.address(n, "http").map(|a| (a, pos(n))));
            let control = self
                .required(&fields, "control", "a peer")
                .and_then(|n| self.address(n, "control"));
            if let Some((http, at)) = http {
                self.unique(&mut addrs, &http.to_string(), at, |first| {
                    format!("peer http address {http} is listed twice (first at line {first})")
                });
            }
            if let (Some((http, _)), Some(control)) = (http, control) {
                peers.push(PeerSpec {
                    name,
                    http,
                    control,
                });
            }
        }
        (peers, by_dns)
    }

    /// A host name to resolve: letters, digits, `-` and `.`, labels of 1..=63, at most 253.
    fn dns_name(&mut self, node: &MarkedYaml<'_>) -> Option<String> {
        let name = self.string(node, "peers.dns")?;
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        let ok = !trimmed.is_empty()
            && trimmed.len() <= 253
            && trimmed.parse::<std::net::IpAddr>().is_err()
            && trimmed.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !ok {
            self.error(
                pos(node),
                format!(
                    "`peers.dns`: `{name}` is not a host name (letters, digits and `-` in \
                     dot-separated labels; give an IP address with `http` and `control` instead)"
                ),
            );
            return None;
        }
        Some(trimmed.to_ascii_lowercase())
    }

    /// The cross-section rule: peers talk only over the authenticated channel.
    pub(super) fn check_cluster(
        &mut self,
        node: &NodeSpec,
        peers: usize,
        node_at: Option<&MarkedYaml<'_>>,
        peers_at: Option<&MarkedYaml<'_>>,
    ) {
        if node.cluster_key.is_some() {
            return;
        }
        if let Some(at) = peers_at.filter(|_| peers > 0) {
            self.error(
                pos(at),
                "`peers` needs `node.cluster_key`: the gateways authenticate each other with it",
            );
        } else if let (Some(at), Some(_)) = (node_at, node.peer_listen) {
            self.error(
                pos(at),
                "`node.peer_listen` needs `node.cluster_key`: peers must authenticate",
            );
        }
    }

    fn plain_name(&self, name: &str) -> Result<(), ()> {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
        if ok { Ok(()) } else { Err(()) }
    }

    fn percent(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<f64> {
        let YamlData::Value(Scalar::String(text)) = &untag(node).data else {
            self.error(
                pos(node),
                format!(
                    "`{field}` must be a percentage such as 80%, found {}",
                    describe(node)
                ),
            );
            return None;
        };
        match parse_percent(text) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error(pos(node), format!("`{field}`: {e}"));
                None
            }
        }
    }

    /// Where this node listens: any address (0.0.0.0 too), but not port 0.
    fn listen_address(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<SocketAddr> {
        self.socket_address(node, field, true)
    }

    /// Where peers connect: a specific address and port.
    fn address(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<SocketAddr> {
        self.socket_address(node, field, false)
    }

    fn socket_address(
        &mut self,
        node: &MarkedYaml<'_>,
        field: &str,
        unspecified_ok: bool,
    ) -> Option<SocketAddr> {
        let hint = if unspecified_ok {
            "an IP address and port such as 0.0.0.0:7070"
        } else {
            "an IP address and port such as 10.0.0.2:8080"
        };
        let YamlData::Value(Scalar::String(text)) = &untag(node).data else {
            self.error(
                pos(node),
                format!("`{field}` must be {hint}, found {}", describe(node)),
            );
            return None;
        };
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 || (addr.ip().is_unspecified() && !unspecified_ok) => {
                let what = if unspecified_ok {
                    "peers connect to its port, so it must not be 0"
                } else {
                    "peers connect to it, so it must be a specific address and port"
                };
                self.error(pos(node), format!("`{field}` {addr}: {what}"));
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    pos(node),
                    format!(
                        "invalid `{field}` address `{text}`: expected {hint} (host names are not resolved)"
                    ),
                );
                None
            }
        }
    }
}

const NAME_RULE: &str = "use only lowercase letters, digits, `_` and `-`";

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigErrors};
    use super::*;

    fn parse(extra: &str) -> Result<Config, ConfigErrors> {
        let dir = std::env::temp_dir().join(format!("spindle-cluster-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let text = format!(
            "functions:\n  - {{ name: a, module: a.wasm }}\nchains:\n  - {{ name: c, route: /c, steps: [a] }}\n{extra}"
        );
        Config::parse(&text, &dir.join("spindle.yaml"))
    }

    fn errors(extra: &str) -> Vec<(usize, usize, String)> {
        parse(extra)
            .expect_err("expected errors")
            .0
            .into_iter()
            .map(|e| (e.line, e.col, e.message))
            .collect()
    }

    #[test]
    fn defaults_without_the_sections() {
        let c = parse("").unwrap();
        assert_eq!(c.node, NodeSpec::default());
        assert!(c.peers.is_empty());
        assert_eq!(c.node.cpu_budget, DEFAULT_CPU_BUDGET);
    }

    #[test]
    fn a_full_node_and_peer_list() {
        let c = parse(
            "node:\n  name: node-a\n  cpu_budget: 70%\n  memory_budget: 92.5%\n  peer_listen: 10.0.0.1:7070\n  cluster_key: k.key\n\
             peers:\n  - { name: node-b, http: 10.0.0.2:8080, control: 10.0.0.2:7070 }\n",
        )
        .unwrap();
        assert_eq!(c.node.name.as_deref(), Some("node-a"));
        assert!((c.node.cpu_budget - 0.70).abs() < 1e-9);
        assert!((c.node.memory_budget - 0.925).abs() < 1e-9);
        assert_eq!(c.node.peer_listen, Some("10.0.0.1:7070".parse().unwrap()));
        assert!(c.node.cluster_key.unwrap().ends_with("k.key"));
        assert_eq!(
            c.peers,
            vec![PeerSpec {
                name: "node-b".into(),
                http: "10.0.0.2:8080".parse().unwrap(),
                control: "10.0.0.2:7070".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn problems_are_reported_where_they_are() {
        let e = errors("node:\n  cpu_budget: 120%\n  memory_budget: 85\n  cluster_key: k\n");
        assert_eq!(e[0].0, 6, "{e:?}");
        assert_eq!(e[0].1, 15);
        assert!(e[0].2.contains("out of range"), "{e:?}");
        assert_eq!((e[1].0, e[1].1), (7, 18));
        assert!(e[1].2.contains("must be a percentage"), "{e:?}");

        let e = errors("peers:\n  - { name: b, http: 10.0.0.2:8080, control: 10.0.0.2:7070 }\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0, e[0].1), (6, 3));
        assert!(e[0].2.contains("node.cluster_key"), "{e:?}");

        let e = errors(
            "node: { cluster_key: k }\npeers:\n  - { name: b, http: 0.0.0.0:8080, control: 10.0.0.2:7070 }\n  - { name: b, http: 10.0.0.3:8080 }\n",
        );
        let text: Vec<&str> = e.iter().map(|e| e.2.as_str()).collect();
        assert!(text.iter().any(|m| m.contains("specific address")), "{e:?}");
        assert!(
            text.iter().any(|m| m.contains("duplicate peer name `b`")),
            "{e:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("missing required key `control`")),
            "{e:?}"
        );

        let e = errors("node: { clustr_key: k }\n");
        assert!(e[0].2.contains("did you mean `cluster_key`"), "{e:?}");
    }

    #[test]
    fn peers_found_by_dns() {
        let c = parse(
            "node: { cluster_key: k }\npeers:\n  - { name: nodes, dns: Spindle-Peers.spindle.svc.cluster.local., http_port: 8080, control_port: 7070 }\n  - { name: more, dns: other, http_port: 1, control_port: 2, refresh_ms: 1000, max_peers: 64 }\n",
        )
        .unwrap();
        assert!(c.peers.is_empty());
        assert_eq!(
            c.dns_peers,
            vec![
                DnsPeerSpec {
                    name: "nodes".into(),
                    dns: "spindle-peers.spindle.svc.cluster.local".into(),
                    http_port: 8080,
                    control_port: 7070,
                    refresh: std::time::Duration::from_secs(30),
                    max_peers: 8,
                },
                DnsPeerSpec {
                    name: "more".into(),
                    dns: "other".into(),
                    http_port: 1,
                    control_port: 2,
                    refresh: std::time::Duration::from_secs(1),
                    max_peers: 64,
                },
            ]
        );
        // Without a key, DNS peers are refused like any other.
        let e = errors("peers:\n  - { name: n, dns: a.b, http_port: 1, control_port: 2 }\n");
        assert!(e[0].2.contains("node.cluster_key"), "{e:?}");
        // (entry, where in it the error points, message)
        for (entry, at, message) in [
            (
                "{ name: n, dns: 10.0.0.1, http_port: 1, control_port: 2 }",
                "10.0.0.1",
                "is not a host name",
            ),
            (
                "{ name: n, dns: a..b, http_port: 1, control_port: 2 }",
                "a..b",
                "is not a host name",
            ),
            (
                "{ name: n, dns: -a.b, http_port: 1, control_port: 2 }",
                "-a.b",
                "is not a host name",
            ),
            (
                "{ name: n, dns: a.b, control_port: 2 }",
                "{",
                "missing required key `http_port`",
            ),
            (
                "{ name: n, dns: a.b, http_port: 0, control_port: 2 }",
                "0,",
                "`peers.http_port` must be between 1 and 65535",
            ),
            (
                "{ name: n, dns: a.b, http_port: 1, control_port: 2, refresh_ms: 10 }",
                "10 }",
                "`peers.refresh_ms` must be between 1000",
            ),
            (
                "{ name: n, dns: a.b, http_port: 1, control_port: 2, max_peers: 65 }",
                "65",
                "`peers.max_peers` must be between 1 and 64",
            ),
            (
                "{ name: n, dns: a.b, http: 10.0.0.1:1, http_port: 1, control_port: 2 }",
                "http:",
                "takes `http_port` and `control_port`, not `http`",
            ),
            (
                "{ name: n, http: 10.0.0.1:1, control: 10.0.0.1:2, max_peers: 3 }",
                "max_peers",
                "`max_peers` goes with `dns`",
            ),
        ] {
            let col = 5 + entry.find(at).unwrap();
            let e = errors(&format!(
                "node: {{ cluster_key: k }}\npeers:\n  - {entry}\n"
            ));
            assert!(
                e.iter()
                    .any(|(l, c, m)| (*l, *c) == (7, col) && m.contains(message)),
                "{entry}: {e:?}"
            );
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("0%"), Ok(0.0));
        assert_eq!(parse_percent("100%"), Ok(1.0));
        assert!(parse_percent("80").is_err());
        assert!(parse_percent("-1%").is_err());
        assert!(parse_percent("x%").is_err());
    }
}
