//! The report: JSON (field names are a stable interface), Markdown, and the numbers behind
//! both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::{Spread, median_of, paired_ratios, spread_of};
use crate::sysstat::{IdleBaseline, SystemCpu};
use crate::{BenchOptions, Target};

/// The whole comparison. Serialized field names are stable; `null` means "not applicable"
/// (skipped target, no CPU accounting for a URL, ratio whose targets did not both run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub options: OptionsReport,
    /// One entry per target (per payload size and target in a sweep: sizes in order, each
    /// with every target in order). Top-level figures are over rounds, see [`TargetReport`].
    pub targets: Vec<TargetReport>,
    /// From the medians of the first payload size's targets; `ratios.per_round` pairs rounds.
    pub ratios: Ratios,
    /// The idle baseline measured before each round (null if disabled with
    /// `--idle-baseline 0s` or `/proc/stat` is unreadable).
    #[serde(default)]
    pub idle_baselines: Option<Vec<IdleBaseline>>,
    /// Payload sweep only: the ratios of each size's targets.
    #[serde(default)]
    pub ratios_by_size: Option<Vec<SizeRatios>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeRatios {
    pub payload_bytes: usize,
    pub ratios: Ratios,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs this process may run on (what the load generator and the targets share).
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub memory_gib: Option<f64>,
    /// UTC, RFC 3339, when the run started.
    pub date: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptionsReport {
    pub config: String,
    pub targets: Vec<String>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub connections: usize,
    /// Intended requests per second (open loop), or null (closed loop).
    pub rate: Option<u64>,
    /// `closed` or `open`.
    #[serde(rename = "loop")]
    pub load_loop: String,
    /// Path requested on the started targets (URL targets use their own).
    pub path: String,
    pub method: String,
    pub payload_bytes: usize,
    /// Threads of the load generator's runtime.
    pub load_threads: usize,
    pub request_timeout_s: f64,
    /// Interleaved rounds: every target once per round, in order, then the next round.
    #[serde(default = "one")]
    pub rounds: usize,
    /// The sweep's generated body sizes, or null for one (literal) payload.
    #[serde(default)]
    pub payload_sizes: Option<Vec<usize>>,
    /// Body verification: each connection's responses 0, N, 2N, … are compared; 0: off.
    #[serde(default)]
    pub verify_every: Option<u64>,
    /// Where the expected body comes from: `check` (each target's first check response),
    /// `--expect-body` or `--expect-file PATH`.
    #[serde(default)]
    pub expect: Option<String>,
    /// Length of the idle baseline measured before each round; 0: none.
    #[serde(default)]
    pub idle_baseline_s: Option<f64>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
///
/// With several rounds, the entry for a target carries every round in `rounds` and, at the
/// top level, the **median** over the measured rounds of every rate, latency and
/// per-request figure (`rps`, `p*_us`, `max_us`, `mean_us`, `*_per_req`,
/// `sched_lateness_p99_us`, `softirq_share`), while counts are **totals** over the measured
/// rounds (`errors`, `error_kinds`, `requests`, `duration_s`, `cpu_s`, `verification`), so an
/// error in one round cannot vanish into a median. `processes`, `cdf`, `check` and `url` are
/// those of the round whose requests/s is closest to the median. `spread` gives min, max,
/// quartiles and standard deviation of the headline figures.
pub struct TargetReport {
    pub name: String,
    /// ceiling | userspace | sockmap | knative | url
    pub mode: String,
    /// Where the load went (null if the target never got an address).
    pub url: Option<String>,
    /// Successful (2xx) responses per second of the measured window.
    pub rps: Option<f64>,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    pub max_us: Option<u64>,
    pub mean_us: Option<f64>,
    pub errors: Option<u64>,
    pub error_kinds: Option<ErrorKinds>,
    /// Successful responses in the measured window.
    pub requests: Option<u64>,
    pub duration_s: Option<f64>,
    /// Open loop only: the rate asked for (rps is the rate achieved).
    pub intended_rps: Option<f64>,
    /// Open loop only: p99 over the measured requests of how late the load generator sent
    /// each one beyond the one timer tick (1 ms) left out of its latency, µs. This lateness
    /// *is* included in the latencies above; 0 means the load generator kept to its schedule.
    /// A large value means it was starved (e.g. of CPU by the target) and the tail is partly
    /// its own. Null in closed loop.
    pub sched_lateness_p99_us: Option<u64>,
    /// CPU seconds of the target's whole process tree per successful request.
    pub cpu_s_per_req: Option<f64>,
    pub cpu_s: Option<f64>,
    /// CPU seconds of the load generator (this process) per successful request.
    pub loadgen_cpu_s_per_req: Option<f64>,
    pub processes: Option<Vec<ProcessCpu>>,
    /// The pre-load check: the first response.
    pub check: Option<CheckSample>,
    /// Latency CDF of successful requests, for plots.
    pub cdf: Option<Vec<CdfPoint>>,
    /// Why the target was not measured, or null if it was.
    pub skipped: Option<String>,
    /// On an entry of `rounds`: which round (0-based); null on the per-target summary.
    #[serde(default)]
    pub round: Option<usize>,
    /// The request body's length.
    #[serde(default)]
    pub payload_bytes: Option<usize>,
    /// Whole-system CPU seconds per successful request: `/proc/stat` busy time of all CPUs
    /// (user+nice+system+irq+softirq) in the window, less the idle baseline's rate times the
    /// window, less the load generator's own CPU. Null without an idle baseline.
    #[serde(default)]
    pub system_cpu_s_per_req: Option<f64>,
    /// The softirq part of it (softirq less the baseline's softirq), per request.
    #[serde(default)]
    pub softirq_s_per_req: Option<f64>,
    /// Share of the window's (gross) busy time spent in softirq.
    #[serde(default)]
    pub softirq_share: Option<f64>,
    /// One round's whole-system accounting, every term (null on the summary).
    #[serde(default)]
    pub system_cpu: Option<SystemCpu>,
    /// Delta of the target's own `spindle_payload_bytes_copied_total` (summed over label sets)
    /// across the window, per successful request; null if the target does not expose it.
    #[serde(default)]
    pub bytes_copied_per_req: Option<f64>,
    /// Why `bytes_copied_per_req` is null.
    #[serde(default)]
    pub bytes_copied_note: Option<String>,
    #[serde(default)]
    pub verification: Option<Verification>,
    /// One round: seconds between the CPU readings at the window's edges. Every CPU figure
    /// per request is CPU per second of this interval over requests per second of the
    /// window, so a reading delayed by a loaded machine does not bias it.
    #[serde(default)]
    pub cpu_interval_s: Option<f64>,
    /// Summary only: median and spread of the headline figures over the measured rounds.
    #[serde(default)]
    pub spread: Option<TargetSpread>,
    /// Summary only: rounds that were measured (the others are skipped entries of `rounds`).
    #[serde(default)]
    pub rounds_measured: Option<usize>,
    /// Summary only: every round of this target, in order.
    #[serde(default)]
    pub rounds: Option<Vec<TargetReport>>,
}

/// Median, min–max, quartiles and standard deviation over rounds (null: no round had one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetSpread {
    pub rps: Option<Spread>,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub cpu_s_per_req: Option<Spread>,
    pub system_cpu_s_per_req: Option<Spread>,
    pub bytes_copied_per_req: Option<Spread>,
}

/// Response bodies compared with the expected one under load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// `check` (this target's first check response), `--expect-body` or `--expect-file PATH`.
    pub source: String,
    /// Each connection's responses 0, every, 2·every, … were compared.
    pub every: u64,
    pub expected_bytes: usize,
    /// Measured responses compared (matching or not).
    pub verified: u64,
    /// Of those, how many differed (also counted in `error_kinds.wrong_body`).
    pub wrong_body: u64,
    /// The first that differed.
    pub first_mismatch: Option<Mismatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub round: Option<usize>,
    /// Its full length.
    pub bytes: usize,
    /// Its first 200 bytes, lossy UTF-8.
    pub body: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorKinds {
    /// Answered, but not 2xx.
    pub status: u64,
    /// Could not connect (refused, reset, connect timeout).
    pub connect: u64,
    /// No complete response within the request timeout.
    pub timeout: u64,
    /// The connection failed mid-request.
    pub io: u64,
    /// 2xx, but the body differed from the expected one (body verification).
    #[serde(default)]
    pub wrong_body: u64,
}

impl ErrorKinds {
    pub fn total(&self) -> u64 {
        self.status + self.connect + self.timeout + self.io + self.wrong_body
    }

    pub(crate) fn add(&mut self, other: &ErrorKinds) {
        self.status += other.status;
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.io += other.io;
        self.wrong_body += other.wrong_body;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub pid: i32,
    /// The kernel's command name (at most 15 bytes).
    pub command: String,
    /// The full command line (e.g. which chain and function a worker runs); null if it could
    /// not be read.
    pub cmdline: Option<String>,
    /// CPU seconds in the measured window (a parent's figure includes children it reaped in
    /// the window); null for a process that exited during the window.
    pub cpu_s: Option<f64>,
    pub exited: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSample {
    pub status: u16,
    /// The response body (at most 200 bytes, lossy UTF-8).
    pub body: String,
    /// The whole body's length.
    #[serde(default)]
    pub bytes: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CdfPoint {
    /// Fraction of requests at or below `us`.
    pub q: f64,
    pub us: u64,
}

/// Side-by-side ratios, each null unless both targets ran and the ratio is defined.
/// `*_rps` keys are throughput ratios (higher: the first one serves more); `*_p99` keys
/// divide the baseline's p99 by Spindle's (higher: Spindle's tail is shorter); `*_cpu` keys
/// divide the baseline's CPU seconds per request by Spindle's (higher: Spindle spends less).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub spindle_userspace_over_knative_rps: Option<f64>,
    pub spindle_sockmap_over_knative_rps: Option<f64>,
    pub spindle_userspace_over_ceiling_rps: Option<f64>,
    pub spindle_sockmap_over_ceiling_rps: Option<f64>,
    pub spindle_sockmap_over_userspace_rps: Option<f64>,
    pub knative_over_spindle_userspace_p99: Option<f64>,
    pub knative_over_spindle_sockmap_p99: Option<f64>,
    pub knative_over_spindle_userspace_cpu: Option<f64>,
    pub knative_over_spindle_sockmap_cpu: Option<f64>,
    /// Whole-system CPU per request (`system_cpu_s_per_req`), Knative-style / Spindle.
    #[serde(default)]
    pub knative_over_spindle_userspace_system_cpu: Option<f64>,
    #[serde(default)]
    pub knative_over_spindle_sockmap_system_cpu: Option<f64>,
    /// CPU per request of Spindle over the ceiling's (how many times what a bare HTTP front
    /// costs); at equal load only in open loop (`--rate`), where every target gets the same
    /// requests per second.
    #[serde(default)]
    pub spindle_userspace_over_ceiling_cpu: Option<f64>,
    #[serde(default)]
    pub spindle_sockmap_over_ceiling_cpu: Option<f64>,
    #[serde(default)]
    pub spindle_userspace_over_ceiling_system_cpu: Option<f64>,
    #[serde(default)]
    pub spindle_sockmap_over_ceiling_system_cpu: Option<f64>,
    /// The same comparisons against each URL target (e.g. a real Knative service), in
    /// target order; null when there is no URL target.
    pub urls: Option<Vec<UrlRatios>>,
    /// Every ratio above (URL ones aside), computed per round from that round's two
    /// measurements, with its spread; keyed by the ratio's field name.
    #[serde(default)]
    pub per_round: Option<BTreeMap<String, PairedRatio>>,
}

/// One ratio, round by round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedRatio {
    /// Round i's numerator over round i's denominator (null: either was not measured).
    pub rounds: Vec<Option<f64>>,
    pub spread: Option<Spread>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Rps,
    P99,
    Cpu,
    SystemCpu,
}

impl Metric {
    fn of(self, t: &TargetReport) -> Option<f64> {
        if !t.ran() {
            return None;
        }
        match self {
            Metric::Rps => t.rps,
            Metric::P99 => t.p99_us.map(|v| v as f64),
            Metric::Cpu => t.cpu_s_per_req,
            Metric::SystemCpu => t.system_cpu_s_per_req,
        }
    }
}

/// Every built-in ratio: (field, numerator mode, denominator mode, figure).
const RATIOS: [(&str, &str, &str, Metric); 15] = [
    (
        "spindle_userspace_over_knative_rps",
        "userspace",
        "knative",
        Metric::Rps,
    ),
    (
        "spindle_sockmap_over_knative_rps",
        "sockmap",
        "knative",
        Metric::Rps,
    ),
    (
        "spindle_userspace_over_ceiling_rps",
        "userspace",
        "ceiling",
        Metric::Rps,
    ),
    (
        "spindle_sockmap_over_ceiling_rps",
        "sockmap",
        "ceiling",
        Metric::Rps,
    ),
    (
        "spindle_sockmap_over_userspace_rps",
        "sockmap",
        "userspace",
        Metric::Rps,
    ),
    (
        "knative_over_spindle_userspace_p99",
        "knative",
        "userspace",
        Metric::P99,
    ),
    (
        "knative_over_spindle_sockmap_p99",
        "knative",
        "sockmap",
        Metric::P99,
    ),
    (
        "knative_over_spindle_userspace_cpu",
        "knative",
        "userspace",
        Metric::Cpu,
    ),
    (
        "knative_over_spindle_sockmap_cpu",
        "knative",
        "sockmap",
        Metric::Cpu,
    ),
    (
        "knative_over_spindle_userspace_system_cpu",
        "knative",
        "userspace",
        Metric::SystemCpu,
    ),
    (
        "knative_over_spindle_sockmap_system_cpu",
        "knative",
        "sockmap",
        Metric::SystemCpu,
    ),
    (
        "spindle_userspace_over_ceiling_cpu",
        "userspace",
        "ceiling",
        Metric::Cpu,
    ),
    (
        "spindle_sockmap_over_ceiling_cpu",
        "sockmap",
        "ceiling",
        Metric::Cpu,
    ),
    (
        "spindle_userspace_over_ceiling_system_cpu",
        "userspace",
        "ceiling",
        Metric::SystemCpu,
    ),
    (
        "spindle_sockmap_over_ceiling_system_cpu",
        "sockmap",
        "ceiling",
        Metric::SystemCpu,
    ),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UrlRatios {
    pub url: String,
    pub spindle_userspace_over_url_rps: Option<f64>,
    pub spindle_sockmap_over_url_rps: Option<f64>,
    pub url_over_spindle_userspace_p99: Option<f64>,
    pub url_over_spindle_sockmap_p99: Option<f64>,
}

impl TargetReport {
    /// A target that was not measured: every measurement null, with the reason.
    pub fn skipped(target: &Target, url: Option<String>, reason: impl Into<String>) -> Self {
        TargetReport {
            name: target.display_name(),
            mode: target.mode().to_string(),
            url,
            rps: None,
            p50_us: None,
            p90_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            mean_us: None,
            errors: None,
            error_kinds: None,
            requests: None,
            duration_s: None,
            intended_rps: None,
            sched_lateness_p99_us: None,
            cpu_s_per_req: None,
            cpu_s: None,
            loadgen_cpu_s_per_req: None,
            processes: None,
            check: None,
            cdf: None,
            skipped: Some(reason.into()),
            round: None,
            payload_bytes: None,
            system_cpu_s_per_req: None,
            softirq_s_per_req: None,
            softirq_share: None,
            system_cpu: None,
            bytes_copied_per_req: None,
            bytes_copied_note: None,
            verification: None,
            cpu_interval_s: None,
            spread: None,
            rounds_measured: None,
            rounds: None,
        }
    }

    pub(crate) fn ran(&self) -> bool {
        self.skipped.is_none()
    }

    /// This target's rounds; a report without them (written by hand, or read from an older
    /// version's JSON) is its own single round.
    fn round_list(&self) -> Vec<&TargetReport> {
        match &self.rounds {
            Some(rounds) if !rounds.is_empty() => rounds.iter().collect(),
            _ => vec![self],
        }
    }

    /// The summary of one target's rounds (see [`TargetReport`] for which figure is a median,
    /// which a total). `rounds` must be non-empty and all of the same target.
    pub(crate) fn over_rounds(target: &Target, rounds: Vec<TargetReport>) -> TargetReport {
        let measured: Vec<&TargetReport> = rounds.iter().filter(|r| r.ran()).collect();
        let first = rounds.first();
        let payload_bytes = first.and_then(|r| r.payload_bytes);
        if measured.is_empty() {
            let mut t = TargetReport::skipped(
                target,
                first.and_then(|r| r.url.clone()),
                first
                    .and_then(|r| r.skipped.clone())
                    .unwrap_or_else(|| "not run".into()),
            );
            t.payload_bytes = payload_bytes;
            t.rounds_measured = Some(0);
            t.rounds = Some(rounds);
            return t;
        }
        let med = |f: &dyn Fn(&TargetReport) -> Option<f64>| {
            median_of(&measured.iter().map(|r| f(r)).collect::<Vec<_>>())
        };
        let med_u = |f: &dyn Fn(&TargetReport) -> Option<u64>| {
            med(&|r| f(r).map(|v| v as f64)).map(|v| v.round() as u64)
        };
        let spr = |f: &dyn Fn(&TargetReport) -> Option<f64>| {
            spread_of(&measured.iter().map(|r| f(r)).collect::<Vec<_>>())
        };
        let rps = med(&|r| r.rps);
        // The round closest to the median throughput stands for the others where a median
        // makes no sense (process list, CDF).
        let representative = measured
            .iter()
            .min_by(|a, b| {
                let d = |r: &TargetReport| (r.rps.unwrap_or(0.0) - rps.unwrap_or(0.0)).abs();
                d(a).total_cmp(&d(b))
            })
            .copied()
            .unwrap_or(measured[0]);
        let sum_u = |f: &dyn Fn(&TargetReport) -> Option<u64>| {
            measured.iter().map(|r| f(r)).sum::<Option<u64>>()
        };
        let sum_f = |f: &dyn Fn(&TargetReport) -> Option<f64>| {
            measured.iter().map(|r| f(r)).sum::<Option<f64>>()
        };
        let mut kinds: Option<ErrorKinds> = None;
        for k in measured.iter().filter_map(|r| r.error_kinds) {
            kinds.get_or_insert_with(ErrorKinds::default).add(&k);
        }
        let mut verification: Option<Verification> = None;
        for v in measured.iter().filter_map(|r| r.verification.as_ref()) {
            match &mut verification {
                None => verification = Some(v.clone()),
                Some(total) => {
                    total.verified += v.verified;
                    total.wrong_body += v.wrong_body;
                    if total.first_mismatch.is_none() {
                        total.first_mismatch = v.first_mismatch.clone();
                    }
                }
            }
        }
        let bytes_copied_per_req = med(&|r| r.bytes_copied_per_req);
        TargetReport {
            name: target.display_name(),
            mode: target.mode().to_string(),
            url: representative.url.clone(),
            rps: rps.map(round1),
            p50_us: med_u(&|r| r.p50_us),
            p90_us: med_u(&|r| r.p90_us),
            p99_us: med_u(&|r| r.p99_us),
            p999_us: med_u(&|r| r.p999_us),
            max_us: med_u(&|r| r.max_us),
            mean_us: med(&|r| r.mean_us).map(round1),
            errors: sum_u(&|r| r.errors),
            error_kinds: kinds,
            requests: sum_u(&|r| r.requests),
            duration_s: sum_f(&|r| r.duration_s),
            intended_rps: representative.intended_rps,
            sched_lateness_p99_us: med_u(&|r| r.sched_lateness_p99_us),
            cpu_s_per_req: med(&|r| r.cpu_s_per_req),
            cpu_s: sum_f(&|r| r.cpu_s),
            loadgen_cpu_s_per_req: med(&|r| r.loadgen_cpu_s_per_req),
            processes: representative.processes.clone(),
            check: representative.check.clone(),
            cdf: representative.cdf.clone(),
            skipped: None,
            round: None,
            payload_bytes,
            system_cpu_s_per_req: med(&|r| r.system_cpu_s_per_req),
            softirq_s_per_req: med(&|r| r.softirq_s_per_req),
            softirq_share: med(&|r| r.softirq_share),
            system_cpu: None,
            bytes_copied_per_req,
            bytes_copied_note: bytes_copied_per_req
                .is_none()
                .then(|| measured.iter().find_map(|r| r.bytes_copied_note.clone()))
                .flatten(),
            verification,
            cpu_interval_s: None,
            spread: Some(TargetSpread {
                rps: spr(&|r| r.rps),
                p50_us: spr(&|r| r.p50_us.map(|v| v as f64)),
                p99_us: spr(&|r| r.p99_us.map(|v| v as f64)),
                cpu_s_per_req: spr(&|r| r.cpu_s_per_req),
                system_cpu_s_per_req: spr(&|r| r.system_cpu_s_per_req),
                bytes_copied_per_req: spr(&|r| r.bytes_copied_per_req),
            }),
            rounds_measured: Some(measured.len()),
            rounds: Some(rounds.clone()),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(round(a / b, 3)),
        _ => None,
    }
}

impl Ratios {
    /// The ratios of the first measured target of each mode (a list may name one twice),
    /// from their summary figures (medians over rounds), and per round.
    pub fn compute(targets: &[TargetReport]) -> Ratios {
        let find = |mode: &str| targets.iter().find(|t| t.mode == mode && t.ran());
        let value = |mode: &str, m: Metric| find(mode).and_then(|t| m.of(t));
        let rps = |mode: &str| value(mode, Metric::Rps);
        let p99 = |mode: &str| value(mode, Metric::P99);
        let mut by_name: BTreeMap<&str, Option<f64>> = BTreeMap::new();
        let mut per_round = BTreeMap::new();
        for (name, num, den, metric) in RATIOS {
            by_name.insert(name, ratio(value(num, metric), value(den, metric)));
            let rounds = |mode: &str| -> Vec<Option<f64>> {
                find(mode).map_or(Vec::new(), |t| {
                    t.round_list().into_iter().map(|r| metric.of(r)).collect()
                })
            };
            let paired: Vec<Option<f64>> = paired_ratios(&rounds(num), &rounds(den))
                .into_iter()
                .map(|r| r.map(|v| round(v, 3)))
                .collect();
            if paired.iter().any(Option::is_some) {
                per_round.insert(
                    name.to_string(),
                    PairedRatio {
                        spread: spread_of(&paired),
                        rounds: paired,
                    },
                );
            }
        }
        let get = |name: &str| by_name.get(name).copied().flatten();
        let urls: Vec<UrlRatios> = targets
            .iter()
            .filter(|t| t.mode == "url")
            .map(|t| {
                let (url_rps, url_p99) = if t.ran() {
                    (t.rps, t.p99_us.map(|v| v as f64))
                } else {
                    (None, None)
                };
                UrlRatios {
                    url: t.name.clone(),
                    spindle_userspace_over_url_rps: ratio(rps("userspace"), url_rps),
                    spindle_sockmap_over_url_rps: ratio(rps("sockmap"), url_rps),
                    url_over_spindle_userspace_p99: ratio(url_p99, p99("userspace")),
                    url_over_spindle_sockmap_p99: ratio(url_p99, p99("sockmap")),
                }
            })
            .collect();
        Ratios {
            spindle_userspace_over_knative_rps: get("spindle_userspace_over_knative_rps"),
            spindle_sockmap_over_knative_rps: get("spindle_sockmap_over_knative_rps"),
            spindle_userspace_over_ceiling_rps: get("spindle_userspace_over_ceiling_rps"),
            spindle_sockmap_over_ceiling_rps: get("spindle_sockmap_over_ceiling_rps"),
            spindle_sockmap_over_userspace_rps: get("spindle_sockmap_over_userspace_rps"),
            knative_over_spindle_userspace_p99: get("knative_over_spindle_userspace_p99"),
            knative_over_spindle_sockmap_p99: get("knative_over_spindle_sockmap_p99"),
            knative_over_spindle_userspace_cpu: get("knative_over_spindle_userspace_cpu"),
            knative_over_spindle_sockmap_cpu: get("knative_over_spindle_sockmap_cpu"),
            knative_over_spindle_userspace_system_cpu: get(
                "knative_over_spindle_userspace_system_cpu",
            ),
            knative_over_spindle_sockmap_system_cpu: get("knative_over_spindle_sockmap_system_cpu"),
            spindle_userspace_over_ceiling_cpu: get("spindle_userspace_over_ceiling_cpu"),
            spindle_sockmap_over_ceiling_cpu: get("spindle_sockmap_over_ceiling_cpu"),
            spindle_userspace_over_ceiling_system_cpu: get(
                "spindle_userspace_over_ceiling_system_cpu",
            ),
            spindle_sockmap_over_ceiling_system_cpu: get("spindle_sockmap_over_ceiling_system_cpu"),
            urls: (!urls.is_empty()).then_some(urls),
            per_round: (!per_round.is_empty()).then_some(per_round),
        }
    }

    /// (label, value, field name) in display order, for Markdown. `rate`: the open loop's
    /// rate, under which CPU ratios against the ceiling are at equal load.
    fn lines(&self, rate: Option<u64>) -> Vec<(String, Option<f64>, Option<&'static str>)> {
        let load = match rate {
            Some(r) => format!("at equal load ({} req/s)", thousands(r)),
            None => "at each one's saturation (closed loop: not equal load)".to_string(),
        };
        let label = |name: &str| -> String {
            match name {
                "spindle_userspace_over_knative_rps" => {
                    "Spindle userspace / Knative-style, throughput".into()
                }
                "spindle_sockmap_over_knative_rps" => {
                    "Spindle sockmap / Knative-style, throughput".into()
                }
                "spindle_userspace_over_ceiling_rps" => {
                    "Spindle userspace / ceiling, throughput".into()
                }
                "spindle_sockmap_over_ceiling_rps" => {
                    "Spindle sockmap / ceiling, throughput".into()
                }
                "spindle_sockmap_over_userspace_rps" => {
                    "Spindle sockmap / Spindle userspace, throughput".into()
                }
                "knative_over_spindle_userspace_p99" => {
                    "Knative-style / Spindle userspace, p99 latency".into()
                }
                "knative_over_spindle_sockmap_p99" => {
                    "Knative-style / Spindle sockmap, p99 latency".into()
                }
                "knative_over_spindle_userspace_cpu" => {
                    "Knative-style / Spindle userspace, CPU per request".into()
                }
                "knative_over_spindle_sockmap_cpu" => {
                    "Knative-style / Spindle sockmap, CPU per request".into()
                }
                "knative_over_spindle_userspace_system_cpu" => {
                    "Knative-style / Spindle userspace, system CPU per request".into()
                }
                "knative_over_spindle_sockmap_system_cpu" => {
                    "Knative-style / Spindle sockmap, system CPU per request".into()
                }
                "spindle_userspace_over_ceiling_cpu" => {
                    format!("Spindle userspace / ceiling, CPU per request {load}")
                }
                "spindle_sockmap_over_ceiling_cpu" => {
                    format!("Spindle sockmap / ceiling, CPU per request {load}")
                }
                "spindle_userspace_over_ceiling_system_cpu" => {
                    format!("Spindle userspace / ceiling, system CPU per request {load}")
                }
                "spindle_sockmap_over_ceiling_system_cpu" => {
                    format!("Spindle sockmap / ceiling, system CPU per request {load}")
                }
                other => other.to_string(),
            }
        };
        let value = |name: &str| -> Option<f64> {
            match name {
                "spindle_userspace_over_knative_rps" => self.spindle_userspace_over_knative_rps,
                "spindle_sockmap_over_knative_rps" => self.spindle_sockmap_over_knative_rps,
                "spindle_userspace_over_ceiling_rps" => self.spindle_userspace_over_ceiling_rps,
                "spindle_sockmap_over_ceiling_rps" => self.spindle_sockmap_over_ceiling_rps,
                "spindle_sockmap_over_userspace_rps" => self.spindle_sockmap_over_userspace_rps,
                "knative_over_spindle_userspace_p99" => self.knative_over_spindle_userspace_p99,
                "knative_over_spindle_sockmap_p99" => self.knative_over_spindle_sockmap_p99,
                "knative_over_spindle_userspace_cpu" => self.knative_over_spindle_userspace_cpu,
                "knative_over_spindle_sockmap_cpu" => self.knative_over_spindle_sockmap_cpu,
                "knative_over_spindle_userspace_system_cpu" => {
                    self.knative_over_spindle_userspace_system_cpu
                }
                "knative_over_spindle_sockmap_system_cpu" => {
                    self.knative_over_spindle_sockmap_system_cpu
                }
                "spindle_userspace_over_ceiling_cpu" => self.spindle_userspace_over_ceiling_cpu,
                "spindle_sockmap_over_ceiling_cpu" => self.spindle_sockmap_over_ceiling_cpu,
                "spindle_userspace_over_ceiling_system_cpu" => {
                    self.spindle_userspace_over_ceiling_system_cpu
                }
                "spindle_sockmap_over_ceiling_system_cpu" => {
                    self.spindle_sockmap_over_ceiling_system_cpu
                }
                _ => None,
            }
        };
        let mut lines: Vec<(String, Option<f64>, Option<&'static str>)> = RATIOS
            .iter()
            .map(|(name, ..)| (label(name), value(name), Some(*name)))
            .collect();
        for u in self.urls.iter().flatten() {
            lines.push((
                format!("Spindle userspace / {}, throughput", u.url),
                u.spindle_userspace_over_url_rps,
                None,
            ));
            lines.push((
                format!("Spindle sockmap / {}, throughput", u.url),
                u.spindle_sockmap_over_url_rps,
                None,
            ));
            lines.push((
                format!("{} / Spindle userspace, p99 latency", u.url),
                u.url_over_spindle_userspace_p99,
                None,
            ));
            lines.push((
                format!("{} / Spindle sockmap, p99 latency", u.url),
                u.url_over_spindle_sockmap_p99,
                None,
            ));
        }
        lines
    }
}

impl OptionsReport {
    pub(crate) fn new(opts: &BenchOptions, path: &str, load_threads: usize) -> OptionsReport {
        OptionsReport {
            config: opts.config.display().to_string(),
            targets: opts.targets.iter().map(|t| t.to_string()).collect(),
            duration_s: opts.duration.as_secs_f64(),
            warmup_s: opts.warmup.as_secs_f64(),
            connections: opts.connections,
            rate: opts.rate,
            load_loop: if opts.rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .into(),
            path: path.to_string(),
            method: "POST".into(),
            payload_bytes: opts
                .payload_sizes
                .as_ref()
                .and_then(|s| s.first().copied())
                .unwrap_or(opts.payload.len()),
            load_threads,
            request_timeout_s: crate::REQUEST_TIMEOUT.as_secs_f64(),
            rounds: opts.rounds,
            payload_sizes: opts.payload_sizes.clone(),
            verify_every: Some(opts.verify_every),
            expect: Some(match &opts.expect {
                None => "check".to_string(),
                Some(crate::Expect::Body(_)) => "--expect-body".to_string(),
                Some(crate::Expect::File(path)) => format!("--expect-file {}", path.display()),
            }),
            idle_baseline_s: Some(opts.idle_baseline.as_secs_f64()),
        }
    }
}

impl Machine {
    /// This machine, now.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name") || l.starts_with("Model"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string());
        let memory_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(round(kib / (1024.0 * 1024.0), 1))
        });
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            memory_gib,
            date: rfc3339_utc(std::time::SystemTime::now()),
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "{} cores, {}, Linux {}, {} GiB, {}",
            self.cores,
            self.cpu_model.as_deref().unwrap_or("unknown CPU"),
            self.kernel.as_deref().unwrap_or("unknown"),
            self.memory_gib.map_or("?".into(), |m| format!("{m}")),
            self.date
        )
    }
}

/// `2026-11-26T10:03:12Z`, without a date-time crate.
pub(crate) fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// 136706 → "136,706".
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        let mut json = serde_json::to_string_pretty(self).unwrap_or_default();
        json.push('\n');
        json
    }

    /// The table, the ratios and the machine, as Markdown. With several rounds a cell is
    /// `median [min–max]`.
    pub fn to_markdown(&self) -> String {
        let o = &self.options;
        let load = match o.rate {
            Some(rate) => format!("open loop at {} req/s", thousands(rate)),
            None => "closed loop".to_string(),
        };
        let sweep = o.payload_sizes.as_ref().is_some_and(|s| s.len() > 1);
        let body = match (&o.payload_sizes, sweep) {
            (Some(sizes), true) => format!(
                "generated bodies of {}",
                sizes
                    .iter()
                    .map(|&n| human_bytes(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!("{} bytes", o.payload_bytes),
        };
        let mut md = String::new();
        md.push_str("## spindle bench\n\n");
        md.push_str(&format!("Machine: {}\n\n", self.machine.line()));
        md.push_str(&format!(
            "Load: {load}, {} connections, {} s measured after {} s warm-up, {} {} ({body}), \
             {} load-generator threads",
            o.connections, o.duration_s, o.warmup_s, o.method, o.path, o.load_threads
        ));
        if o.rounds > 1 {
            md.push_str(&format!(
                ", {} interleaved rounds (cells: median [min–max] over rounds)",
                o.rounds
            ));
        }
        md.push_str("\n\n");
        if sweep {
            self.sweep_table(&mut md);
        } else {
            self.main_table(&mut md);
        }
        let skipped: Vec<&TargetReport> = self
            .targets
            .iter()
            .filter(|t| t.skipped.is_some())
            .collect();
        if !skipped.is_empty() {
            md.push_str("\nSkipped:\n");
            for t in skipped {
                let reason = t.skipped.as_deref().unwrap_or_default();
                let mut lines = reason.lines();
                md.push_str(&format!(
                    "- {}{}: {}\n",
                    t.name,
                    size_suffix(t, sweep),
                    lines.next().unwrap_or("")
                ));
                let rest: Vec<&str> = lines.collect();
                if !rest.is_empty() {
                    md.push_str("  ```\n");
                    for l in rest {
                        md.push_str(&format!("  {l}\n"));
                    }
                    md.push_str("  ```\n");
                }
            }
        }
        let partial: Vec<String> = self
            .targets
            .iter()
            .filter(|t| t.ran())
            .filter_map(|t| {
                let (n, all) = (t.rounds_measured?, t.rounds.as_ref()?.len());
                (n < all).then(|| {
                    let why = t
                        .rounds
                        .iter()
                        .flatten()
                        .find_map(|r| r.skipped.as_deref())
                        .and_then(|r| r.lines().next())
                        .unwrap_or("");
                    format!(
                        "- {}{}: {n} of {all} rounds measured ({why})\n",
                        t.name,
                        size_suffix(t, sweep)
                    )
                })
            })
            .collect();
        if !partial.is_empty() {
            md.push_str("\nRounds missing (figures are over the measured ones):\n");
            md.extend(partial);
        }
        self.verification_notes(&mut md, sweep);
        self.system_cpu_notes(&mut md, sweep);
        md.push_str("\nRatios (same run, same machine");
        if o.rounds > 1 {
            md.push_str("; of the medians, then [min–max] of the ratio paired round by round");
        }
        md.push_str("):\n");
        let defined: Vec<(String, f64, Option<&'static str>)> = self
            .ratios
            .lines(o.rate)
            .into_iter()
            .filter_map(|(label, value, key)| Some((label, value?, key)))
            .collect();
        if defined.is_empty() {
            md.push_str("- none: a ratio needs Spindle and a baseline measured in the same run\n");
        }
        for (label, value, key) in defined {
            let paired = key
                .and_then(|k| self.ratios.per_round.as_ref()?.get(k))
                .and_then(|p| p.spread.as_ref())
                .filter(|s| s.n > 1);
            match paired {
                Some(s) => md.push_str(&format!(
                    "- {label}: {value:.2} [{:.2}–{:.2} over {} rounds]\n",
                    s.min, s.max, s.n
                )),
                None => md.push_str(&format!("- {label}: {value:.2}\n")),
            }
        }
        for by_size in self.ratios_by_size.iter().flatten().skip(1) {
            let defined: Vec<String> = by_size
                .ratios
                .lines(o.rate)
                .into_iter()
                .filter_map(|(label, value, _)| Some(format!("{label}: {:.2}", value?)))
                .collect();
            if !defined.is_empty() {
                md.push_str(&format!(
                    "- at {}: {}\n",
                    human_bytes(by_size.payload_bytes),
                    defined.join("; ")
                ));
            }
        }
        if o.rate.is_some() {
            md.push_str("\nOpen loop: latency counts from each request's scheduled send time (less at most 1 ms of the load generator's own timer lateness), so queueing behind a slow response is included.\n");
            let late: Vec<String> = self
                .targets
                .iter()
                .filter_map(|t| match t.sched_lateness_p99_us {
                    Some(us) if us > 0 => Some(format!("{} {} µs", t.name, thousands(us))),
                    _ => None,
                })
                .collect();
            if !late.is_empty() {
                md.push_str(&format!(
                    "The load generator sent late beyond that (p99, included in the latencies above): {}.\n",
                    late.join(", ")
                ));
            }
        } else {
            md.push_str("\nClosed loop: each connection sends only after its previous response, so latency differences between targets largely restate their throughput differences (Little's law: latency ≈ connections / throughput); open loop (`--rate`) compares tails at equal offered load.\n");
        }
        md
    }

    fn main_table(&self, md: &mut String) {
        md.push_str(
            "| target | mode | requests/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | CPU µs/request | system CPU µs/request | load-gen CPU µs/request |\n",
        );
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let num = |v: Option<u64>| v.map_or("–".to_string(), thousands);
        for t in &self.targets {
            if t.skipped.is_some() {
                md.push_str(&format!(
                    "| {} | {} | skipped | | | | | | | | |\n",
                    t.name, t.mode
                ));
                continue;
            }
            let sp = t.spread.clone().unwrap_or_default();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                t.mode,
                cell(t.rps, sp.rps.as_ref(), &|v| thousands(v.round() as u64)),
                cell(t.p50_us.map(|v| v as f64), sp.p50_us.as_ref(), &|v| {
                    thousands(v.round() as u64)
                }),
                num(t.p90_us),
                cell(t.p99_us.map(|v| v as f64), sp.p99_us.as_ref(), &|v| {
                    thousands(v.round() as u64)
                }),
                num(t.p999_us),
                num(t.errors),
                cell(t.cpu_s_per_req, sp.cpu_s_per_req.as_ref(), &micros),
                cell(
                    t.system_cpu_s_per_req,
                    sp.system_cpu_s_per_req.as_ref(),
                    &micros
                ),
                t.loadgen_cpu_s_per_req.map_or("–".into(), micros),
            ));
        }
    }

    fn sweep_table(&self, md: &mut String) {
        md.push_str(
            "| payload | target | requests/s | p99 µs | CPU µs/request | system CPU µs/request | bytes copied/request | errors |\n",
        );
        md.push_str("|---:|---|---:|---:|---:|---:|---:|---:|\n");
        for t in &self.targets {
            let size = t.payload_bytes.map_or("?".into(), human_bytes);
            if let Some(reason) = &t.skipped {
                md.push_str(&format!(
                    "| {size} | {} | {} | | | | | |\n",
                    t.name,
                    reason
                        .lines()
                        .next()
                        .unwrap_or("skipped")
                        .replace('|', "\\|")
                ));
                continue;
            }
            let sp = t.spread.clone().unwrap_or_default();
            md.push_str(&format!(
                "| {size} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                cell(t.rps, sp.rps.as_ref(), &|v| thousands(v.round() as u64)),
                cell(t.p99_us.map(|v| v as f64), sp.p99_us.as_ref(), &|v| {
                    thousands(v.round() as u64)
                }),
                cell(t.cpu_s_per_req, sp.cpu_s_per_req.as_ref(), &micros),
                cell(
                    t.system_cpu_s_per_req,
                    sp.system_cpu_s_per_req.as_ref(),
                    &micros
                ),
                match t.bytes_copied_per_req {
                    Some(_) => cell(
                        t.bytes_copied_per_req,
                        sp.bytes_copied_per_req.as_ref(),
                        &|v| thousands(v.round() as u64),
                    ),
                    None => "not exposed".into(),
                },
                t.errors.map_or("–".into(), thousands),
            ));
        }
    }

    fn verification_notes(&self, md: &mut String, sweep: bool) {
        let notes: Vec<String> = self
            .targets
            .iter()
            .filter(|t| t.ran())
            .filter_map(|t| {
                let v = t.verification.as_ref()?;
                let mut line = format!(
                    "- {}{}: {} responses compared with the expected {} bytes (from {}), {} wrong\n",
                    t.name,
                    size_suffix(t, sweep),
                    thousands(v.verified),
                    thousands(v.expected_bytes as u64),
                    v.source,
                    thousands(v.wrong_body)
                );
                if let Some(m) = &v.first_mismatch {
                    line.push_str(&format!(
                        "  first wrong body ({}{} bytes): `{}`\n",
                        m.round.map_or(String::new(), |r| format!("round {}, ", r + 1)),
                        thousands(m.bytes as u64),
                        m.body.replace('`', "'").replace('\n', "\\n")
                    ));
                }
                Some(line)
            })
            .collect();
        if notes.is_empty() {
            return;
        }
        let every = self.options.verify_every.unwrap_or(0);
        md.push_str(&format!(
            "\nBody verification ({}, counted per connection; a mismatch is a `wrong_body` error):\n",
            match every {
                1 => "every response".to_string(),
                n => format!("the first response of each connection and every {n}th after it"),
            }
        ));
        md.extend(notes);
    }

    fn system_cpu_notes(&self, md: &mut String, sweep: bool) {
        let Some(baselines) = self.idle_baselines.as_ref().filter(|b| !b.is_empty()) else {
            md.push_str("\nSystem CPU: not measured (no idle baseline: `--idle-baseline 0s`, or /proc/stat unreadable).\n");
            return;
        };
        let rates: Vec<String> = baselines
            .iter()
            .map(|b| format!("{:.3}", b.busy_cpu_per_s))
            .collect();
        md.push_str(&format!(
            "\nSystem CPU = /proc/stat busy time of all CPUs (user+nice+system+irq+softirq; steal \
             excluded) in the window, less the idle baseline ({} s with no target before each \
             round: {} CPU-s/s) times the window, less the load generator's own CPU.\n",
            round(baselines[0].duration_s, 1),
            rates.join(", ")
        ));
        // The subtraction assumes the background is steady and small; on a machine already
        // busy with something else it is neither, and the net figure is noise (or negative).
        let busiest = baselines
            .iter()
            .map(|b| b.busy_cpu_per_s)
            .fold(0.0, f64::max);
        let cores = self.machine.cores.max(1) as f64;
        if busiest > 0.25 * cores {
            md.push_str(&format!(
                "**Warning:** the machine was not idle (baseline up to {busiest:.2} CPU-s/s of \
                 {cores} cores): the system CPU figures are unreliable; measure on a quiet machine.\n"
            ));
        }
        let softirq: Vec<String> = self
            .targets
            .iter()
            .filter(|t| t.ran())
            .filter_map(|t| {
                Some(format!(
                    "{}{} {:.0}% ({} µs/request net)",
                    t.name,
                    size_suffix(t, sweep),
                    t.softirq_share? * 100.0,
                    t.softirq_s_per_req.map_or("–".into(), micros)
                ))
            })
            .collect();
        if !softirq.is_empty() {
            md.push_str(&format!(
                "Softirq share of the window's busy time: {}.\n",
                softirq.join(", ")
            ));
        }
        let steal: f64 = self
            .targets
            .iter()
            .flat_map(|t| t.rounds.iter().flatten())
            .filter_map(|r| r.system_cpu.as_ref().map(|s| s.steal_s))
            .sum();
        if steal > 0.05 {
            md.push_str(&format!(
                "Steal time over all windows: {steal:.2} CPU-s (the host was contended).\n"
            ));
        }
        if !sweep {
            let copied: Vec<String> = self
                .targets
                .iter()
                .filter(|t| t.ran())
                .filter_map(|t| {
                    t.bytes_copied_per_req
                        .map(|b| format!("{} {}", t.name, thousands(b.round() as u64)))
                })
                .collect();
            if !copied.is_empty() {
                md.push_str(&format!(
                    "Payload bytes copied per request (the target's own counter): {}.\n",
                    copied.join(", ")
                ));
            }
        }
    }
}

fn micros(s: f64) -> String {
    format!("{:.1}", s * 1e6)
}

/// `value` formatted, followed by ` [min–max]` when more than one round measured it.
fn cell(value: Option<f64>, spread: Option<&Spread>, fmt: &dyn Fn(f64) -> String) -> String {
    let Some(v) = value else {
        return "–".into();
    };
    match spread.filter(|s| s.n > 1) {
        Some(s) => format!("{} [{}–{}]", fmt(v), fmt(s.min), fmt(s.max)),
        None => fmt(v),
    }
}

fn size_suffix(t: &TargetReport, sweep: bool) -> String {
    match (sweep, t.payload_bytes) {
        (true, Some(n)) => format!(" at {}", human_bytes(n)),
        _ => String::new(),
    }
}

/// 13 → "13 B", 4096 → "4 KiB", 1572864 → "1.5 MiB".
pub(crate) fn human_bytes(n: usize) -> String {
    const UNITS: [(&str, usize); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} B")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn measured(target: &Target, rps: f64, p99: u64) -> TargetReport {
        TargetReport {
            rps: Some(rps),
            p50_us: Some(p99 / 4),
            p90_us: Some(p99 / 2),
            p99_us: Some(p99),
            p999_us: Some(p99 * 2),
            max_us: Some(p99 * 3),
            mean_us: Some(p99 as f64 / 3.0),
            errors: Some(0),
            error_kinds: Some(ErrorKinds::default()),
            requests: Some((rps * 10.0) as u64),
            duration_s: Some(10.0),
            intended_rps: None,
            cpu_s_per_req: (!matches!(target, Target::Url(_))).then_some(2.31e-5),
            cpu_s: (!matches!(target, Target::Url(_))).then_some(12.5),
            loadgen_cpu_s_per_req: Some(1.0e-5),
            system_cpu_s_per_req: Some(3.0e-5),
            processes: (!matches!(target, Target::Url(_))).then(|| {
                vec![ProcessCpu {
                    pid: 4242,
                    command: "spindle".into(),
                    cmdline: Some("spindle run configs/hello.yaml".into()),
                    cpu_s: Some(12.0),
                    exited: false,
                }]
            }),
            check: Some(CheckSample {
                status: 200,
                body: "{\"result\":\"ELDNIPS OLLEH\",\"bytes\":13}".into(),
                bytes: Some(36),
            }),
            cdf: Some(vec![
                CdfPoint {
                    q: 0.0,
                    us: p99 / 8,
                },
                CdfPoint {
                    q: 0.5,
                    us: p99 / 4,
                },
                CdfPoint { q: 0.99, us: p99 },
                CdfPoint {
                    q: 1.0,
                    us: p99 * 3,
                },
            ]),
            skipped: None,
            ..TargetReport::skipped(target, Some("http://127.0.0.1:1/hello".into()), "")
        }
    }

    pub(crate) fn synthetic() -> Report {
        let targets = vec![
            measured(&Target::Ceiling, 136_706.0, 3_190),
            measured(&Target::Userspace, 56_209.0, 1_100),
            TargetReport::skipped(
                &Target::Sockmap,
                Some("http://127.0.0.1:40001/hello".into()),
                "exited with status 1 before it was ready:\nerror: loading the sk_msg program: Operation not permitted",
            ),
            TargetReport {
                cpu_s_per_req: Some(6.93e-5),
                ..measured(&Target::Knative, 20_000.0, 4_400)
            },
            measured(
                &Target::Url("http://hello.default.example.com/".into()),
                10_000.0,
                8_800,
            ),
        ];
        let opts = BenchOptions::default();
        Report {
            machine: Machine {
                cores: 2,
                cpu_model: Some("Intel Xeon".into()),
                kernel: Some("6.18.44".into()),
                memory_gib: Some(23.4),
                date: "2026-11-26T10:00:00Z".into(),
            },
            options: OptionsReport::new(&opts, "/hello", 2),
            ratios: Ratios::compute(&targets),
            targets,
            idle_baselines: None,
            ratios_by_size: None,
        }
    }

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn json_has_every_field_with_stable_names_and_explicit_nulls() {
        let report = synthetic();
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        // The original four, and what later versions added (never renamed).
        assert_eq!(
            keys(&v),
            [
                "idle_baselines",
                "machine",
                "options",
                "ratios",
                "ratios_by_size",
                "targets"
            ]
        );
        assert_eq!(
            keys(&v["machine"]),
            ["cores", "cpu_model", "date", "kernel", "memory_gib"]
        );
        assert_eq!(v["options"]["loop"], "closed");
        assert_eq!(v["options"]["rate"], serde_json::Value::Null);
        assert_eq!(v["options"]["targets"][2], "sockmap");
        let expected_target_keys = [
            "bytes_copied_note",
            "bytes_copied_per_req",
            "cdf",
            "check",
            "cpu_interval_s",
            "cpu_s",
            "cpu_s_per_req",
            "duration_s",
            "error_kinds",
            "errors",
            "intended_rps",
            "loadgen_cpu_s_per_req",
            "max_us",
            "mean_us",
            "mode",
            "name",
            "p50_us",
            "p90_us",
            "p999_us",
            "p99_us",
            "payload_bytes",
            "processes",
            "requests",
            "round",
            "rounds",
            "rounds_measured",
            "rps",
            "sched_lateness_p99_us",
            "skipped",
            "softirq_s_per_req",
            "softirq_share",
            "spread",
            "system_cpu",
            "system_cpu_s_per_req",
            "url",
            "verification",
        ];
        let targets = v["targets"].as_array().unwrap();
        for t in targets {
            assert_eq!(keys(t), expected_target_keys);
        }
        let names: Vec<&str> = targets
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "hyper hello-world (ceiling)",
                "Spindle userspace",
                "Spindle sockmap",
                "Knative-style baseline",
                "http://hello.default.example.com/"
            ]
        );
        let modes: Vec<&str> = targets
            .iter()
            .map(|t| t["mode"].as_str().unwrap())
            .collect();
        assert_eq!(modes, ["ceiling", "userspace", "sockmap", "knative", "url"]);
        // Skipped: the reason, and null (not absent, not 0) for every measurement.
        let sockmap = &targets[2];
        assert!(
            sockmap["skipped"]
                .as_str()
                .unwrap()
                .contains("Operation not permitted")
        );
        for field in [
            "rps",
            "p50_us",
            "p99_us",
            "errors",
            "cpu_s_per_req",
            "processes",
        ] {
            assert!(sockmap[field].is_null(), "{field}");
        }
        // Measured: numbers, `skipped` null; a URL has no CPU accounting.
        assert!(targets[1]["skipped"].is_null());
        assert_eq!(targets[1]["p99_us"], 1100);
        assert_eq!(targets[1]["processes"][0]["command"], "spindle");
        assert!(targets[4]["cpu_s_per_req"].is_null());
        assert!(targets[4]["processes"].is_null());
        assert!(targets[4]["rps"].is_number());

        let r = &v["ratios"];
        assert_eq!(
            keys(r),
            [
                "knative_over_spindle_sockmap_cpu",
                "knative_over_spindle_sockmap_p99",
                "knative_over_spindle_sockmap_system_cpu",
                "knative_over_spindle_userspace_cpu",
                "knative_over_spindle_userspace_p99",
                "knative_over_spindle_userspace_system_cpu",
                "per_round",
                "spindle_sockmap_over_ceiling_cpu",
                "spindle_sockmap_over_ceiling_rps",
                "spindle_sockmap_over_ceiling_system_cpu",
                "spindle_sockmap_over_knative_rps",
                "spindle_sockmap_over_userspace_rps",
                "spindle_userspace_over_ceiling_cpu",
                "spindle_userspace_over_ceiling_rps",
                "spindle_userspace_over_ceiling_system_cpu",
                "spindle_userspace_over_knative_rps",
                "urls"
            ]
        );
        assert_eq!(r["spindle_userspace_over_knative_rps"], 2.81);
        assert_eq!(r["spindle_userspace_over_ceiling_rps"], 0.411);
        assert_eq!(r["knative_over_spindle_userspace_p99"], 4.0);
        assert_eq!(r["knative_over_spindle_userspace_cpu"], 3.0);
        // Closed loop: no scheduling lateness.
        assert!(targets[1]["sched_lateness_p99_us"].is_null());
        // sockmap was skipped: every ratio involving it is null.
        assert!(r["spindle_sockmap_over_knative_rps"].is_null());
        assert!(r["spindle_sockmap_over_ceiling_rps"].is_null());
        assert!(r["knative_over_spindle_sockmap_p99"].is_null());
        assert!(r["knative_over_spindle_sockmap_cpu"].is_null());
        assert_eq!(r["urls"][0]["spindle_userspace_over_url_rps"], 5.621);
        assert_eq!(r["urls"][0]["url_over_spindle_userspace_p99"], 8.0);
        assert!(r["urls"][0]["spindle_sockmap_over_url_rps"].is_null());

        // Round trip: the JSON is the Report.
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn ratios_are_null_without_their_targets() {
        let only_ceiling = vec![measured(&Target::Ceiling, 100.0, 10)];
        let r = Ratios::compute(&only_ceiling);
        assert_eq!(r.spindle_userspace_over_ceiling_rps, None);
        assert_eq!(r.urls, None);
        // A target that ran but served nothing makes a ratio undefined, not infinite.
        let mut knative = measured(&Target::Knative, 0.0, 10);
        knative.p99_us = None;
        knative.cpu_s_per_req = None;
        let r = Ratios::compute(&[measured(&Target::Userspace, 50.0, 10), knative]);
        assert_eq!(r.spindle_userspace_over_knative_rps, None);
        assert_eq!(r.knative_over_spindle_userspace_p99, None);
        assert_eq!(r.knative_over_spindle_userspace_cpu, None);
        // CPU needs both targets' accounting.
        let r = Ratios::compute(&[measured(&Target::Sockmap, 50.0, 10)]);
        assert_eq!(r.knative_over_spindle_sockmap_cpu, None);
        let r = Ratios::compute(&[
            measured(&Target::Sockmap, 50.0, 10),
            TargetReport {
                cpu_s_per_req: Some(4.62e-5),
                ..measured(&Target::Knative, 20.0, 10)
            },
        ]);
        assert_eq!(r.knative_over_spindle_sockmap_cpu, Some(2.0));
    }

    #[test]
    fn reads_back_reports_written_before_the_added_fields() {
        let mut v: serde_json::Value = serde_json::from_str(&synthetic().to_json()).unwrap();
        for t in v["targets"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("sched_lateness_p99_us");
        }
        let ratios = v["ratios"].as_object_mut().unwrap();
        ratios.remove("knative_over_spindle_userspace_cpu");
        ratios.remove("knative_over_spindle_sockmap_cpu");
        let old: Report = serde_json::from_value(v).unwrap();
        assert_eq!(old.targets[1].sched_lateness_p99_us, None);
        assert_eq!(old.ratios.knative_over_spindle_userspace_cpu, None);
    }

    #[test]
    fn markdown_has_the_table_ratios_and_machine() {
        let md = synthetic().to_markdown();
        assert!(md.contains(
            "Machine: 2 cores, Intel Xeon, Linux 6.18.44, 23.4 GiB, 2026-11-26T10:00:00Z"
        ));
        assert!(md.contains(
            "| target | mode | requests/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | CPU µs/request | system CPU µs/request | load-gen CPU µs/request |\n"
        ));
        assert!(
            md.contains(
                "| Spindle userspace | userspace | 56,209 | 275 | 550 | 1,100 | 2,200 | 0 | 23.1 | 30.0 | 10.0 |\n"
            ),
            "{md}"
        );
        assert!(md.contains("| Knative-style baseline | knative | 20,000 | 1,100 | 2,200 | 4,400 | 8,800 | 0 | 69.3 | 30.0 | 10.0 |\n"), "{md}");
        assert!(md.contains("| Spindle sockmap | sockmap | skipped |"));
        assert!(md.contains(
            "- Spindle sockmap: exited with status 1 before it was ready:\n  ```\n  error: loading the sk_msg program: Operation not permitted\n  ```"
        ));
        // URL target: no CPU figure.
        assert!(md.contains("| http://hello.default.example.com/ | url | 10,000 | 2,200 | 4,400 | 8,800 | 17,600 | 0 | – | 30.0 | 10.0 |\n"), "{md}");
        assert!(md.contains("- Spindle userspace / Knative-style, throughput: 2.81\n"));
        // Ratios of a target that did not run are left out, not shown as n/a.
        assert!(!md.contains("Spindle sockmap / Knative-style"));
        assert!(md.contains(
            "- Spindle userspace / http://hello.default.example.com/, throughput: 5.62\n"
        ));
        let only_one = Report {
            targets: vec![measured(&Target::Ceiling, 1.0, 1)],
            ratios: Ratios::compute(&[measured(&Target::Ceiling, 1.0, 1)]),
            ..synthetic()
        };
        assert!(
            only_one
                .to_markdown()
                .contains("- none: a ratio needs Spindle and a baseline")
        );
        assert!(md.contains("- Knative-style / Spindle userspace, p99 latency: 4.00\n"));
        assert!(md.contains("- Knative-style / Spindle userspace, CPU per request: 3.00\n"));
        assert!(!md.contains("Knative-style / Spindle sockmap, CPU"));
        assert!(md.contains("Load: closed loop, 32 connections, 10 s measured after 2 s warm-up, POST /hello (13 bytes)"));
        // Every table row has the same number of cells as the header.
        for line in md.lines().filter(|l| l.starts_with('|')) {
            assert_eq!(line.matches('|').count(), 12, "{line}");
        }
        // Closed loop: the Little's-law caveat, not the open-loop note.
        assert!(md.contains("\nClosed loop: each connection sends only after its previous response, so latency differences between targets largely restate their throughput differences (Little's law"), "{md}");
        assert!(md.contains("open loop (`--rate`) compares tails at equal offered load"));
        assert!(!md.contains("Open loop:"));
    }

    #[test]
    fn open_loop_markdown_notes_the_schedule_and_the_load_generators_lateness() {
        let mut report = synthetic();
        report.options.rate = Some(20_000);
        report.options.load_loop = "open".into();
        report.targets[1].sched_lateness_p99_us = Some(2_300);
        report.targets[3].sched_lateness_p99_us = Some(0);
        let md = report.to_markdown();
        assert!(md.contains("Load: open loop at 20,000 req/s"));
        assert!(md.contains("Open loop: latency counts from each request's scheduled send time (less at most 1 ms of the load generator's own timer lateness)"), "{md}");
        assert!(md.contains("The load generator sent late beyond that (p99, included in the latencies above): Spindle userspace 2,300 µs.\n"), "{md}");
        assert!(!md.contains("Closed loop:"));
        report.targets[1].sched_lateness_p99_us = Some(0);
        assert!(!report.to_markdown().contains("sent late"));
    }

    /// Three rounds of one target: rps 100, 300, 200 (and so on).
    fn three_rounds(target: &Target, rps: [f64; 3], cpu: [f64; 3]) -> TargetReport {
        let rounds = (0..3)
            .map(|i| TargetReport {
                round: Some(i),
                rps: Some(rps[i]),
                p50_us: Some(10 * (i as u64 + 1)),
                p99_us: Some(100 * (i as u64 + 1)),
                cpu_s_per_req: Some(cpu[i]),
                system_cpu_s_per_req: Some(cpu[i] * 2.0),
                requests: Some(rps[i] as u64),
                errors: Some(i as u64),
                error_kinds: Some(ErrorKinds {
                    wrong_body: i as u64,
                    ..ErrorKinds::default()
                }),
                verification: Some(Verification {
                    source: "check (round 1)".into(),
                    every: 16,
                    expected_bytes: 11,
                    verified: 10,
                    wrong_body: i as u64,
                    first_mismatch: (i == 1).then(|| Mismatch {
                        round: Some(1),
                        bytes: 5,
                        body: "wrong".into(),
                    }),
                }),
                cdf: Some(vec![CdfPoint {
                    q: 0.5,
                    us: i as u64,
                }]),
                ..measured(target, 0.0, 0)
            })
            .collect();
        TargetReport::over_rounds(target, rounds)
    }

    #[test]
    fn rounds_summarize_as_medians_and_totals() {
        let t = three_rounds(
            &Target::Userspace,
            [100.0, 300.0, 200.0],
            [3e-5, 1e-5, 2e-5],
        );
        assert_eq!(t.rps, Some(200.0));
        assert_eq!((t.p50_us, t.p99_us), (Some(20), Some(200)));
        assert_eq!(t.cpu_s_per_req, Some(2e-5));
        // Counts are totals: a round's errors are not hidden by a median.
        assert_eq!((t.requests, t.errors), (Some(600), Some(3)));
        assert_eq!(t.error_kinds.unwrap().wrong_body, 3);
        let v = t.verification.as_ref().unwrap();
        assert_eq!((v.verified, v.wrong_body), (30, 3));
        assert_eq!(v.first_mismatch.as_ref().unwrap().body, "wrong");
        // The CDF is the median round's (rps 200: round 2).
        assert_eq!(t.cdf.as_ref().unwrap()[0].us, 2);
        let sp = t.spread.as_ref().unwrap();
        let rps = sp.rps.as_ref().unwrap();
        assert_eq!(
            (rps.n, rps.min, rps.max, rps.median),
            (3, 100.0, 300.0, 200.0)
        );
        assert_eq!(t.rounds.as_ref().unwrap().len(), 3);
        assert_eq!(t.rounds_measured, Some(3));
        // A skipped round is left out of the figures and kept in the list.
        let mut rounds = t.rounds.clone().unwrap();
        rounds[2] = TargetReport {
            round: Some(2),
            ..TargetReport::skipped(&Target::Userspace, None, "exited before it was ready")
        };
        let partial = TargetReport::over_rounds(&Target::Userspace, rounds.clone());
        assert_eq!(partial.rps, Some(200.0)); // median of 100 and 300
        assert_eq!(partial.rounds_measured, Some(2));
        // Nothing measured: skipped with the first round's reason.
        let none = TargetReport::over_rounds(
            &Target::Userspace,
            vec![TargetReport::skipped(&Target::Userspace, None, "no binary")],
        );
        assert_eq!(none.skipped.as_deref(), Some("no binary"));
        assert_eq!(none.rounds_measured, Some(0));
    }

    #[test]
    fn ratios_come_from_medians_and_pair_rounds() {
        let userspace = three_rounds(
            &Target::Userspace,
            [100.0, 300.0, 200.0],
            [3e-5, 1e-5, 2e-5],
        );
        let knative = three_rounds(&Target::Knative, [50.0, 50.0, 200.0], [6e-5, 6e-5, 6e-5]);
        let ceiling = three_rounds(&Target::Ceiling, [400.0, 400.0, 400.0], [1e-5, 1e-5, 1e-5]);
        let r = Ratios::compute(&[ceiling, userspace, knative]);
        // Of the medians: 200 / 50.
        assert_eq!(r.spindle_userspace_over_knative_rps, Some(4.0));
        let paired = &r.per_round.as_ref().unwrap()["spindle_userspace_over_knative_rps"];
        // Round by round: 100/50, 300/50, 200/200 — a spread the medians' ratio hides.
        assert_eq!(paired.rounds, vec![Some(2.0), Some(6.0), Some(1.0)]);
        let s = paired.spread.as_ref().unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 6.0));
        // CPU against the ceiling, tree and whole system.
        assert_eq!(r.spindle_userspace_over_ceiling_cpu, Some(2.0));
        assert_eq!(r.spindle_userspace_over_ceiling_system_cpu, Some(2.0));
        assert_eq!(
            r.per_round.as_ref().unwrap()["spindle_userspace_over_ceiling_cpu"].rounds,
            vec![Some(3.0), Some(1.0), Some(2.0)]
        );
        assert_eq!(r.knative_over_spindle_userspace_cpu, Some(3.0));
        // No sockmap: no per-round entry either.
        assert!(
            !r.per_round
                .as_ref()
                .unwrap()
                .contains_key("spindle_sockmap_over_knative_rps")
        );
    }

    #[test]
    fn markdown_shows_medians_with_their_range() {
        let targets = vec![
            three_rounds(&Target::Ceiling, [400.0, 400.0, 400.0], [1e-5, 1e-5, 1e-5]),
            three_rounds(
                &Target::Userspace,
                [100.0, 300.0, 200.0],
                [3e-5, 1e-5, 2e-5],
            ),
        ];
        let opts = BenchOptions {
            rounds: 3,
            rate: Some(1000),
            ..BenchOptions::default()
        };
        let report = Report {
            options: OptionsReport::new(&opts, "/hello", 2),
            ratios: Ratios::compute(&targets),
            targets,
            idle_baselines: Some(vec![IdleBaseline {
                round: 0,
                duration_s: 2.0,
                busy_cpu_per_s: 0.125,
                softirq_cpu_per_s: 0.01,
                steal_cpu_per_s: 0.0,
            }]),
            ..synthetic()
        };
        let md = report.to_markdown();
        assert!(
            md.contains("3 interleaved rounds (cells: median [min–max] over rounds)"),
            "{md}"
        );
        assert!(
            md.contains("| Spindle userspace | userspace | 200 [100–300] | 20 [10–30] | 0 | 200 [100–300] | 0 | 3 | 20.0 [10.0–30.0] | 40.0 [20.0–60.0] | 10.0 |\n"),
            "{md}"
        );
        assert!(
            md.contains(
                "- Spindle userspace / ceiling, throughput: 0.50 [0.25–0.75 over 3 rounds]\n"
            ),
            "{md}"
        );
        assert!(md.contains("- Spindle userspace / ceiling, CPU per request at equal load (1,000 req/s): 2.00 [1.00–3.00 over 3 rounds]\n"), "{md}");
        assert!(
            md.contains("idle baseline (2 s with no target before each round: 0.125 CPU-s/s)"),
            "{md}"
        );
        assert!(!md.contains("Warning"), "{md}");
        let mut busy = report.clone();
        busy.idle_baselines.as_mut().unwrap()[0].busy_cpu_per_s = 1.9;
        let md = busy.to_markdown();
        assert!(
            md.contains(
                "**Warning:** the machine was not idle (baseline up to 1.90 CPU-s/s of 2 cores)"
            ),
            "{md}"
        );
        assert!(md.contains("- Spindle userspace: 30 responses compared with the expected 11 bytes (from check (round 1)), 3 wrong\n  first wrong body (round 2, 5 bytes): `wrong`\n"), "{md}");
    }

    #[test]
    fn a_sweep_has_one_row_per_size_and_target_and_shows_413_as_the_rows_error() {
        let mut small = measured(&Target::Userspace, 5000.0, 400);
        small.payload_bytes = Some(4096);
        small.bytes_copied_per_req = Some(8192.0);
        let mut ceiling = measured(&Target::Ceiling, 9000.0, 300);
        ceiling.payload_bytes = Some(4096);
        ceiling.bytes_copied_note = Some("not exposed: ...".into());
        let mut big = TargetReport::skipped(
            &Target::Userspace,
            None,
            "413 Payload Too Large: the target's limit is below this 8 MiB body (8388608 bytes): too large",
        );
        big.payload_bytes = Some(8 << 20);
        let opts = BenchOptions {
            payload_sizes: Some(vec![4096, 8 << 20]),
            ..BenchOptions::default()
        };
        let report = Report {
            options: OptionsReport::new(&opts, "/hello", 2),
            targets: vec![ceiling, small, big],
            ..synthetic()
        };
        let md = report.to_markdown();
        assert!(
            md.contains("POST /hello (generated bodies of 4 KiB, 8 MiB)"),
            "{md}"
        );
        assert!(md.contains("| payload | target | requests/s | p99 µs | CPU µs/request | system CPU µs/request | bytes copied/request | errors |\n"));
        assert!(md.contains("| 4 KiB | hyper hello-world (ceiling) | 9,000 | 300 | 23.1 | 30.0 | not exposed | 0 |\n"), "{md}");
        assert!(
            md.contains("| 4 KiB | Spindle userspace | 5,000 | 400 | 23.1 | 30.0 | 8,192 | 0 |\n"),
            "{md}"
        );
        assert!(md.contains("| 8 MiB | Spindle userspace | 413 Payload Too Large: the target's limit is below this 8 MiB body"), "{md}");
        assert_eq!(report.options.payload_bytes, 4096);
        assert_eq!(human_bytes(13), "13 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 20), "1 MiB");
    }

    #[test]
    fn formats_dates_and_numbers() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_795_687_392)),
            "2026-11-26T10:03:12Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(136706), "136,706");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
