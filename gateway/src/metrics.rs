//! Prometheus metrics of the gateway. Handles used per request are created once per chain and
//! kept in [`ChainMetrics`], so the hot path does no label lookups.

use sockmap_bpf::KernelDataplane;

use crate::dataplane::ChainRuntime;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    refused: IntCounterVec,
    forwarded: IntCounterVec,
    alloc_failures: IntCounterVec,
    pub restarts: IntCounterVec,
    pub instances_up: IntGaugeVec,
    arena_slots: IntGaugeVec,
    dataplane: IntGaugeVec,
    kernel: IntCounterVec,
    kernel_instance: IntCounterVec,
    kernel_bytes: IntCounterVec,
}

/// Per-chain handles, cloned out of the vectors once.
#[derive(Clone)]
pub struct ChainMetrics {
    chain: String,
    requests: IntCounterVec,
    refused: IntCounterVec,
    pub ok: IntCounter,
    pub duration: prometheus::Histogram,
    pub forwarded: IntCounter,
    pub alloc_failures: IntCounter,
}

impl ChainMetrics {
    pub fn request(&self, code: u16) {
        if code == 200 {
            self.ok.inc();
        } else {
            self.requests
                .with_label_values(&[self.chain.as_str(), &code.to_string()])
                .inc();
        }
    }

    pub fn refused(&self, reason: &str) {
        self.refused
            .with_label_values(&[self.chain.as_str(), reason])
            .inc();
    }
}

/// Brings a counter up to a value read elsewhere (the kernel's counters only grow).
fn advance(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_requests_total",
                    "HTTP requests answered, by chain and status code",
                ),
                &["chain", "code"],
            )
            .expect("valid metric"),
        );
        let duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "spindle_request_duration_seconds",
                    "End-to-end latency of chain requests, from request headers to response ready",
                )
                .buckets(prometheus::exponential_buckets(25e-6, 2.0, 18).expect("valid buckets")),
                &["chain"],
            )
            .expect("valid metric"),
        );
        let refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_descriptors_refused_total",
                    "Descriptors refused because they were forged, stale or malformed",
                ),
                &["chain", "reason"],
            )
            .expect("valid metric"),
        );
        let forwarded = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_router_forwarded_total",
                    "Descriptors the userspace router forwarded from one function to the next",
                ),
                &["chain"],
            )
            .expect("valid metric"),
        );
        let alloc_failures = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_arena_alloc_failures_total",
                    "Requests refused because the arena was full",
                ),
                &["chain"],
            )
            .expect("valid metric"),
        );
        let restarts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_instance_restarts_total",
                    "Function instances restarted after exiting",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        let instances_up = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_instances_up",
                    "Function instances running and ready",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        let arena_slots = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("spindle_arena_slots", "Arena slots by state"),
                &["chain", "state"],
            )
            .expect("valid metric"),
        );
        let dataplane = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_dataplane_info",
                    "The dataplane in use (1), and why eBPF is not when auto fell back",
                ),
                &["mode", "fallback_reason"],
            )
            .expect("valid metric"),
        );
        let kernel = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_ebpf_descriptors_total",
                    "Descriptors seen by the eBPF sk_msg program, per function: redirected to it, \
                     sent by it to the gateway, given back to the gateway marked failed, or \
                     undeliverable to it (read from the program's per-CPU map, summed)",
                ),
                &["chain", "function", "event"],
            )
            .expect("valid metric"),
        );
        let kernel_instance = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_ebpf_instance_descriptors_total",
                    "Descriptors the eBPF program redirected to each function instance",
                ),
                &["chain", "function", "instance"],
            )
            .expect("valid metric"),
        );
        let kernel_bytes = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_ebpf_redirected_bytes_total",
                    "Bytes the eBPF program redirected to each function",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        Metrics {
            registry,
            requests,
            duration,
            refused,
            forwarded,
            alloc_failures,
            restarts,
            instances_up,
            arena_slots,
            dataplane,
            kernel,
            kernel_instance,
            kernel_bytes,
        }
    }

    pub fn set_dataplane(&self, mode: &str, fallback_reason: Option<&str>) {
        self.dataplane
            .with_label_values(&[mode, fallback_reason.unwrap_or("")])
            .set(1);
    }

    /// Copies the eBPF program's counters for a chain's functions into the registry.
    pub fn set_kernel_counters(&self, chain: &ChainRuntime, kernel: &KernelDataplane) {
        let name = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let Ok(stats) = kernel.function_stats(stage.fn_id) else {
                continue;
            };
            advance(
                &self
                    .kernel_bytes
                    .with_label_values(&[name, stage.name.as_str()]),
                stats.bytes,
            );
            for (event, value) in [
                ("redirected", stats.messages),
                ("to_gateway", stats.to_gateway),
                ("returned_failed", stats.returned),
                ("undeliverable", stats.redirect_failures),
            ] {
                advance(
                    &self
                        .kernel
                        .with_label_values(&[name, stage.name.as_str(), event]),
                    value,
                );
            }
            for instance in 0..stage.instances.len() {
                if let Ok(n) = kernel.instance_messages(stage.fn_id, instance as u32) {
                    let label = instance.to_string();
                    advance(
                        &self.kernel_instance.with_label_values(&[
                            name,
                            stage.name.as_str(),
                            &label,
                        ]),
                        n,
                    );
                }
            }
        }
    }

    pub fn chain(&self, chain: &str) -> ChainMetrics {
        ChainMetrics {
            chain: chain.to_string(),
            requests: self.requests.clone(),
            refused: self.refused.clone(),
            ok: self.requests.with_label_values(&[chain, "200"]),
            duration: self.duration.with_label_values(&[chain]),
            forwarded: self.forwarded.with_label_values(&[chain]),
            alloc_failures: self.alloc_failures.with_label_values(&[chain]),
        }
    }

    pub fn set_arena(&self, chain: &str, total: u32, free: u32) {
        self.arena_slots
            .with_label_values(&[chain, "total"])
            .set(i64::from(total));
        self.arena_slots
            .with_label_values(&[chain, "free"])
            .set(i64::from(free));
        // `free` is read from memory workers can write: never trust it to be <= total.
        self.arena_slots
            .with_label_values(&[chain, "in_use"])
            .set(i64::from(total.saturating_sub(free)));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
