//! Whole-system CPU from `/proc/stat`, net of an idle baseline and of the load generator.
//!
//! The per-process-tree figure ([`crate::cpu`]) misses work the kernel does for a request
//! outside the target's processes: loopback packets are processed in softirq context, often
//! charged to whichever task happened to be running (or to ksoftirqd), and wake-ups run on
//! other CPUs. The aggregate `cpu` line of `/proc/stat` catches all of it, and everything
//! else the machine did too; so the runner measures what the machine does with no target
//! running (the *idle baseline*, between rounds) and subtracts that rate over the window's
//! length, then subtracts the load generator's own process CPU. What remains is the CPU the
//! target cost the system, kernel included, give or take how steady the background was.
//!
//! Fields counted as busy: `user + nice + system + irq + softirq`. Not counted: `idle` and
//! `iowait` (not running), `guest` and `guest_nice` (already included in `user` and `nice`
//! by the kernel, so adding them would count them twice), and `steal` (time the hypervisor
//! gave our vCPU's slot to someone else: not work done here; reported on its own instead,
//! since a large steal means the host was contended and every figure of the round is suspect).

use serde::{Deserialize, Serialize};

use crate::cpu::clock_ticks_per_second;

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks (USER_HZ).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// user + nice + system + irq + softirq (see the module documentation for why).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }
}

/// The `cpu ` line (all CPUs) of a `/proc/stat` text. Old kernels have fewer columns; the
/// missing ones read as 0. None if there is no such line or it does not parse.
pub(crate) fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some("cpu")
    })?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if fields.len() < 4 {
        return None;
    }
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(CpuTimes {
        user: at(0),
        nice: at(1),
        system: at(2),
        idle: at(3),
        iowait: at(4),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
    })
}

pub(crate) fn read_proc_stat() -> Option<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// What the machine used between two readings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StatDelta {
    /// Wall-clock time between the readings.
    pub elapsed_s: f64,
    pub busy_s: f64,
    pub softirq_s: f64,
    pub steal_s: f64,
}

pub(crate) fn delta(before: &CpuTimes, after: &CpuTimes, elapsed_s: f64) -> StatDelta {
    let tck = clock_ticks_per_second();
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / tck;
    StatDelta {
        elapsed_s,
        busy_s: secs(before.busy(), after.busy()),
        softirq_s: secs(before.softirq, after.softirq),
        steal_s: secs(before.steal, after.steal),
    }
}

/// The machine's CPU use with no target running, as CPU-seconds per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdleBaseline {
    /// The round it was measured before (0-based).
    pub round: usize,
    /// How long it was measured.
    pub duration_s: f64,
    /// Busy CPU-seconds per second, all CPUs (so up to the number of cores), with this
    /// process's own CPU in the interval taken out (it is counted in the window separately).
    pub busy_cpu_per_s: f64,
    /// The softirq part of it.
    pub softirq_cpu_per_s: f64,
    pub steal_cpu_per_s: f64,
}

impl IdleBaseline {
    pub(crate) fn from_delta(round: usize, d: &StatDelta, self_cpu_s: f64) -> IdleBaseline {
        let per_s = |x: f64| {
            if d.elapsed_s > 0.0 {
                x / d.elapsed_s
            } else {
                0.0
            }
        };
        IdleBaseline {
            round,
            duration_s: d.elapsed_s,
            busy_cpu_per_s: per_s((d.busy_s - self_cpu_s).max(0.0)),
            softirq_cpu_per_s: per_s(d.softirq_s),
            steal_cpu_per_s: per_s(d.steal_s),
        }
    }
}

/// Whole-system CPU of one measured window, and how it was derived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemCpu {
    /// Wall-clock length of the window, between the two `/proc/stat` readings.
    pub window_s: f64,
    /// Busy CPU-seconds of all CPUs in the window (user+nice+system+irq+softirq).
    pub busy_s: f64,
    /// The softirq part of `busy_s`.
    pub softirq_s: f64,
    /// Steal time in the window (not included in busy_s).
    pub steal_s: f64,
    /// The idle baseline's busy rate times the window: what the machine would have done anyway.
    pub baseline_s: f64,
    pub baseline_softirq_s: f64,
    /// The load generator's (this process's) CPU in the window.
    pub loadgen_s: f64,
    /// busy_s − baseline_s − loadgen_s: what the target cost the whole system. Not clamped:
    /// a negative value says the background changed between the baseline and the window.
    pub net_s: f64,
    /// softirq_s − baseline_softirq_s.
    pub net_softirq_s: f64,
    /// softirq_s / busy_s: the share of the window's busy time spent in softirq.
    pub softirq_share: Option<f64>,
}

/// Subtracts the idle baseline (its rate times the window's length) and the load generator's
/// CPU from one window's `/proc/stat` delta.
pub(crate) fn net_system_cpu(
    window: &StatDelta,
    baseline: &IdleBaseline,
    loadgen_s: f64,
) -> SystemCpu {
    let baseline_s = baseline.busy_cpu_per_s * window.elapsed_s;
    let baseline_softirq_s = baseline.softirq_cpu_per_s * window.elapsed_s;
    SystemCpu {
        window_s: window.elapsed_s,
        busy_s: window.busy_s,
        softirq_s: window.softirq_s,
        steal_s: window.steal_s,
        baseline_s,
        baseline_softirq_s,
        loadgen_s,
        net_s: window.busy_s - baseline_s - loadgen_s,
        net_softirq_s: window.softirq_s - baseline_softirq_s,
        softirq_share: (window.busy_s > 0.0).then(|| window.softirq_s / window.busy_s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 150 1120 16250 520 30 77 12 9 1\n\
                        cpu0 2400 75 560 8000 260 15 40 6 5 1\n\
                        cpu1 2305 75 560 8250 260 15 37 6 4 0\n\
                        intr 1462898 0 0\n\
                        ctxt 2511411\n";

    #[test]
    fn parses_the_aggregate_cpu_line() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 4705,
                nice: 150,
                system: 1120,
                idle: 16250,
                iowait: 520,
                irq: 30,
                softirq: 77,
                steal: 12,
            }
        );
        // guest (9) and guest_nice (1) are inside user and nice already; steal is apart.
        assert_eq!(t.busy(), 4705 + 150 + 1120 + 30 + 77);
        // A 2.6.0-era line with only four columns.
        let old = parse_proc_stat("cpu 1 2 3 4\n").unwrap();
        assert_eq!((old.busy(), old.idle, old.steal), (6, 4, 0));
        // `cpu0` alone is not the aggregate line.
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 x 3 4\n"), None);
        assert_eq!(parse_proc_stat(""), None);
        assert!(read_proc_stat().is_some(), "this machine's /proc/stat");
    }

    #[test]
    fn subtracts_the_scaled_idle_baseline_and_the_load_generator() {
        let tck = clock_ticks_per_second();
        let ticks = |s: f64| (s * tck).round() as u64;
        // Baseline: over 2 s the machine was busy 0.5 CPU-s, 0.1 of it this process's own,
        // 0.04 in softirq: 0.2 CPU-s/s of background, 0.02 of it softirq.
        let b0 = CpuTimes::default();
        let b1 = CpuTimes {
            user: ticks(0.3),
            system: ticks(0.16),
            softirq: ticks(0.04),
            idle: ticks(3.5),
            ..b0
        };
        let baseline = IdleBaseline::from_delta(0, &delta(&b0, &b1, 2.0), 0.1);
        assert!((baseline.busy_cpu_per_s - 0.2).abs() < 1e-9, "{baseline:?}");
        assert!((baseline.softirq_cpu_per_s - 0.02).abs() < 1e-9);
        // Window of 5 s: 9 CPU-s busy (1.5 of it softirq), the load generator used 3.
        let w0 = CpuTimes {
            user: 1000,
            ..CpuTimes::default()
        };
        let w1 = CpuTimes {
            user: 1000 + ticks(5.0),
            system: ticks(2.5),
            softirq: ticks(1.5),
            steal: ticks(0.2),
            ..CpuTimes::default()
        };
        let window = delta(&w0, &w1, 5.0);
        assert!((window.busy_s - 9.0).abs() < 1e-9);
        let net = net_system_cpu(&window, &baseline, 3.0);
        // 9 − 0.2·5 − 3 = 5 CPU-s; softirq 1.5 − 0.02·5 = 1.4.
        assert!((net.baseline_s - 1.0).abs() < 1e-9, "{net:?}");
        assert!((net.net_s - 5.0).abs() < 1e-9, "{net:?}");
        assert!((net.net_softirq_s - 1.4).abs() < 1e-9, "{net:?}");
        assert!((net.softirq_share.unwrap() - 1.5 / 9.0).abs() < 1e-9);
        assert!((net.steal_s - 0.2).abs() < 1e-9);
        // A background that got quieter than its baseline shows as negative, not as 0.
        let quiet = net_system_cpu(&window, &baseline, 8.5);
        assert!(quiet.net_s < 0.0);
        // Counters never run backwards; if a reading did, it counts as nothing.
        assert_eq!(delta(&w1, &w0, 1.0).busy_s, 0.0);
    }
}
