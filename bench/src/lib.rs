//! `spindle bench`: Spindle's load generator and side-by-side comparison report.
//!
//! It owns measuring and reporting; it must not know how a target works inside (it starts
//! each as a process tree and talks HTTP to it), so every target is measured the same way.
//!
//! One run starts each target in turn as its own process tree on a loopback port, drives it
//! with the same HTTP/1.1 load from this process, and writes one [`Report`] (JSON, Markdown,
//! optionally an SVG plot). Targets: a bare hyper server (the *ceiling*: what any HTTP front
//! costs on this box), Spindle on the userspace and the sockmap (eBPF) dataplane, the
//! Knative-style baseline, and any external URL (a real Knative service). Only ratios measured
//! in the same run on the same machine mean much, so the report leads with them.
//!
//! # What is measured, and how
//!
//! * **Connections.** Exactly `connections` keep-alive HTTP/1.1 connections, each owned by one
//!   task doing a raw `hyper::client::conn::http1` handshake: no pool can open extra
//!   connections or move requests between them, so "32 connections" means 32 sockets. A
//!   connection that breaks is re-opened by its task.
//! * **Request.** `POST path` with the payload (13 bytes by default, as the old wrk script
//!   sent). The whole response body is read, since a server that has not written it has not
//!   done the work. Before any load, one request checks that the target answers 2xx, so a
//!   wrong path (404) fails that target with its answer instead of benchmarking an error page.
//! * **Phases.** Load runs continuously through `warmup` then `duration`; only requests that
//!   *start* (closed loop) or are *scheduled* (open loop) inside the measured window count.
//!   When the window closes nothing new is started or scheduled, but every request of the
//!   window is finished and counted, since the ones still in flight or queued behind a slow
//!   response are the slowest: a success adds its latency (open loop: from its due time), a
//!   failure its error. Whatever is still unanswered [`REQUEST_TIMEOUT`] after the window
//!   closed (open loop: in flight or still queued) counts as a timeout error, having waited
//!   longer than that since it was due. Requests/s is the window's successes divided by its
//!   length.
//! * **Closed loop** (default): each connection sends its next request when the previous
//!   response is complete; latency is send → last body byte. This finds the maximum
//!   throughput, but its latencies are optimistic: while the server stalls, the client stops
//!   sending, so the stall shows up as *one* slow request. And with a fixed number of
//!   requests in flight, latency ≈ connections / throughput (Little's law): latency
//!   differences between targets largely restate their throughput differences. Open loop
//!   compares tails at equal offered load.
//! * **Open loop** (`rate`): request *n* is due at `start + n / rate`, assigned round-robin to
//!   the connections. Latency is measured from that **intended** time, not from when the
//!   request actually went out. If the server stalls for 200 ms at 200 req/s, the 40 requests
//!   that were due during the stall all wait, and all of them record that wait: this is the
//!   correction for *coordinated omission* (the load generator politely not sending while
//!   the server is slow, and so never measuring the queueing a real client population would
//!   see). The one thing left out is up to 1 ms of the load generator's own lateness in
//!   sending: tokio's timer rounds deadlines up to the next millisecond, so requests due
//!   within the same millisecond go out together, a tick late. So latency is counted from the
//!   scheduled send time to within 1 ms: lateness beyond that tick (e.g. the load generator
//!   starved of CPU by the target) is included, and also reported on its own as
//!   `sched_lateness_p99_us`, so a tail that is partly the load generator's can be told
//!   apart. The achieved rate is reported next to the intended one; if a target cannot keep
//!   up, the gap shows in the tail and, once the backlog outlasts the request timeout, as
//!   timeout errors and a lower rate.
//! * **Latency** goes into an HDR histogram in microseconds with 3 significant digits (one per
//!   connection, merged at the end): p50/p90/p99/p99.9 and max, plus a CDF for the plot. Only
//!   2xx responses are timed; everything else is an error.
//! * **Errors**: non-2xx answers, connection failures (refused, reset), timeouts
//!   ([`REQUEST_TIMEOUT`] per request) and other I/O errors, counted by kind. A target that
//!   goes down mid-run keeps accumulating errors while the connections try to reconnect; the
//!   run goes on and the report is still written.
//! * **CPU per request.** At the start and end of the measured window the runner reads
//!   `/proc/PID/stat` for the target's process *and every descendant* (found by walking the
//!   `ppid` of every process in `/proc`, so workers started or restarted during the run are
//!   included), sums `utime + stime + cutime + cstime` (clock ticks, `sysconf(_SC_CLK_TCK)`)
//!   and divides the difference by the requests completed, scaled by window length over the
//!   readings' actual interval (a loaded machine can take a reading late; per request is
//!   then CPU per second over requests per second, not a shorter interval's CPU over the
//!   whole window's requests). The reaped-children fields keep a
//!   worker that exits during the window counted: its time moves into its parent's
//!   `cutime`/`cstime`, and its pre-window share was in the first snapshot. The JSON lists
//!   each process (pid, command name, command line, CPU seconds), so the gateway's share can
//!   be told from each worker's. The load generator's own CPU is reported too,
//!   because on a small machine it competes with the target for the same cores. For a URL
//!   target there is no process to read: CPU is `null`.
//!
//! * **Rounds.** With `rounds` > 1 every target (and payload size) runs once per round, in
//!   order, and again in the next round (A B C A B C …), each time freshly started; a
//!   target's figures are the medians over its rounds, counts are totals, `spread` has
//!   min–max, quartiles and standard deviation, and ratios are also paired round by round
//!   ([`Ratios::per_round`]). See [`TargetReport`] for which figure is which.
//! * **Body verification.** Each connection's responses 0, N, 2N, … (`verify_every`) are
//!   compared with the expected body (the first check response, or [`Expect`]); a mismatch
//!   is a `wrong_body` error, and the first wrong body is reported.
//! * **Whole-system CPU.** `/proc/stat` busy time (user+nice+system+irq+softirq, all CPUs)
//!   in the window, less an idle baseline measured before each round with no target
//!   running, less the load generator's own CPU, per request (`system_cpu_s_per_req`;
//!   the softirq share apart). See the `sysstat` module for what is and is not counted.
//! * **Payload sweep.** `payload_sizes` measures every size × target with a generated body
//!   ([`generated_payload`]), and scrapes each target's `/metrics` around the window for
//!   the delta of `spindle_payload_bytes_copied_total` per request (null if not exposed).
//!   A 413 answer to the check makes that row skipped with the reason, not a failed run.
//! * **Hops** ([`run_hops`]): chains of 1, 3, 6 copies of one function at one connection,
//!   the least-squares slope of latency per transition, and the ping-pong floor for one hop
//!   ([`ping_pong`]) measured in the same run.
//!
//! Targets run one after another, never concurrently, and each one's processes are stopped
//! (SIGTERM, then SIGKILL after 5 s) and reaped before the next starts, including on errors,
//! panics and Ctrl-C. Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so even `kill -9` of the
//! bench process takes its targets with it.
//!
//! # Entry points
//!
//! [`run`] does a whole comparison from [`BenchOptions`]; [`Report::to_json`],
//! [`Report::to_markdown`] and [`Report::write_svg`] render a report (also one read back from
//! its JSON); [`serve_ceiling`] is the ceiling server (`spindle bench-ceiling`, and the
//! `hyper-hello` binary of this crate). `examples/compare.rs` runs [`run`] without the CLI.
//! [`run_hops`] is the per-hop mode (`spindle bench --hops`), with its own [`HopsReport`].
//! [`run_step`] is a different measurement on the same load generator: one open loop against
//! a running server whose rate jumps once, reported before the step, during the ramp after it
//! and after that, and over time (`examples/step.rs`, driven by `bench/scale.sh`).

mod ceiling;
mod client;
mod config;
mod cpu;
mod floor;
mod hops;
mod load;
mod plot;
mod process;
mod report;
mod runner;
mod scrape;
mod stats;
mod step;
mod sysstat;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use ceiling::{serve_ceiling, serve_ceiling_on};
pub use floor::{FloorSample, FloorVariant, Transport, ping_pong};
pub use hops::{FloorReport, HopPoint, HopRound, HopsOptions, HopsReport, HopsTarget, run_hops};
pub use report::{
    CdfPoint, CheckSample, ErrorKinds, Machine, Mismatch, OptionsReport, PairedRatio, ProcessCpu,
    Ratios, Report, SizeRatios, TargetReport, TargetSpread, UrlRatios, Verification,
};
pub use runner::run;
pub use scrape::{BYTES_COPIED_FAMILY, counter_sum};
pub use stats::{LineFit, Spread, fit_line, paired_ratios, spread};
pub use step::{Interval, StepOptions, StepReport, run_step};
pub use sysstat::{IdleBaseline, SystemCpu};

/// How long one request may take (from when it is sent) before it counts as a timeout error
/// and its connection is replaced; also how long after the measured window its unfinished
/// requests are waited for. Longer than the gateway's default chain timeout would be
/// pointless on loopback; much shorter would turn a slow-but-answering target into errors.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything `spindle bench` takes. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Chain configuration for the Spindle and Knative-style targets.
    pub config: PathBuf,
    /// Targets, measured in this order.
    pub targets: Vec<Target>,
    /// Measured window per target.
    pub duration: Duration,
    /// Load before the measured window, discarded (JIT, caches, connection set-up).
    pub warmup: Duration,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Requests per second across all connections: open loop when set, closed loop otherwise.
    pub rate: Option<u64>,
    /// Request path for the started targets; default: the first chain's `route` in `config`
    /// (`/` if no target needs the config). URL targets use their own path.
    pub path: Option<String>,
    /// Request body (sent as a POST), unless `payload_sizes` is set.
    pub payload: Vec<u8>,
    /// Payload sweep: one generated body ([`generated_payload`]) per size, each size measured
    /// on every target; replaces `payload`.
    pub payload_sizes: Option<Vec<usize>>,
    /// Interleaved rounds: every target (and size) once, in order, then again.
    pub rounds: usize,
    /// The expected response body; None: each target's first check response.
    pub expect: Option<Expect>,
    /// Compare each connection's responses 0, N, 2N, … with the expected body; 0: off.
    pub verify_every: u64,
    /// How long the machine is watched with no target running before each round, for the
    /// whole-system CPU figure's idle baseline; zero: no baseline (and no system CPU).
    pub idle_baseline: Duration,
    /// Write the report as JSON here.
    pub json: Option<PathBuf>,
    /// Write the Markdown report here (it is printed to stdout regardless).
    pub markdown: Option<PathBuf>,
    /// Write an SVG plot here (throughput bars, latency CDFs).
    pub plot: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            config: PathBuf::from("configs/hello.yaml"),
            targets: Target::defaults(),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 32,
            rate: None,
            path: None,
            payload: b"hello spindle".to_vec(),
            payload_sizes: None,
            rounds: 1,
            expect: None,
            verify_every: 16,
            idle_baseline: Duration::from_secs(2),
            json: None,
            markdown: None,
            plot: None,
        }
    }
}

/// Where the expected response body comes from when not from the check request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// `--expect-body TEXT`.
    Body(Vec<u8>),
    /// `--expect-file PATH`, read when the run starts.
    File(PathBuf),
}

/// The body sent for a payload size: `len` bytes of lowercase letters and digits from a fixed
/// pseudo-random sequence (xorshift64 seeded with 1), so every run and every target gets the
/// same bytes, the body compresses like text rather than like a run of one byte, and the
/// hello chain (uppercase, reverse, JSON frame) needs no escaping.
pub fn generated_payload(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize]
        })
        .collect()
}

/// The largest size [`parse_size`] accepts: 1 GiB (the load generator holds the body in
/// memory once per connection in flight).
pub const MAX_PAYLOAD: usize = 1 << 30;

/// Parses `13`, `4KiB`, `64KiB`, `1MiB`, `8MiB`, `512B`, `1.5MiB` (binary units; `K`, `KB`,
/// `M`, `MB`, `G`, `GB` are taken as binary too, as in the configs). At most 1 GiB.
pub fn parse_size(s: &str) -> Result<usize, BenchError> {
    let bad = |why: &str| BenchError::BadSize {
        input: s.to_string(),
        reason: why.to_string(),
    };
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| bad("expected a number with an optional unit, like 13, 4KiB or 1MiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(bad(&format!(
                "unknown unit `{other}`; use B, KiB, MiB or GiB"
            )));
        }
    };
    let bytes = value * scale;
    if bytes.fract() != 0.0 {
        return Err(bad("not a whole number of bytes"));
    }
    if bytes > MAX_PAYLOAD as f64 {
        return Err(bad("larger than the maximum of 1 GiB"));
    }
    Ok(bytes as usize)
}

/// Parses a comma-separated size list (`13,4KiB,64KiB,1MiB,8MiB`).
pub fn parse_sizes(list: &str) -> Result<Vec<usize>, BenchError> {
    let sizes = list
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    if sizes.is_empty() {
        return Err(BenchError::BadSize {
            input: list.to_string(),
            reason: "no sizes".into(),
        });
    }
    Ok(sizes)
}

/// One system under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A bare hyper hello-world server: `EXE bench-ceiling --listen ADDR`.
    Ceiling,
    /// `EXE run CONFIG --listen ADDR --dataplane userspace`.
    Userspace,
    /// `EXE run CONFIG --listen ADDR --dataplane sockmap` (needs root or CAP_BPF).
    Sockmap,
    /// `EXE knative-baseline run --config CONFIG --listen ADDR`.
    Knative,
    /// An already running server, e.g. a real Knative service: `http://host[:port][/path]`.
    Url(String),
}

impl Target {
    /// The default comparison: all four built-in targets.
    pub fn defaults() -> Vec<Target> {
        vec![
            Target::Ceiling,
            Target::Userspace,
            Target::Sockmap,
            Target::Knative,
        ]
    }

    /// The keyword used in `--targets` and in the report's `mode` (`url` for a URL).
    pub fn mode(&self) -> &'static str {
        match self {
            Target::Ceiling => "ceiling",
            Target::Userspace => "userspace",
            Target::Sockmap => "sockmap",
            Target::Knative => "knative",
            Target::Url(_) => "url",
        }
    }

    /// The name shown in the report.
    pub fn display_name(&self) -> String {
        match self {
            Target::Ceiling => "hyper hello-world (ceiling)".into(),
            Target::Userspace => "Spindle userspace".into(),
            Target::Sockmap => "Spindle sockmap".into(),
            Target::Knative => "Knative-style baseline".into(),
            Target::Url(url) => url.clone(),
        }
    }

    /// Whether the target is started from the chain configuration.
    fn needs_config(&self) -> bool {
        matches!(self, Target::Userspace | Target::Sockmap | Target::Knative)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Url(url) => f.write_str(url),
            other => f.write_str(other.mode()),
        }
    }
}

impl FromStr for Target {
    type Err = BenchError;

    /// One item of the `--targets` list: a keyword (case-insensitive) or an `http://` URL.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let word = s.trim();
        match word.to_ascii_lowercase().as_str() {
            "ceiling" => return Ok(Target::Ceiling),
            "userspace" => return Ok(Target::Userspace),
            "sockmap" => return Ok(Target::Sockmap),
            "knative" => return Ok(Target::Knative),
            _ => {}
        }
        if word.contains("://") {
            client::parse_url(word)?;
            return Ok(Target::Url(word.to_string()));
        }
        Err(BenchError::UnknownTarget(word.to_string()))
    }
}

/// Parses a comma-separated target list (`ceiling,userspace,http://host:8080/hello`).
pub fn parse_targets(list: &str) -> Result<Vec<Target>, BenchError> {
    let targets = list
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(Target::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err(BenchError::NoTargets);
    }
    Ok(targets)
}

/// The longest duration [`parse_duration`] accepts: a day.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses `10s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number means seconds. At most
/// [`MAX_DURATION`] (24 h). For clap's `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, BenchError> {
    let bad = |why: &str| BenchError::BadDuration {
        input: s.to_string(),
        reason: why.to_string(),
    };
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(bad("expected a number with a unit, like 10s, 500ms or 2m"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| bad("expected a number with a unit, like 10s, 500ms or 2m"))?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(bad(&format!("unknown unit `{other}`; use ms, s, m or h")));
        }
    };
    let seconds = value * scale;
    if seconds > MAX_DURATION.as_secs_f64() {
        return Err(bad("longer than the maximum of 24 h"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| bad("out of range"))
}

/// Why `spindle bench` failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown target `{0}`: expected ceiling, userspace, sockmap, knative or a URL")]
    UnknownTarget(String),
    #[error("no targets to measure: the target list is empty")]
    NoTargets,
    #[error("bad URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("bad duration `{input}`: {reason}")]
    BadDuration { input: String, reason: String },
    #[error("bad size `{input}`: {reason}")]
    BadSize { input: String, reason: String },
    #[error("{0}")]
    BadOptions(String),
    #[error("config file {} not found (needed to start {needed_by}; pass --config FILE)", path.display())]
    ConfigMissing { path: PathBuf, needed_by: String },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the plot {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    /// Every target was skipped; the report (with each reason) was still printed and written.
    #[error("nothing was measured: every target was skipped ({})", skip_summary(.report))]
    NothingMeasured { report: Box<Report> },
    /// SIGINT or SIGTERM during the run; targets were stopped, and the partial report (the
    /// unfinished targets marked skipped) was printed and written.
    #[error("interrupted; every started target was stopped")]
    Interrupted { report: Box<Report> },
    /// The hops mode measured no target; the report (with each reason) was still written.
    #[error("nothing was measured: every target was skipped ({})", hops_skip_summary(.report))]
    HopsNothingMeasured { report: Box<HopsReport> },
    #[error("interrupted; every started target was stopped")]
    HopsInterrupted { report: Box<HopsReport> },
}

fn hops_skip_summary(report: &HopsReport) -> String {
    report
        .targets
        .iter()
        .map(|t| {
            let first = t.skipped.as_deref().unwrap_or("measured").lines().next();
            format!("{}: {}", t.name, first.unwrap_or(""))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn skip_summary(report: &Report) -> String {
    report
        .targets
        .iter()
        .map(|t| {
            let reason = t.skipped.as_deref().unwrap_or("measured");
            let first = reason.lines().next().unwrap_or("");
            format!("{}: {first}", t.name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl BenchError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_words_and_urls() {
        assert_eq!(
            parse_targets("ceiling, userspace,SOCKMAP,knative").unwrap(),
            Target::defaults()
        );
        assert_eq!(
            parse_targets("http://127.0.0.1:8080/hello,ceiling").unwrap(),
            vec![
                Target::Url("http://127.0.0.1:8080/hello".into()),
                Target::Ceiling
            ]
        );
        assert_eq!(
            "http://svc.default.example.com".parse::<Target>().unwrap(),
            Target::Url("http://svc.default.example.com".into())
        );
        assert_eq!(Target::Sockmap.to_string(), "sockmap");
        assert_eq!(Target::Url("http://a/b".into()).mode(), "url");
    }

    #[test]
    fn rejects_bad_targets_with_the_documented_message() {
        let err = parse_targets("ceiling,foo").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown target `foo`: expected ceiling, userspace, sockmap, knative or a URL"
        );
        assert!(matches!(parse_targets(" , "), Err(BenchError::NoTargets)));
        // A host:port without a scheme is not a URL we can load.
        assert!(matches!(
            parse_targets("localhost:8080"),
            Err(BenchError::UnknownTarget(_))
        ));
        for url in [
            "http://",
            "https://example.com/",
            "ftp://x/",
            "http://exa mple/",
        ] {
            let err = url.parse::<Target>().unwrap_err();
            assert!(matches!(err, BenchError::BadUrl { .. }), "{url}: {err}");
            assert!(
                err.to_string().starts_with(&format!("bad URL `{url}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("24h").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("1440m").unwrap(), MAX_DURATION);
        for bad in [
            "",
            "s",
            "10x",
            "-1s",
            "1..2s",
            "ten",
            "1e400s",
            "25h",
            "86401",
            "1441m",
            "18446744073709551616s",
            "99999999999999999999999h",
            &"9".repeat(400),
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(matches!(err, BenchError::BadDuration { .. }), "{bad}");
            assert!(
                err.to_string()
                    .starts_with(&format!("bad duration `{bad}`"))
            );
        }
        assert!(
            parse_duration("10x")
                .unwrap_err()
                .to_string()
                .contains("unknown unit `x`")
        );
        assert_eq!(
            parse_duration("25h").unwrap_err().to_string(),
            "bad duration `25h`: longer than the maximum of 24 h"
        );
    }

    #[test]
    fn defaults_match_the_cli_documentation() {
        let o = BenchOptions::default();
        assert_eq!(o.config, PathBuf::from("configs/hello.yaml"));
        assert_eq!(o.targets.len(), 4);
        assert_eq!(o.duration, Duration::from_secs(10));
        assert_eq!(o.warmup, Duration::from_secs(2));
        assert_eq!(o.connections, 32);
        assert_eq!(o.rate, None);
        assert_eq!(o.payload, b"hello spindle");
        assert_eq!((o.rounds, o.verify_every), (1, 16));
        assert_eq!(o.idle_baseline, Duration::from_secs(2));
        assert_eq!((o.payload_sizes, o.expect), (None, None));
    }

    #[test]
    fn parses_payload_sizes() {
        assert_eq!(
            parse_sizes("13,4KiB,64KiB,1MiB,8MiB").unwrap(),
            [13, 4096, 65536, 1 << 20, 8 << 20]
        );
        assert_eq!(parse_size("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_size(" 512B ").unwrap(), 512);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size("1GiB").unwrap(), MAX_PAYLOAD);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "KiB", "1.3B", "2GiB", "4 parsecs", "-1"] {
            let err = parse_size(bad).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("bad size `{bad}`")),
                "{err}"
            );
        }
        assert!(parse_sizes(" , ").is_err());
    }

    #[test]
    fn generated_payloads_are_deterministic_text() {
        let a = generated_payload(4096);
        assert_eq!(a.len(), 4096);
        assert_eq!(a, generated_payload(4096));
        // A prefix of a longer one: every size is the same sequence, cut.
        assert_eq!(&generated_payload(64 << 10)[..4096], &a[..]);
        assert!(
            a.iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        // Not one repeated byte, not a short cycle.
        assert!(a.windows(36).any(|w| w != &a[..36]));
        let distinct = a.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 36);
        assert!(generated_payload(0).is_empty());
    }
}
