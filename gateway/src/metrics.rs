//! Prometheus metrics of the gateway. Handles used per request are created once per chain and
//! kept in [`ChainMetrics`], so the hot path does no label lookups.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chain_runtime::stats::{EXEC_BUCKETS, ErrorKind, LIVE_RESOURCES, Snapshot, bucket_bound};
use nix::unistd::{SysconfVar, sysconf};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use crate::dataplane::{ChainRuntime, Refusal, WAIT_BUCKETS};
use shm::{Arena, SlotClass};

/// The family every user-space copy of payload bytes is counted in, gateway and workers.
pub const PAYLOAD_COPIED: &str = "spindle_payload_bytes_copied_total";
/// Payload bytes functions handled in place (a mapped slot) instead of copying.
pub const PAYLOAD_IN_PLACE: &str = "spindle_payload_bytes_in_place_total";
const PAYLOAD_COPIED_HELP: &str = "Payload bytes copied in user space, by the process that \
     copied them (gateway, or the function) and the copy (request_body: body into its slot; \
     class_move: a chunked body moved from a small slot to a large one; response_body: slot \
     into the response; function_input: slot into the guest's memory; function_output: \
     guest memory into the slot)";
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    alloc_failures: IntCounterVec,
    pub restarts: IntCounterVec,
    pub zygote_restarts: IntCounterVec,
    instance_starts: IntCounterVec,
    instance_start_seconds: HistogramVec,
    pub instances_up: IntGaugeVec,
    pub instances_desired: IntGaugeVec,
    pub autoscaler_panic: IntGaugeVec,
    pub scale_events: IntCounterVec,
    pub reloads: IntCounterVec,
    pub http_connections_open: prometheus::IntGauge,
    pub http_connections_refused: IntCounterVec,
    pub http_connections_closed: IntCounterVec,
    pub function_generation: IntGaugeVec,
    arena_slots: IntGaugeVec,
    arena_class_slots: IntGaugeVec,
    class_alloc_failures: IntCounterVec,
    payload_copied: IntCounterVec,
    dataplane: IntGaugeVec,
    fork_transport: IntGaugeVec,
    sandbox: IntGaugeVec,
    in_flight: IntGaugeVec,
}

/// Statuses a chain route answers with (see README "Status codes").
const CHAIN_CODES: [u16; 9] = [200, 400, 408, 413, 500, 502, 503, 504, 508];

/// Per-chain handles, cloned out of the vectors once.
#[derive(Clone)]
pub struct ChainMetrics {
    chain: String,
    requests: IntCounterVec,
    /// Handles for every status a chain request can end with, so no request looks one up.
    by_code: Vec<(u16, IntCounter)>,
    pub duration: prometheus::Histogram,
    pub alloc_failures: IntCounter,
    /// Per slot class ([`SlotClass::ALL`] order): requests refused because it was full.
    class_failures: Vec<IntCounter>,
    /// Payload bytes the gateway copied: body into slot, small slot into large one, slot
    /// into the response.
    pub copied_request: IntCounter,
    pub copied_move: IntCounter,
    pub copied_response: IntCounter,
    pub in_flight: prometheus::IntGauge,
}

impl ChainMetrics {
    pub fn class_alloc_failures(&self, class: SlotClass) -> &IntCounter {
        let i = SlotClass::ALL
            .iter()
            .position(|&c| c == class)
            .expect("ALL lists every class");
        &self.class_failures[i]
    }

    pub fn request(&self, code: u16) {
        match self.by_code.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.inc(),
            None => self
                .requests
                .with_label_values(&[self.chain.as_str(), &code.to_string()])
                .inc(),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut l = LabelPair::default();
            l.set_name((*name).to_string());
            l.set_value((*value).to_string());
            l
        })
        .collect()
}

pub(crate) fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

pub(crate) fn counter(pairs: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

/// A histogram sample from per-bucket counts (upper bound, non-cumulative count), the count
/// above the last bound (only in `+Inf`), and the sum.
pub(crate) fn histogram(
    pairs: &[(&str, &str)],
    buckets: impl IntoIterator<Item = (f64, u64)>,
    overflow: u64,
    sum: f64,
) -> proto::Metric {
    let mut cumulative = 0u64;
    let buckets = buckets
        .into_iter()
        .map(|(bound, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = proto::Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(cumulative + overflow);
    h.set_sample_sum(sum);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

pub(crate) fn gauge(pairs: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

/// What each chain's router did with descriptors (counted by the dataplane).
fn router_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut refused, mut forwarded) = (Vec::new(), Vec::new());
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for reason in Refusal::ALL {
            refused.push(counter(
                &[("chain", c), ("reason", reason.label())],
                chain.counters.refused(reason) as f64,
            ));
        }
        forwarded.push(counter(
            &[("chain", c)],
            chain.counters.forwarded.load(Ordering::Relaxed) as f64,
        ));
    }
    vec![
        family(
            "spindle_descriptors_refused_total",
            "Descriptors refused because they were forged, stale or malformed",
            MetricType::COUNTER,
            refused,
        ),
        family(
            "spindle_router_forwarded_total",
            "Descriptors the userspace router forwarded from one function to the next",
            MetricType::COUNTER,
            forwarded,
        ),
    ]
}

/// Each function's wait queue: requests waiting for an instance now, how long those that
/// were sent on waited, and those that expired or were turned away.
fn wait_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut waiting, mut waits, mut expired, mut refused, mut images) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for (stage, load) in chain.stages.iter().zip(&chain.load) {
            let pairs = [("chain", c), ("function", stage.name.as_str())];
            waiting.push(gauge(&pairs, load.waiting.load(Ordering::Relaxed) as f64));
            images.push(gauge(
                &pairs,
                f64::from(stage.zygotes_up.load(Ordering::Relaxed)),
            ));
            expired.push(counter(
                &pairs,
                load.wait_expired.load(Ordering::Relaxed) as f64,
            ));
            refused.push(counter(
                &pairs,
                load.wait_refused.load(Ordering::Relaxed) as f64,
            ));
            let counts = load.wait_buckets.iter().map(|n| n.load(Ordering::Relaxed));
            let overflow = load.wait_buckets[WAIT_BUCKETS.len()].load(Ordering::Relaxed);
            waits.push(histogram(
                &pairs,
                WAIT_BUCKETS.iter().copied().zip(counts),
                overflow,
                load.wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
            ));
        }
    }
    vec![
        family(
            "spindle_local_images_alive",
            "Warm images this node holds for local forks: the function's zygotes running (two \
             while a reload rolls from the old to the new one; 0 for start: exec)",
            MetricType::GAUGE,
            images,
        ),
        family(
            "spindle_requests_waiting",
            "Requests waiting for an instance of the function (none ready, or all full)",
            MetricType::GAUGE,
            waiting,
        ),
        family(
            "spindle_request_wait_seconds",
            "How long requests that waited for an instance waited before one took them",
            MetricType::HISTOGRAM,
            waits,
        ),
        family(
            "spindle_requests_wait_expired_total",
            "Requests failed (504) at the chain's deadline while waiting for an instance",
            MetricType::COUNTER,
            expired,
        ),
        family(
            "spindle_requests_wait_refused_total",
            "Requests refused (503) because the function's wait queue was full",
            MetricType::COUNTER,
            refused,
        ),
    ]
}

/// How the memory of instances resumed from remote images was filled (per instance, summed
/// over its incarnations), and the remote-fork resources open in the gateway and in each
/// running resumed instance. Instances that never resumed have no rows.
fn fork_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut resumes, mut faults, mut pages, mut cache, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut open = Vec::new();
    let mut caches_refused = rdma_fork::lifecycle::caches_refused();
    let gateway = rdma_fork::lifecycle::snapshot();
    let gateway_live = [
        gateway.memfds,
        gateway.uffd_registrations,
        gateway.server_connections,
        gateway.client_connections,
    ];
    for (resource, n) in LIVE_RESOURCES.iter().zip(gateway_live) {
        open.push(gauge(
            &[("process", "gateway"), ("resource", resource)],
            n as f64,
        ));
    }
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let f = stage.name.as_str();
            for (i, instance) in stage.instances.iter().enumerate() {
                let s = instance.stats.snapshot();
                if s.fork.resumes == 0 {
                    continue;
                }
                let i = i.to_string();
                let l = [("chain", c), ("function", f), ("instance", i.as_str())];
                let with = |k: &'static str, v: &'static str| {
                    [
                        ("chain", c),
                        ("function", f),
                        ("instance", i.as_str()),
                        (k, v),
                    ]
                };
                let k = s.fork;
                caches_refused += k.caches_refused;
                resumes.push(counter(&l, k.resumes as f64));
                faults.push(counter(&l, k.faults as f64));
                pages.push(counter(&with("kind", "copied"), k.pages_copied as f64));
                pages.push(counter(&with("kind", "zero"), k.zero_pages as f64));
                pages.push(counter(&with("kind", "prefetched"), k.prefetched as f64));
                cache.push(counter(&with("result", "hit"), k.cache_hits as f64));
                cache.push(counter(&with("result", "miss"), k.cache_misses as f64));
                bytes.push(counter(&l, k.bytes_fetched as f64));
                // Gauges of a worker that is gone would be stale: its kernel freed them.
                if instance.pid.load(Ordering::Relaxed) != 0 {
                    for (resource, n) in LIVE_RESOURCES.iter().zip(s.live) {
                        let mut l = with("resource", resource).to_vec();
                        l.push(("process", "worker"));
                        open.push(gauge(&l, n as f64));
                    }
                }
            }
        }
    }
    vec![
        family(
            "spindle_fork_child_resumes_total",
            "Incarnations of an instance that resumed from a remote image",
            MetricType::COUNTER,
            resumes,
        ),
        family(
            "spindle_fork_child_faults_total",
            "Missing-page faults of resumed instances' memory answered by their handler",
            MetricType::COUNTER,
            faults,
        ),
        family(
            "spindle_fork_child_pages_total",
            "Pages installed in resumed instances' memory: copied (data, from the parent or \
             the node cache), zero (marked zero in the image, never fetched), prefetched \
             (ahead of a fault)",
            MetricType::COUNTER,
            pages,
        ),
        family(
            "spindle_fork_child_cache_pages_total",
            "Data pages resumed instances looked up in the node page cache: hit (read \
             locally), miss (fetched from the parent)",
            MetricType::COUNTER,
            cache,
        ),
        family(
            "spindle_fork_child_bytes_fetched_total",
            "Bytes resumed instances received from their parent's page server",
            MetricType::COUNTER,
            bytes,
        ),
        family(
            "spindle_fork_resources_open",
            "Remote-fork resources open now, in the gateway and in each running resumed \
             instance: memfd, uffd_registration, page_server_connection, page_client_connection",
            MetricType::GAUGE,
            open,
        ),
        family(
            "spindle_fork_node_caches_refused_total",
            "Node page caches this node's resumed instances (and the gateway) refused to open \
             (malformed, another image's, revoked); they resumed without one",
            MetricType::COUNTER,
            vec![counter(&[], caches_refused as f64)],
        ),
    ]
}

/// Per-function invocations, errors and execution times, summed over the function's
/// instances' statistics pages (written by the workers).
/// The workers' copies (from their statistics pages) join the gateway's in the one
/// `spindle_payload_bytes_copied_total` family, per function, summed over its instances.
fn add_worker_copies(families: &mut Vec<MetricFamily>, chains: &[Arc<ChainRuntime>]) {
    let (mut samples, mut in_place) = (Vec::new(), Vec::new());
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let f = stage.name.as_str();
            let mut total = Snapshot::default();
            for instance in &stage.instances {
                total.add(&instance.stats.snapshot());
            }
            for (copy, n) in [
                ("function_input", total.copied.in_place_input),
                ("function_output", total.copied.in_place_output),
            ] {
                in_place.push(counter(
                    &[("chain", c), ("copy", copy), ("process", f)],
                    n as f64,
                ));
            }
            for (copy, n) in [
                ("function_input", total.copied.input),
                ("function_output", total.copied.output),
            ] {
                // Labels in name order, as the registry writes the gateway's samples.
                samples.push(counter(
                    &[("chain", c), ("copy", copy), ("process", f)],
                    n as f64,
                ));
            }
        }
    }
    families.push(family(
        PAYLOAD_IN_PLACE,
        "Payload bytes functions read (function_input) and wrote (function_output) in place, \
         in the request's slot mapped into their memory, instead of copying them",
        MetricType::COUNTER,
        in_place,
    ));
    match families.iter_mut().find(|f| f.name() == PAYLOAD_COPIED) {
        Some(f) => f.mut_metric().extend(samples),
        None => families.push(family(
            PAYLOAD_COPIED,
            PAYLOAD_COPIED_HELP,
            MetricType::COUNTER,
            samples,
        )),
    }
}

fn function_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut invocations, mut errors, mut exec) = (Vec::new(), Vec::new(), Vec::new());
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let f = stage.name.as_str();
            let mut total = Snapshot::default();
            for instance in &stage.instances {
                total.add(&instance.stats.snapshot());
            }
            invocations.push(counter(
                &[("chain", c), ("function", f)],
                total.invocations as f64,
            ));
            for kind in ErrorKind::ALL {
                let mut n = total.errors[kind as usize];
                if kind == ErrorKind::Timeout {
                    n += stage.watchdog_timeouts.load(Ordering::Relaxed);
                }
                errors.push(counter(
                    &[("chain", c), ("function", f), ("kind", kind.label())],
                    n as f64,
                ));
            }
            let crashes = stage.crashes.load(Ordering::Relaxed) as f64;
            errors.push(counter(
                &[("chain", c), ("function", f), ("kind", "crash")],
                crashes,
            ));
            let overdue = stage.overdue_kills.load(Ordering::Relaxed) as f64;
            errors.push(counter(
                &[("chain", c), ("function", f), ("kind", "overdue")],
                overdue,
            ));

            exec.push(histogram(
                &[("chain", c), ("function", f)],
                (0..EXEC_BUCKETS).map(|i| (bucket_bound(i), total.exec_buckets[i])),
                total.exec_overflow,
                total.exec_sum_seconds,
            ));
        }
    }
    vec![
        family(
            "spindle_function_invocations_total",
            "Calls of each function's guest code, over all its instances",
            MetricType::COUNTER,
            invocations,
        ),
        family(
            "spindle_function_errors_total",
            "Failed function calls by kind (guest_error, trap, timeout, refused_descriptor, \
             request_mismatch: a descriptor refused for naming a live slot under another \
             request's id, bad_route, crash, overdue: instance killed for holding a request \
             past its chain's deadline)",
            MetricType::COUNTER,
            errors,
        ),
        family(
            "spindle_function_execution_seconds",
            "Time spent in a function's guest code per call",
            MetricType::HISTOGRAM,
            exec,
        ),
    ]
}

/// Resets of `isolation: fresh_per_request` functions (summed over their instances'
/// statistics pages): how many, done how, their durations and the pages they dropped. Only
/// functions with that isolation have rows (at 0 from the start).
fn reset_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut resets, mut seconds, mut pages, mut shrinks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for chain in chains {
        let c = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let fresh = chain.plan.stages.iter().any(|s| {
                s.fn_id == stage.fn_id
                    && s.function.isolation == chain_runtime::config::Isolation::FreshPerRequest
            });
            if !fresh {
                continue;
            }
            let f = stage.name.as_str();
            let mut total = Snapshot::default();
            for instance in &stage.instances {
                total.add(&instance.stats.snapshot());
            }
            let r = total.reset;
            let l = [("chain", c), ("function", f)];
            resets.push(counter(
                &[l[0], l[1], ("how", "in_place")],
                r.in_place as f64,
            ));
            resets.push(counter(
                &[l[0], l[1], ("how", "rebuild")],
                r.rebuilds as f64,
            ));
            pages.push(counter(
                &[l[0], l[1], ("how", "copied")],
                r.pages_copied as f64,
            ));
            pages.push(counter(
                &[l[0], l[1], ("how", "dropped")],
                r.pages_dropped as f64,
            ));
            shrinks.push(counter(&l, r.shrinks as f64));
            seconds.push(histogram(
                &l,
                (0..EXEC_BUCKETS).map(|i| (bucket_bound(i), r.buckets[i])),
                r.overflow,
                r.sum_seconds,
            ));
        }
    }
    vec![
        family(
            "spindle_function_resets_total",
            "Resets of fresh_per_request instances to their warm image after a call: in_place \
             (memory and globals put back) or rebuild (re-instantiated from the image)",
            MetricType::COUNTER,
            resets,
        ),
        family(
            "spindle_function_reset_seconds",
            "Time from the end of a call to a fresh_per_request instance ready for the next",
            MetricType::HISTOGRAM,
            seconds,
        ),
        family(
            "spindle_function_reset_pages_total",
            "Written pages resets in place put back to the image: copied (from the image, \
             staying resident) or dropped (MADV_DONTNEED; 0 without PAGEMAP_SCAN)",
            MetricType::COUNTER,
            pages,
        ),
        family(
            "spindle_function_reset_memory_shrinks_total",
            "Resets that shrank memory the guest had grown back to the image's size",
            MetricType::COUNTER,
            shrinks,
        ),
    ]
}

/// (CPU seconds, resident bytes) of a process, from /proc.
fn process_usage(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: f64 = statm.split(' ').nth(1)?.parse().ok()?;
    let hz = sysconf(SysconfVar::CLK_TCK).ok().flatten()?;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()?;
    Some((ticks / hz as f64, pages * page as f64))
}

/// The eBPF program's per-CPU counters, summed, for chains the kernel dataplane routes.
fn kernel_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut events, mut instances, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for chain in chains {
        let Some(k) = &chain.kernel else { continue };
        let c = chain.plan.spec.name.as_str();
        for stage in &chain.stages {
            let f = stage.name.as_str();
            let Ok(stats) = k.dataplane.function_stats(stage.fn_id) else {
                continue;
            };
            for (event, value) in [
                ("redirected", stats.messages),
                ("to_gateway", stats.to_gateway),
                ("returned_failed", stats.returned),
                ("undeliverable", stats.redirect_failures),
                ("dropped", stats.dropped),
            ] {
                events.push(counter(
                    &[("chain", c), ("event", event), ("function", f)],
                    value as f64,
                ));
            }
            bytes.push(counter(
                &[("chain", c), ("function", f)],
                stats.bytes as f64,
            ));
            for i in 0..stage.instances.len() {
                if let Ok(n) = k.dataplane.instance_messages(stage.fn_id, i as u32) {
                    let i = i.to_string();
                    instances.push(counter(
                        &[("chain", c), ("function", f), ("instance", i.as_str())],
                        n as f64,
                    ));
                }
            }
        }
    }
    if events.is_empty() {
        return Vec::new();
    }
    vec![
        family(
            "spindle_ebpf_descriptors_total",
            "Descriptors seen by the eBPF sk_msg program, per function: redirected to it, sent by \
             it to the gateway (chain end, errors, ready), given back to the gateway marked failed \
             (a subset of to_gateway), undeliverable to it, or dropped on the way from the gateway \
             to an instance going away",
            MetricType::COUNTER,
            events,
        ),
        family(
            "spindle_ebpf_instance_descriptors_total",
            "Descriptors the eBPF program redirected to each function instance",
            MetricType::COUNTER,
            instances,
        ),
        family(
            "spindle_ebpf_redirected_bytes_total",
            "Bytes the eBPF program redirected to each function",
            MetricType::COUNTER,
            bytes,
        ),
    ]
}

/// CPU time and memory of the gateway, of every running worker and zygote, and each
/// instance's pid.
fn process_families(chains: &[Arc<ChainRuntime>]) -> Vec<MetricFamily> {
    let (mut cpu, mut rss, mut pids) = (Vec::new(), Vec::new(), Vec::new());
    if let Some((c, r)) = process_usage("self") {
        let l = [("process", "gateway")];
        cpu.push(counter(&l, c));
        rss.push(gauge(&l, r));
    }
    for chain in chains {
        for stage in &chain.stages {
            let zygote = stage.zygote_pid.load(Ordering::Relaxed);
            if zygote != 0
                && let Some((c, r)) = process_usage(&zygote.to_string())
            {
                let l = [
                    ("chain", chain.plan.spec.name.as_str()),
                    ("function", stage.name.as_str()),
                    ("process", "zygote"),
                ];
                cpu.push(counter(&l, c));
                rss.push(gauge(&l, r));
            }
            for (i, instance) in stage.instances.iter().enumerate() {
                let pid = instance.pid.load(Ordering::Relaxed);
                if pid == 0 {
                    continue;
                }
                let i = i.to_string();
                pids.push(gauge(
                    &[
                        ("chain", chain.plan.spec.name.as_str()),
                        ("function", stage.name.as_str()),
                        ("instance", i.as_str()),
                    ],
                    f64::from(pid),
                ));
                if let Some((c, r)) = process_usage(&pid.to_string()) {
                    let l = [
                        ("chain", chain.plan.spec.name.as_str()),
                        ("function", stage.name.as_str()),
                        ("instance", i.as_str()),
                        ("process", "worker"),
                    ];
                    cpu.push(counter(&l, c));
                    rss.push(gauge(&l, r));
                }
            }
        }
    }
    vec![
        family(
            "spindle_process_cpu_seconds_total",
            "User and system CPU time of the gateway, of each running worker process \
             (a restarted worker starts again from 0) and of each function's zygote",
            MetricType::COUNTER,
            cpu,
        ),
        family(
            "spindle_instance_pid",
            "Process id of each running function instance (exec'd or forked)",
            MetricType::GAUGE,
            pids,
        ),
        family(
            "spindle_process_resident_memory_bytes",
            "Resident memory of the gateway, of each running worker process and of each \
             function's zygote (a forked worker counts pages it shares with its zygote)",
            MetricType::GAUGE,
            rss,
        ),
    ]
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
        let zygote_restarts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_zygote_restarts_total",
                    "Zygotes (the per-function processes instances are forked from) restarted \
                     after exiting or failing to start",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        let instance_starts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_instance_starts_total",
                    "Function instances started (first starts, restarts, scale-ups, reloads), by \
                     how: fork (local, from the function's zygote), resume (from a remote image) \
                     or exec (cold: a fresh process compiling the module)",
                ),
                &["chain", "function", "mode"],
            )
            .expect("valid metric"),
        );
        let instance_start_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "spindle_instance_start_seconds",
                    "Time from deciding to start an instance to its ready message, by mode",
                )
                .buckets(prometheus::exponential_buckets(50e-6, 2.0, 18).expect("valid buckets")),
                &["chain", "function", "mode"],
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
        let instances_desired = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_instances_desired",
                    "Instances the autoscaler wants now (autoscaled functions only)",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        let autoscaler_panic = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_autoscaler_panic",
                    "1 while the function's autoscaler is in panic mode (a burst), else 0",
                ),
                &["chain", "function"],
            )
            .expect("valid metric"),
        );
        let scale_events = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_scale_events_total",
                    "Instances the autoscaler started (up) or retired (down)",
                ),
                &["chain", "function", "direction"],
            )
            .expect("valid metric"),
        );
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_reloads_total",
                    "Config reloads (SIGHUP, spindle reload): ok, refused (errors, or a change \
                     only a restart applies; nothing changed) or failed (a function's new \
                     instances did not start; it kept its old module)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let http_connections_open = register(
            &registry,
            prometheus::IntGauge::new(
                "spindle_http_connections_open",
                "Client HTTP connections open now",
            )
            .expect("valid metric"),
        );
        let http_connections_refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_http_connections_refused_total",
                    "Client connections refused on accept: at_capacity (http.max_connections \
                     open already; answered 503 and closed)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let http_connections_closed = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_http_connections_closed_total",
                    "Client connections the front cut or that ended in an error: idle \
                     (http.idle_timeout_ms), header_timeout (headers not sent in time), \
                     headers_too_large (431), malformed, client_gone, error",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        http_connections_refused.with_label_values(&["at_capacity"]);
        for reason in [
            "idle",
            "header_timeout",
            "headers_too_large",
            "malformed",
            "client_gone",
            "error",
        ] {
            http_connections_closed.with_label_values(&[reason]);
        }
        let function_generation = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_function_generation",
                    "Which module generation a function's instances run: 1 at start, +1 per \
                     reload that rolled it",
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
        let arena_class_slots = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_arena_class_slots",
                    "Arena slots by size class (small, large) and state",
                ),
                &["chain", "class", "state"],
            )
            .expect("valid metric"),
        );
        let class_alloc_failures = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "spindle_arena_class_alloc_failures_total",
                    "Requests refused because the slot class they needed was full",
                ),
                &["chain", "class"],
            )
            .expect("valid metric"),
        );
        let payload_copied = register(
            &registry,
            IntCounterVec::new(
                Opts::new(PAYLOAD_COPIED, PAYLOAD_COPIED_HELP),
                &["chain", "process", "copy"],
            )
            .expect("valid metric"),
        );
        let in_flight = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_requests_in_flight",
                    "Chain requests being served now",
                ),
                &["chain"],
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
        let fork_transport = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_fork_transport_info",
                    "How instances resumed from remote images fetch pages (1), and why not over \
                     RDMA; present only when a function resumes from an image",
                ),
                &["transport", "fallback_reason"],
            )
            .expect("valid metric"),
        );
        let sandbox = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "spindle_sandbox_layer",
                    "Whether workers run with each confinement layer (1) or without (0): \
                     namespaces, credentials, seccomp (docs/security.md)",
                ),
                &["layer"],
            )
            .expect("valid metric"),
        );
        Metrics {
            registry,
            fork_transport,
            sandbox,
            requests,
            duration,
            alloc_failures,
            restarts,
            zygote_restarts,
            instance_starts,
            instance_start_seconds,
            instances_up,
            instances_desired,
            autoscaler_panic,
            scale_events,
            reloads,
            http_connections_open,
            http_connections_refused,
            http_connections_closed,
            function_generation,
            arena_slots,
            arena_class_slots,
            class_alloc_failures,
            payload_copied,
            dataplane,
            in_flight,
        }
    }

    /// Counts one instance start and how long it took to become ready.
    /// `mode`: fork, resume or exec (see `spindle_instance_starts_total`).
    pub fn instance_started(&self, chain: &str, function: &str, mode: &str, took: Duration) {
        let labels = [chain, function, mode];
        self.instance_starts.with_label_values(&labels).inc();
        self.instance_start_seconds
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn set_dataplane(&self, mode: &str, fallback_reason: Option<&str>) {
        self.dataplane
            .with_label_values(&[mode, fallback_reason.unwrap_or("")])
            .set(1);
    }

    /// Which confinement layers this gateway's workers get (resumed workers keep the host's
    /// namespaces whatever this says: docs/security.md).
    pub fn set_sandbox(&self, namespaces: bool, credentials: bool, seccomp: bool) {
        for (layer, on) in [
            ("namespaces", namespaces),
            ("credentials", credentials),
            ("seccomp", seccomp),
        ] {
            self.sandbox.with_label_values(&[layer]).set(i64::from(on));
        }
    }

    pub fn set_fork_transport(&self, transport: &str, fallback_reason: &str) {
        self.fork_transport
            .with_label_values(&[transport, fallback_reason])
            .set(1);
    }

    pub fn chain(&self, chain: &str) -> ChainMetrics {
        ChainMetrics {
            chain: chain.to_string(),
            requests: self.requests.clone(),
            by_code: CHAIN_CODES
                .iter()
                .map(|&c| (c, self.requests.with_label_values(&[chain, &c.to_string()])))
                .collect(),
            duration: self.duration.with_label_values(&[chain]),
            alloc_failures: self.alloc_failures.with_label_values(&[chain]),
            class_failures: SlotClass::ALL
                .iter()
                .map(|c| {
                    self.class_alloc_failures
                        .with_label_values(&[chain, c.label()])
                })
                .collect(),
            copied_request: self.copied(chain, "request_body"),
            copied_move: self.copied(chain, "class_move"),
            copied_response: self.copied(chain, "response_body"),
            in_flight: self.in_flight.with_label_values(&[chain]),
        }
    }

    fn copied(&self, chain: &str, copy: &str) -> IntCounter {
        self.payload_copied
            .with_label_values(&[chain, "gateway", copy])
    }

    /// The arena's slot counts: totals over its classes, and per class.
    pub fn set_arena(&self, chain: &str, arena: &Arena) {
        self.set_arena_totals(chain, arena.slot_count(), arena.free_slots());
        for class in SlotClass::ALL {
            let Some(spec) = arena.class(class) else {
                continue;
            };
            let (total, free) = (spec.slot_count, arena.free_slots_in(class));
            for (state, n) in [
                ("total", total),
                ("free", free),
                ("in_use", total.saturating_sub(free)),
            ] {
                self.arena_class_slots
                    .with_label_values(&[chain, class.label(), state])
                    .set(i64::from(n));
            }
        }
    }

    fn set_arena_totals(&self, chain: &str, total: u32, free: u32) {
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

    /// The whole scrape: the registry plus what is read at scrape time from the workers'
    /// statistics pages and /proc, and `extra` (the node service's families).
    pub fn encode(&self, chains: &[Arc<ChainRuntime>], extra: Vec<MetricFamily>) -> Vec<u8> {
        let mut families = self.registry.gather();
        add_worker_copies(&mut families, chains);
        families.extend(extra);
        families.extend(router_families(chains));
        families.extend(wait_families(chains));
        families.extend(function_families(chains));
        families.extend(fork_families(chains));
        families.extend(reset_families(chains));
        families.extend(kernel_families(chains));
        families.extend(process_families(chains));
        // The text encoder refuses a family without samples (e.g. the child-side fork
        // families on a node that resumed nothing): leave such families out.
        families.retain(|f| !f.get_metric().is_empty());
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
