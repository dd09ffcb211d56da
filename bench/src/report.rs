//! The report: JSON (field names are a stable interface), Markdown, and the numbers behind
//! both.

use serde::{Deserialize, Serialize};

use crate::{BenchOptions, Target};

/// The whole comparison. Serialized field names are stable; `null` means "not applicable"
/// (skipped target, no CPU accounting for a URL, ratio whose targets did not both run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub options: OptionsReport,
    pub targets: Vec<TargetReport>,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

impl ErrorKinds {
    pub fn total(&self) -> u64 {
        self.status + self.connect + self.timeout + self.io
    }

    pub(crate) fn add(&mut self, other: &ErrorKinds) {
        self.status += other.status;
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.io += other.io;
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
    /// The same comparisons against each URL target (e.g. a real Knative service), in
    /// target order; null when there is no URL target.
    pub urls: Option<Vec<UrlRatios>>,
}

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
        }
    }

    fn ran(&self) -> bool {
        self.skipped.is_none()
    }
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
    pub fn compute(targets: &[TargetReport]) -> Ratios {
        // The first measured target of each mode (a list may name one twice).
        let find = |mode: &str| targets.iter().find(|t| t.mode == mode && t.ran());
        let rps = |mode: &str| find(mode).and_then(|t| t.rps);
        let p99 = |mode: &str| find(mode).and_then(|t| t.p99_us).map(|v| v as f64);
        let cpu = |mode: &str| find(mode).and_then(|t| t.cpu_s_per_req);
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
            spindle_userspace_over_knative_rps: ratio(rps("userspace"), rps("knative")),
            spindle_sockmap_over_knative_rps: ratio(rps("sockmap"), rps("knative")),
            spindle_userspace_over_ceiling_rps: ratio(rps("userspace"), rps("ceiling")),
            spindle_sockmap_over_ceiling_rps: ratio(rps("sockmap"), rps("ceiling")),
            spindle_sockmap_over_userspace_rps: ratio(rps("sockmap"), rps("userspace")),
            knative_over_spindle_userspace_p99: ratio(p99("knative"), p99("userspace")),
            knative_over_spindle_sockmap_p99: ratio(p99("knative"), p99("sockmap")),
            knative_over_spindle_userspace_cpu: ratio(cpu("knative"), cpu("userspace")),
            knative_over_spindle_sockmap_cpu: ratio(cpu("knative"), cpu("sockmap")),
            urls: (!urls.is_empty()).then_some(urls),
        }
    }

    /// (label, value) in display order, for Markdown.
    fn lines(&self) -> Vec<(String, Option<f64>)> {
        let mut lines = vec![
            (
                "Spindle userspace / Knative-style, throughput".to_string(),
                self.spindle_userspace_over_knative_rps,
            ),
            (
                "Spindle sockmap / Knative-style, throughput".to_string(),
                self.spindle_sockmap_over_knative_rps,
            ),
            (
                "Spindle userspace / ceiling, throughput".to_string(),
                self.spindle_userspace_over_ceiling_rps,
            ),
            (
                "Spindle sockmap / ceiling, throughput".to_string(),
                self.spindle_sockmap_over_ceiling_rps,
            ),
            (
                "Spindle sockmap / Spindle userspace, throughput".to_string(),
                self.spindle_sockmap_over_userspace_rps,
            ),
            (
                "Knative-style / Spindle userspace, p99 latency".to_string(),
                self.knative_over_spindle_userspace_p99,
            ),
            (
                "Knative-style / Spindle sockmap, p99 latency".to_string(),
                self.knative_over_spindle_sockmap_p99,
            ),
            (
                "Knative-style / Spindle userspace, CPU per request".to_string(),
                self.knative_over_spindle_userspace_cpu,
            ),
            (
                "Knative-style / Spindle sockmap, CPU per request".to_string(),
                self.knative_over_spindle_sockmap_cpu,
            ),
        ];
        for u in self.urls.iter().flatten() {
            lines.push((
                format!("Spindle userspace / {}, throughput", u.url),
                u.spindle_userspace_over_url_rps,
            ));
            lines.push((
                format!("Spindle sockmap / {}, throughput", u.url),
                u.spindle_sockmap_over_url_rps,
            ));
            lines.push((
                format!("{} / Spindle userspace, p99 latency", u.url),
                u.url_over_spindle_userspace_p99,
            ));
            lines.push((
                format!("{} / Spindle sockmap, p99 latency", u.url),
                u.url_over_spindle_sockmap_p99,
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
            payload_bytes: opts.payload.len(),
            load_threads,
            request_timeout_s: crate::REQUEST_TIMEOUT.as_secs_f64(),
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

    fn line(&self) -> String {
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

    /// The table, the ratios and the machine, as Markdown.
    pub fn to_markdown(&self) -> String {
        let o = &self.options;
        let load = match o.rate {
            Some(rate) => format!("open loop at {} req/s", thousands(rate)),
            None => "closed loop".to_string(),
        };
        let mut md = String::new();
        md.push_str("## spindle bench\n\n");
        md.push_str(&format!("Machine: {}\n\n", self.machine.line()));
        md.push_str(&format!(
            "Load: {load}, {} connections, {} s measured after {} s warm-up, {} {} ({} bytes), \
             {} load-generator threads\n\n",
            o.connections,
            o.duration_s,
            o.warmup_s,
            o.method,
            o.path,
            o.payload_bytes,
            o.load_threads
        ));
        md.push_str(
            "| target | mode | requests/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | CPU µs/request | load-gen CPU µs/request |\n",
        );
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let num = |v: Option<u64>| v.map_or("–".to_string(), thousands);
        let micros = |s: Option<f64>| s.map_or("–".into(), |c| format!("{:.1}", c * 1e6));
        for t in &self.targets {
            if t.skipped.is_some() {
                md.push_str(&format!(
                    "| {} | {} | skipped | | | | | | | |\n",
                    t.name, t.mode
                ));
                continue;
            }
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                t.mode,
                t.rps.map_or("–".into(), |r| thousands(r.round() as u64)),
                num(t.p50_us),
                num(t.p90_us),
                num(t.p99_us),
                num(t.p999_us),
                num(t.errors),
                micros(t.cpu_s_per_req),
                micros(t.loadgen_cpu_s_per_req),
            ));
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
                md.push_str(&format!("- {}: {}\n", t.name, lines.next().unwrap_or("")));
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
        md.push_str("\nRatios (same run, same machine):\n");
        let defined: Vec<(String, f64)> = self
            .ratios
            .lines()
            .into_iter()
            .filter_map(|(label, value)| Some((label, value?)))
            .collect();
        if defined.is_empty() {
            md.push_str("- none: a ratio needs Spindle and a baseline measured in the same run\n");
        }
        for (label, value) in defined {
            md.push_str(&format!("- {label}: {value:.2}\n"));
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
        assert_eq!(keys(&v), ["machine", "options", "ratios", "targets"]);
        assert_eq!(
            keys(&v["machine"]),
            ["cores", "cpu_model", "date", "kernel", "memory_gib"]
        );
        assert_eq!(v["options"]["loop"], "closed");
        assert_eq!(v["options"]["rate"], serde_json::Value::Null);
        assert_eq!(v["options"]["targets"][2], "sockmap");
        let expected_target_keys = [
            "cdf",
            "check",
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
            "processes",
            "requests",
            "rps",
            "sched_lateness_p99_us",
            "skipped",
            "url",
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
                "knative_over_spindle_userspace_cpu",
                "knative_over_spindle_userspace_p99",
                "spindle_sockmap_over_ceiling_rps",
                "spindle_sockmap_over_knative_rps",
                "spindle_sockmap_over_userspace_rps",
                "spindle_userspace_over_ceiling_rps",
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
            "| target | mode | requests/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | CPU µs/request | load-gen CPU µs/request |\n"
        ));
        assert!(
            md.contains(
                "| Spindle userspace | userspace | 56,209 | 275 | 550 | 1,100 | 2,200 | 0 | 23.1 | 10.0 |\n"
            ),
            "{md}"
        );
        assert!(md.contains("| Knative-style baseline | knative | 20,000 | 1,100 | 2,200 | 4,400 | 8,800 | 0 | 69.3 | 10.0 |\n"), "{md}");
        assert!(md.contains("| Spindle sockmap | sockmap | skipped |"));
        assert!(md.contains(
            "- Spindle sockmap: exited with status 1 before it was ready:\n  ```\n  error: loading the sk_msg program: Operation not permitted\n  ```"
        ));
        // URL target: no CPU figure.
        assert!(md.contains("| http://hello.default.example.com/ | url | 10,000 | 2,200 | 4,400 | 8,800 | 17,600 | 0 | – | 10.0 |\n"), "{md}");
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
            assert_eq!(line.matches('|').count(), 11, "{line}");
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
