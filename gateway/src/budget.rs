//! This node's resource budget: is it too busy to start more instances locally?
//!
//! Definitions (docs/autoscaling.md "Peers"):
//! - **CPU utilization** is the share of all CPUs' time that was not idle over the last
//!   [`CPU_WINDOW`]: from the aggregate `cpu` line of `/proc/stat`,
//!   `1 - Δ(idle + iowait) / Δ(all fields but guest and guest_nice)` (guest time is already
//!   counted in user). It is the whole node's, not the gateway's: workers, zygotes and anything
//!   else running there take the same cores.
//! - **Memory utilization** is `1 - MemAvailable / MemTotal` from `/proc/meminfo`: what the
//!   kernel could not hand out without swapping, page cache that can be dropped excluded —
//!   or, when the gateway's cgroup (v2) has a memory limit (a container's, a Kubernetes
//!   pod's) and that is tighter, its working set over the limit (`memory.current -
//!   inactive_file` over `memory.max`: what the OOM killer and the kubelet count).
//! - The node is **over budget** while either utilization exceeds its budget; a resource is
//!   back under only once [`HYSTERESIS`] (5 points) below it. A budget of 100% is therefore
//!   never exceeded and 0% always is once the node did any work (tests use that to force
//!   scale-out onto a peer).
//!
//! Until one window has passed, the utilization since boot stands in for the CPU's.
//!
//! A [`Budget`] is sampled every [`SAMPLE_EVERY`] by a task of its own; readers only load
//! atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{Gauge, GaugeVec, IntGaugeVec, Opts};

/// Below its budget by this much (a fraction) before a resource is back under it.
pub const HYSTERESIS: f64 = 0.05;
/// How often /proc is read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// CPU utilization is measured over this window: long enough to smooth one burst of a
/// scheduler tick, short enough to follow a load step within a second.
pub const CPU_WINDOW: Duration = Duration::from_secs(1);

/// Why /proc could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Malformed {
        path: &'static str,
        what: &'static str,
    },
}

/// Busy and total jiffies of all CPUs since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// The aggregate `cpu` line of /proc/stat.
pub fn parse_stat(text: &str) -> Result<CpuTimes, &'static str> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no aggregate cpu line")?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| "a cpu field is not a number")?;
    if fields.len() < 4 {
        return Err("fewer than 4 cpu fields");
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // included in user already.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Whether `utilization` is over `budget`, given whether it was: over once above the
/// budget, back under only below `budget - HYSTERESIS`, so a node hovering at its budget
/// does not send instances away and call them back every few samples.
fn exceeds(utilization: f64, budget: f64, was_over: bool) -> bool {
    if was_over {
        utilization >= budget - HYSTERESIS
    } else {
        utilization > budget
    }
}

/// `1 - MemAvailable / MemTotal` from /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Result<f64, &'static str> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    let total = field("MemTotal:").ok_or("no MemTotal")?;
    let available = field("MemAvailable:").ok_or("no MemAvailable (kernel older than 3.14)")?;
    if total == 0 {
        return Err("MemTotal is 0");
    }
    Ok(1.0 - (available.min(total) as f64 / total as f64))
}

/// The working set of the cgroup (v2) directory `dir` over its memory limit, when it has one
/// (a container's, e.g. a Kubernetes pod's limit): `(memory.current - inactive_file) /
/// memory.max`, what the kernel's OOM killer and the kubelet count. `None` without a limit.
pub fn cgroup_memory_utilization(dir: &std::path::Path) -> Option<f64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    parse_cgroup_memory(
        &read("memory.max")?,
        &read("memory.current")?,
        &read("memory.stat")?,
    )
}

/// [`cgroup_memory_utilization`] from the three files' contents.
pub fn parse_cgroup_memory(max: &str, current: &str, stat: &str) -> Option<f64> {
    let max: u64 = max.trim().parse().ok().filter(|&m| m > 0)?; // "max": no limit
    let current: u64 = current.trim().parse().ok()?;
    let inactive_file: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("inactive_file "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((current.saturating_sub(inactive_file) as f64 / max as f64).min(1.0))
}

/// The memory utilization held against the budget: the node's, or that of the gateway's
/// cgroup (`cgroup`, found once at start) against its limit when that is tighter (a pod is
/// OOM-killed at its limit, whatever the node has free).
fn memory_utilization_now(cgroup: Option<&std::path::Path>) -> Result<f64, BudgetError> {
    let node = parse_meminfo(&read("/proc/meminfo")?).map_err(|what| BudgetError::Malformed {
        path: "/proc/meminfo",
        what,
    })?;
    Ok(cgroup
        .and_then(cgroup_memory_utilization)
        .map_or(node, |c| c.max(node)))
}

fn read(path: &'static str) -> Result<String, BudgetError> {
    std::fs::read_to_string(path).map_err(|source| BudgetError::Read { path, source })
}

/// The node's budgets and what was last measured against them.
pub struct Budget {
    cpu_budget: f64,
    memory_budget: f64,
    /// f64 bits of the last utilizations.
    cpu: AtomicU64,
    memory: AtomicU64,
    cpu_over: AtomicBool,
    memory_over: AtomicBool,
    over: AtomicBool,
    cpu_gauge: Gauge,
    memory_gauge: Gauge,
    budget_gauge: GaugeVec,
    over_gauge: IntGaugeVec,
    /// The gateway's cgroup v2 directory, whose memory limit counts too (if it has one).
    cgroup: Option<std::path::PathBuf>,
}

impl Budget {
    /// Budgets as fractions (0.0..=1.0). Reads /proc once, so a node whose /proc cannot be
    /// read fails at start rather than silently never being over budget.
    pub fn new(cpu_budget: f64, memory_budget: f64) -> Result<Arc<Self>, BudgetError> {
        let gauge =
            |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help)).expect("valid");
        let budget = Arc::new(Budget {
            cpu_budget,
            memory_budget,
            cpu: AtomicU64::new(0f64.to_bits()),
            memory: AtomicU64::new(0f64.to_bits()),
            cpu_over: AtomicBool::new(false),
            memory_over: AtomicBool::new(false),
            over: AtomicBool::new(false),
            cpu_gauge: gauge(
                "spindle_node_cpu_utilization",
                "Share of the node's CPU time not idle over the last second (/proc/stat)",
            ),
            memory_gauge: gauge(
                "spindle_node_memory_utilization",
                "1 - MemAvailable / MemTotal (/proc/meminfo)",
            ),
            budget_gauge: GaugeVec::new(
                Opts::new(
                    "spindle_node_budget",
                    "The node's budget per resource, as a fraction",
                ),
                &["resource"],
            )
            .expect("valid"),
            over_gauge: IntGaugeVec::new(
                Opts::new(
                    "spindle_node_over_budget",
                    "1 while the resource's utilization exceeds its budget (scale-out goes to peers)",
                ),
                &["resource"],
            )
            .expect("valid"),
            // Found once: the process does not move between cgroups.
            cgroup: xdp_bpf::own_cgroup().ok(),
        });
        budget
            .budget_gauge
            .with_label_values(&["cpu"])
            .set(cpu_budget);
        budget
            .budget_gauge
            .with_label_values(&["memory"])
            .set(memory_budget);
        let since_boot =
            parse_stat(&read("/proc/stat")?).map_err(|what| BudgetError::Malformed {
                path: "/proc/stat",
                what,
            })?;
        let memory = memory_utilization_now(budget.cgroup.as_deref())?;
        // Until the first window has passed, the utilization since boot stands in: a node
        // started busy is not taken for idle.
        let cpu = (since_boot.total > 0).then(|| since_boot.busy as f64 / since_boot.total as f64);
        budget.record(cpu, Some(memory));
        Ok(budget)
    }

    /// Whether the node is over its CPU or memory budget as last sampled.
    pub fn over(&self) -> bool {
        self.over.load(Relaxed)
    }

    pub fn cpu_utilization(&self) -> f64 {
        f64::from_bits(self.cpu.load(Relaxed))
    }

    pub fn memory_utilization(&self) -> f64 {
        f64::from_bits(self.memory.load(Relaxed))
    }

    fn record(&self, cpu: Option<f64>, memory: Option<f64>) {
        if let Some(c) = cpu {
            self.cpu.store(c.to_bits(), Relaxed);
            self.cpu_gauge.set(c);
        }
        if let Some(m) = memory {
            self.memory.store(m.to_bits(), Relaxed);
            self.memory_gauge.set(m);
        }
        let cpu_over = exceeds(
            self.cpu_utilization(),
            self.cpu_budget,
            self.cpu_over.load(Relaxed),
        );
        let memory_over = exceeds(
            self.memory_utilization(),
            self.memory_budget,
            self.memory_over.load(Relaxed),
        );
        self.cpu_over.store(cpu_over, Relaxed);
        self.memory_over.store(memory_over, Relaxed);
        self.over_gauge
            .with_label_values(&["cpu"])
            .set(i64::from(cpu_over));
        self.over_gauge
            .with_label_values(&["memory"])
            .set(i64::from(memory_over));
        let over = cpu_over || memory_over;
        if self.over.swap(over, Relaxed) != over {
            tracing::info!(
                cpu = format_args!("{:.0}%", self.cpu_utilization() * 100.0),
                memory = format_args!("{:.0}%", self.memory_utilization() * 100.0),
                cpu_budget = format_args!("{:.0}%", self.cpu_budget * 100.0),
                memory_budget = format_args!("{:.0}%", self.memory_budget * 100.0),
                "node {} budget",
                if over { "over" } else { "back under" }
            );
        }
    }

    /// Samples /proc every [`SAMPLE_EVERY`] until the task is dropped.
    pub async fn sample(self: Arc<Self>) {
        let window = (CPU_WINDOW.as_millis() / SAMPLE_EVERY.as_millis()) as usize;
        let mut history: std::collections::VecDeque<CpuTimes> =
            std::collections::VecDeque::with_capacity(window + 1);
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let cpu = match read("/proc/stat").map(|t| parse_stat(&t)) {
                Ok(Ok(now)) => {
                    history.push_back(now);
                    if history.len() > window + 1 {
                        history.pop_front();
                    }
                    let first = history.front().copied().unwrap_or(now);
                    let total = now.total.saturating_sub(first.total);
                    (total > 0).then(|| now.busy.saturating_sub(first.busy) as f64 / total as f64)
                }
                Ok(Err(what)) => {
                    tracing::warn!("/proc/stat: {what}");
                    None
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            };
            let memory = match memory_utilization_now(self.cgroup.as_deref()) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            };
            self.record(cpu, memory);
        }
    }

    /// The budget's metric families, for /metrics.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = self.cpu_gauge.collect();
        out.extend(self.memory_gauge.collect());
        out.extend(self.budget_gauge.collect());
        out.extend(self.over_gauge.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_counts_idle_and_iowait_as_not_busy_and_skips_guest_time() {
        let text = "cpu  100 20 30 400 50 6 7 8 90 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n";
        let t = parse_stat(text).unwrap();
        assert_eq!(t.total, 100 + 20 + 30 + 400 + 50 + 6 + 7 + 8);
        assert_eq!(t.busy, t.total - 450);
        assert!(parse_stat("cpu0 1 2 3 4\n").is_err());
        assert!(parse_stat("cpu  1 x 3 4\n").is_err());
    }

    #[test]
    fn meminfo_uses_mem_available() {
        let text = "MemTotal:       1000 kB\nMemFree:   100 kB\nMemAvailable:    250 kB\n";
        assert!((parse_meminfo(text).unwrap() - 0.75).abs() < 1e-9);
        assert!(parse_meminfo("MemTotal: 10 kB\n").is_err());
    }

    #[test]
    fn back_under_only_five_points_below_the_budget() {
        let b = Budget::new(0.8, 1.0).unwrap();
        for (cpu, over) in [
            (0.5, false),
            (0.81, true),
            (0.78, true),
            (0.76, true),
            (0.74, false),
            (0.79, false),
            (0.8, false),
            (0.85, true),
        ] {
            b.record(Some(cpu), Some(0.1));
            assert_eq!(b.over(), over, "at {cpu}");
        }
    }

    #[test]
    fn zero_is_over_once_busy_and_full_never_is() {
        let b = Budget::new(0.0, 1.0).unwrap();
        b.record(Some(0.01), Some(0.5));
        assert!(b.over());
        let b = Budget::new(1.0, 1.0).unwrap();
        b.record(Some(1.0), Some(1.0));
        assert!(!b.over());
        let b = Budget::new(0.8, 0.85).unwrap();
        b.record(Some(0.5), Some(0.9));
        assert!(b.over(), "memory alone is enough");
    }

    #[test]
    fn a_cgroup_limit_counts_its_working_set() {
        let stat = "anon 100\ninactive_file 300\nactive_file 10\n";
        assert_eq!(parse_cgroup_memory("1000\n", "800\n", stat), Some(0.5));
        assert_eq!(
            parse_cgroup_memory("max\n", "800\n", stat),
            None,
            "no limit"
        );
        assert_eq!(
            parse_cgroup_memory("100\n", "800\n", ""),
            Some(1.0),
            "capped at 1"
        );
        assert_eq!(
            parse_cgroup_memory("1000", "200", stat),
            Some(0.0),
            "cache is not counted"
        );
    }
}
