//! Peers found by DNS (`peers:` entries with `dns:`, e.g. a Kubernetes headless Service):
//! the name is resolved at start and again every `refresh_ms`, and every address but this
//! node's own fills one of the entry's slots. An address keeps its slot while the name
//! resolves to it, so a peer's grants and metrics stay with it; a new address takes the
//! first free slot; a vanished one leaves its slot empty (unreachable: nothing is asked of
//! it or forwarded to it). A failed resolution changes nothing: a DNS outage does not cut
//! the cluster apart.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use chain_runtime::config::DnsPeerSpec;
use prometheus::core::Collector;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{IntCounterVec, Opts};

use super::{PeerAddrs, PeerLink};

/// Resolves one DNS entry and keeps its slots in line.
pub(super) struct Resolver {
    spec: DnsPeerSpec,
    slots: Vec<Arc<PeerLink>>,
    metrics: DnsMetrics,
}

/// What the resolvers count, and the addresses every peer link holds.
#[derive(Clone)]
pub(super) struct DnsMetrics {
    resolutions: IntCounterVec,
}

impl DnsMetrics {
    /// One set for all of a node's DNS entries, so /metrics shows each family once.
    pub(super) fn new() -> Self {
        DnsMetrics {
            resolutions: IntCounterVec::new(
                Opts::new(
                    "spindle_peer_dns_resolutions_total",
                    "Resolutions of the peers' DNS names, by result: ok (the slots follow the \
                     answer) or failed (they keep what they had)",
                ),
                &["peers", "result"],
            )
            .expect("valid"),
        }
    }

    pub(super) fn families(&self, links: &[Arc<PeerLink>]) -> Vec<MetricFamily> {
        let mut out: Vec<MetricFamily> = self.resolutions.collect();
        let samples: Vec<_> = links
            .iter()
            .filter_map(|l| {
                let a = l.addrs()?;
                Some(crate::metrics::gauge(
                    &[
                        ("control", &a.control.to_string()),
                        ("http", &a.http.to_string()),
                        ("peer", &l.name),
                    ],
                    1.0,
                ))
            })
            .collect();
        if !samples.is_empty() {
            out.push(crate::metrics::family(
                "spindle_peer_address_info",
                "1 for each peer and the addresses it is reached at now (peers found by DNS \
                 follow their name; an empty slot has no sample)",
                MetricType::GAUGE,
                samples,
            ));
        }
        out
    }
}

impl Resolver {
    pub(super) fn new(spec: DnsPeerSpec, slots: Vec<Arc<PeerLink>>, metrics: DnsMetrics) -> Self {
        Resolver {
            spec,
            slots,
            metrics,
        }
    }

    /// Re-resolves every `refresh` until the gateway stops.
    pub(super) async fn run(self) {
        loop {
            tokio::time::sleep(self.spec.refresh).await;
            self.refresh().await;
        }
    }

    /// One resolution, and the slots updated to it.
    pub(super) async fn refresh(&self) {
        let name = self.spec.dns.as_str();
        let found = match tokio::net::lookup_host((name, self.spec.http_port)).await {
            Ok(addrs) => addrs
                .map(|a| a.ip())
                .filter(|ip| !is_this_node(*ip))
                .collect::<BTreeSet<IpAddr>>(),
            Err(e) => {
                self.metrics
                    .resolutions
                    .with_label_values(&[self.spec.name.as_str(), "failed"])
                    .inc();
                tracing::warn!(peers = %self.spec.name, dns = %name, "cannot resolve: {e}; keeping the peers as they are");
                return;
            }
        };
        self.metrics
            .resolutions
            .with_label_values(&[self.spec.name.as_str(), "ok"])
            .inc();
        let current: Vec<Option<IpAddr>> = self
            .slots
            .iter()
            .map(|s| s.addrs().map(|a| a.http.ip()))
            .collect();
        let next = assign(&current, &found);
        for (slot, (was, now)) in self.slots.iter().zip(current.iter().zip(&next)) {
            if was == now {
                continue;
            }
            match now {
                Some(ip) => {
                    tracing::info!(peer = %slot.name, dns = %name, address = %ip, "peer found")
                }
                None => tracing::info!(peer = %slot.name, dns = %name, "peer gone from DNS"),
            }
            slot.set_addrs(now.map(|ip| PeerAddrs {
                http: SocketAddr::new(ip, self.spec.http_port),
                control: SocketAddr::new(ip, self.spec.control_port),
            }));
        }
        let placed: BTreeSet<IpAddr> = next.iter().flatten().copied().collect();
        let waiting = found.difference(&placed).count();
        if waiting > 0 {
            tracing::warn!(peers = %self.spec.name, dns = %name, waiting, slots = self.slots.len(),
                "more peers than slots (`max_peers`): the rest wait for a free slot");
        }
    }
}

/// The slots' next addresses: each address still `found` stays where it is, the rest of
/// `found` fill the free slots in address order, and addresses no longer found leave.
fn assign(current: &[Option<IpAddr>], found: &BTreeSet<IpAddr>) -> Vec<Option<IpAddr>> {
    let mut next: Vec<Option<IpAddr>> = current
        .iter()
        .map(|slot| slot.filter(|ip| found.contains(ip)))
        .collect();
    let kept: BTreeSet<IpAddr> = next.iter().flatten().copied().collect();
    let mut new = found.difference(&kept);
    for slot in next.iter_mut().filter(|s| s.is_none()) {
        match new.next() {
            Some(ip) => *slot = Some(*ip),
            None => break,
        }
    }
    next
}

/// Whether `ip` is an address of this node (its own entry in the headless Service): one
/// this network namespace can bind.
fn is_this_node(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn slots(list: &[Option<&str>]) -> Vec<Option<IpAddr>> {
        list.iter().map(|s| s.map(|s| s.parse().unwrap())).collect()
    }

    #[test]
    fn addresses_keep_their_slots_new_ones_fill_free_slots_gone_ones_leave() {
        let empty = slots(&[None, None, None]);
        assert_eq!(
            assign(&empty, &ips(&["10.0.0.3", "10.0.0.2"])),
            slots(&[Some("10.0.0.2"), Some("10.0.0.3"), None])
        );
        // 10.0.0.2 went, 10.0.0.9 came: .3 stays in slot 1, .9 takes the free slot 0.
        let now = slots(&[Some("10.0.0.2"), Some("10.0.0.3"), None]);
        assert_eq!(
            assign(&now, &ips(&["10.0.0.3", "10.0.0.9"])),
            slots(&[Some("10.0.0.9"), Some("10.0.0.3"), None])
        );
        // More addresses than slots: the slots fill, the rest wait.
        assert_eq!(
            assign(&slots(&[None]), &ips(&["10.0.0.5", "10.0.0.4"])),
            slots(&[Some("10.0.0.4")])
        );
        // Nothing found: every slot empties.
        assert_eq!(assign(&now, &ips(&[])), slots(&[None, None, None]));
    }

    #[test]
    fn this_nodes_own_addresses_are_not_peers() {
        assert!(is_this_node("127.0.0.1".parse().unwrap()));
        // TEST-NET-3: never an address of a test machine.
        assert!(!is_this_node("203.0.113.77".parse().unwrap()));
    }
}
