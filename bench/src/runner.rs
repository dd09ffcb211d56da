//! [`run`]: start each target, check it, load it, account its CPU, stop it, round after
//! round; then report.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, raise, sigaction, signal};

use crate::client::{self, Endpoint};
use crate::load::{self, LoadResult, LoadSpec, Verify, Window};
use crate::process::TargetProcess;
use crate::report::{
    CdfPoint, CheckSample, Machine, Mismatch, OptionsReport, Ratios, Report, SizeRatios,
    TargetReport, Verification,
};
use crate::sysstat::{self, CpuTimes, IdleBaseline};
use crate::{BenchError, BenchOptions, Expect, REQUEST_TIMEOUT, Target, config, cpu, scrape};

/// Wasm compilation of every function happens before /readyz turns 200; a debug build of the
/// gateway takes seconds for that.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_millis(100);
/// Lines of a failed target's output quoted in its skip reason.
const LOG_LINES: usize = 12;
/// A /metrics page is small; a target too busy to answer it in this long gets no figure.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const CDF_QUANTILES: [f64; 24] = [
    0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99,
    0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 1.0,
];

/// Runs the comparison described by `opts`, starting targets from the `spindle` binary `exe`.
///
/// Round after round (`opts.rounds`), every payload size and every target in order: measure
/// the idle baseline, then start, check, load and stop each target. Prints progress to
/// stderr and the Markdown report to stdout, and writes the JSON, Markdown and plot files
/// that `opts` names. The report is written even when the result is
/// [`BenchError::NothingMeasured`] or [`BenchError::Interrupted`] (both carry it).
///
/// Call it from the main thread (or any thread that outlives the run), outside an async
/// runtime: it builds its own, and targets get `PR_SET_PDEATHSIG`, which fires when the
/// *thread* that started them exits. While it runs, SIGINT/SIGTERM stop the run (a second one
/// kills the process the default way); the previous handlers are restored on return.
pub fn run(opts: &BenchOptions, exe: &Path) -> Result<Report, BenchError> {
    check_options(opts)?;
    let config = config_for(opts)?;
    let path = request_path(opts, config.as_deref())?;
    let expect = expected_override(opts)?;
    let payloads: Vec<Bytes> = match &opts.payload_sizes {
        Some(sizes) => sizes
            .iter()
            .map(|&n| Bytes::from(crate::generated_payload(n)))
            .collect(),
        None => vec![Bytes::from(opts.payload.clone())],
    };
    let session = Session::new(exe, opts.connections)?;
    let machine = Machine::detect();

    // Rows: every size × every target, sizes outermost, so one size's targets are adjacent.
    let rows: Vec<(usize, &Target)> = (0..payloads.len())
        .flat_map(|p| opts.targets.iter().map(move |t| (p, t)))
        .collect();
    let mut rounds: Vec<Vec<TargetReport>> = vec![Vec::new(); rows.len()];
    let mut expected: Vec<Option<Expected>> = vec![expect.clone(); rows.len()];
    let mut baselines = Vec::new();
    for round in 0..opts.rounds {
        let baseline = if session.interrupt.fired() || opts.idle_baseline.is_zero() {
            None
        } else {
            eprintln!(
                "spindle bench: round {}/{}: idle baseline ({:.1} s, no target running)",
                round + 1,
                opts.rounds,
                opts.idle_baseline.as_secs_f64()
            );
            session.idle_baseline(round, opts.idle_baseline)
        };
        if let Some(b) = &baseline {
            eprintln!("  {:.3} CPU-s/s busy", b.busy_cpu_per_s);
            baselines.push(b.clone());
        }
        for (i, &(p, target)) in rows.iter().enumerate() {
            let mut result = if session.interrupt.fired() {
                TargetReport::skipped(target, None, "not run: interrupted")
            } else {
                eprintln!(
                    "spindle bench: round {}/{}: {} ({} byte body)",
                    round + 1,
                    opts.rounds,
                    target.display_name(),
                    payloads[p].len()
                );
                let bench = TargetBench {
                    session: &session,
                    opts,
                    target,
                    config: config.as_deref(),
                    path: &path,
                    payload: payloads[p].clone(),
                    round,
                    baseline: baseline.as_ref(),
                };
                let result = bench.run(&mut expected[i]);
                if let Some(reason) = &result.skipped {
                    eprintln!("  skipped: {}", reason.lines().next().unwrap_or_default());
                }
                result
            };
            result.round = Some(round);
            result.payload_bytes = Some(payloads[p].len());
            rounds[i].push(result);
        }
    }
    let interrupted = session.interrupt.fired();
    drop(session);

    let targets: Vec<TargetReport> = rows
        .iter()
        .zip(rounds)
        .map(|(&(_, target), rounds)| TargetReport::over_rounds(target, rounds))
        .collect();
    let by_size: Vec<SizeRatios> = payloads
        .iter()
        .enumerate()
        .map(|(p, body)| SizeRatios {
            payload_bytes: body.len(),
            ratios: Ratios::compute(
                &rows
                    .iter()
                    .zip(&targets)
                    .filter(|((q, _), _)| *q == p)
                    .map(|(_, t)| t.clone())
                    .collect::<Vec<_>>(),
            ),
        })
        .collect();
    let report = Report {
        machine,
        options: OptionsReport::new(opts, &path, session_threads(opts.connections)),
        ratios: by_size[0].ratios.clone(),
        ratios_by_size: (by_size.len() > 1).then_some(by_size),
        idle_baselines: (!baselines.is_empty()).then_some(baselines),
        targets,
    };
    emit(&report, opts)?;
    if interrupted {
        return Err(BenchError::Interrupted {
            report: Box::new(report),
        });
    }
    if report.targets.iter().all(|t| t.skipped.is_some()) {
        return Err(BenchError::NothingMeasured {
            report: Box::new(report),
        });
    }
    Ok(report)
}

fn check_options(opts: &BenchOptions) -> Result<(), BenchError> {
    if opts.targets.is_empty() {
        return Err(BenchError::NoTargets);
    }
    if opts.connections == 0 {
        return Err(BenchError::BadOptions(
            "--connections must be at least 1".into(),
        ));
    }
    if opts.duration.is_zero() {
        return Err(BenchError::BadOptions(
            "--duration must be longer than 0".into(),
        ));
    }
    if opts.rate == Some(0) {
        return Err(BenchError::BadOptions(
            "--rate must be at least 1 request/s".into(),
        ));
    }
    if opts.rounds == 0 {
        return Err(BenchError::BadOptions("--rounds must be at least 1".into()));
    }
    if opts.payload_sizes.as_ref().is_some_and(Vec::is_empty) {
        return Err(BenchError::BadOptions(
            "--payload-sizes needs at least one size".into(),
        ));
    }
    for target in &opts.targets {
        if let Target::Url(url) = target {
            client::parse_url(url)?;
        }
    }
    Ok(())
}

/// The expected body and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expected {
    pub body: Bytes,
    pub source: String,
}

fn expected_override(opts: &BenchOptions) -> Result<Option<Expected>, BenchError> {
    Ok(match &opts.expect {
        None => None,
        Some(Expect::Body(body)) => Some(Expected {
            body: Bytes::from(body.clone()),
            source: "--expect-body".into(),
        }),
        Some(Expect::File(path)) => Some(Expected {
            body: Bytes::from(
                std::fs::read(path)
                    .map_err(BenchError::io(format!("reading {}", path.display())))?,
            ),
            source: format!("--expect-file {}", path.display()),
        }),
    })
}

/// The absolute config path if some target is started from it. Absolute, because the
/// target's working directory is ours only by accident of how it is spawned.
fn config_for(opts: &BenchOptions) -> Result<Option<PathBuf>, BenchError> {
    let users: Vec<&str> = opts
        .targets
        .iter()
        .filter(|t| t.needs_config())
        .map(|t| t.mode())
        .collect();
    if users.is_empty() {
        return Ok(None);
    }
    if !opts.config.is_file() {
        return Err(BenchError::ConfigMissing {
            path: opts.config.clone(),
            needed_by: users.join(", "),
        });
    }
    std::fs::canonicalize(&opts.config)
        .map(Some)
        .map_err(BenchError::io(format!("reading {}", opts.config.display())))
}

fn request_path(opts: &BenchOptions, config: Option<&Path>) -> Result<String, BenchError> {
    if let Some(path) = &opts.path {
        return Ok(if path.starts_with('/') {
            path.clone()
        } else {
            format!("/{path}")
        });
    }
    let Some(config) = config else {
        // Only the ceiling and URLs: the ceiling answers any path.
        return Ok(match std::fs::read_to_string(&opts.config) {
            Ok(text) => config::first_route(&text).unwrap_or_else(|| "/".into()),
            Err(_) => "/".into(),
        });
    };
    let text = std::fs::read_to_string(config)
        .map_err(BenchError::io(format!("reading {}", config.display())))?;
    config::first_route(&text).ok_or_else(|| BenchError::Config {
        path: opts.config.clone(),
        reason: "no chain with a `route:` found to send requests to; pass --path".into(),
    })
}

fn session_threads(connections: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(connections)
        .max(1)
}

/// What every measurement of a run shares: the load generator's runtime, the binary targets
/// are started from, and the Ctrl-C flag. Dropping it restores the signal handlers.
pub(crate) struct Session<'a> {
    pub runtime: tokio::runtime::Runtime,
    pub exe: &'a Path,
    pub interrupt: Interrupt,
}

impl<'a> Session<'a> {
    pub fn new(exe: &'a Path, connections: usize) -> Result<Session<'a>, BenchError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(session_threads(connections))
            .thread_name("spindle-bench")
            .enable_all()
            .build()
            .map_err(BenchError::io("starting the load generator's runtime"))?;
        Ok(Session {
            runtime,
            exe,
            interrupt: Interrupt::install(),
        })
    }

    /// Watches `/proc/stat` for `length` with no target running (this process idle too).
    /// None if interrupted or /proc/stat is unreadable.
    pub fn idle_baseline(&self, round: usize, length: Duration) -> Option<IdleBaseline> {
        let Some((s0, self0)) = sysstat::read_proc_stat().zip(cpu::self_cpu_seconds()) else {
            tracing::warn!("cannot read /proc/stat or /proc/self/stat: no system CPU figures");
            return None;
        };
        let t0 = Instant::now();
        let end = t0 + length;
        while Instant::now() < end {
            if self.interrupt.fired() {
                return None;
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
        let (s1, self1) = (sysstat::read_proc_stat()?, cpu::self_cpu_seconds()?);
        let delta = sysstat::delta(&s0, &s1, t0.elapsed().as_secs_f64());
        Some(IdleBaseline::from_delta(round, &delta, self1 - self0))
    }

    /// Starts `target` (or resolves a URL) and waits until it is ready. The process lives as
    /// long as the returned value: dropping it stops the target. Err: where it was to listen
    /// (if known) and why it cannot be measured.
    pub fn start(
        &self,
        target: &Target,
        config: Option<&Path>,
        path: &str,
    ) -> Result<(Endpoint, Option<TargetProcess>), (Option<Endpoint>, String)> {
        match target {
            Target::Url(url) => match self.runtime.block_on(client::resolve(url)) {
                Ok(endpoint) => Ok((endpoint, None)),
                Err(reason) => Err((None, reason)),
            },
            builtin => {
                let addr = free_loopback_port()
                    .map_err(|e| (None, format!("no free loopback port: {e}")))?;
                let endpoint = Endpoint::loopback(addr, path);
                let args = target_args(builtin, config, addr);
                // Spawned on this (the caller's) thread: see `run` on PR_SET_PDEATHSIG.
                let mut process = TargetProcess::spawn(self.exe, &args).map_err(|e| {
                    (
                        Some(endpoint.clone()),
                        format!("cannot start {}: {e}", self.exe.display()),
                    )
                })?;
                eprintln!("  started {} (pid {})", process.command_line, process.pid());
                let ready =
                    self.runtime
                        .block_on(wait_ready(&mut process, &endpoint, &self.interrupt));
                match ready {
                    Ok(()) => Ok((endpoint, Some(process))),
                    Err(reason) => Err((Some(endpoint), reason)),
                }
            }
        }
    }
}

/// The command line that starts a built-in target listening on `addr`.
pub(crate) fn target_args(
    target: &Target,
    config: Option<&Path>,
    addr: SocketAddr,
) -> Vec<OsString> {
    let config = config.map(|c| c.as_os_str().to_owned()).unwrap_or_default();
    let listen = OsString::from(addr.to_string());
    let strs = |items: &[&str]| items.iter().map(OsString::from).collect::<Vec<_>>();
    match target {
        Target::Ceiling => {
            let mut a = strs(&["bench-ceiling", "--listen"]);
            a.push(listen);
            a
        }
        Target::Userspace | Target::Sockmap => {
            let mut a = strs(&["run"]);
            a.push(config);
            a.extend(strs(&["--listen"]));
            a.push(listen);
            a.extend(strs(&["--dataplane", target.mode()]));
            a
        }
        Target::Knative => {
            let mut a = strs(&["knative-baseline", "run", "--config"]);
            a.push(config);
            a.extend(strs(&["--listen"]));
            a.push(listen);
            a
        }
        Target::Url(_) => Vec::new(),
    }
}

/// One target, one payload, one round.
struct TargetBench<'a> {
    session: &'a Session<'a>,
    opts: &'a BenchOptions,
    target: &'a Target,
    config: Option<&'a Path>,
    path: &'a str,
    payload: Bytes,
    round: usize,
    baseline: Option<&'a IdleBaseline>,
}

impl TargetBench<'_> {
    fn skipped(&self, endpoint: Option<&Endpoint>, reason: impl Into<String>) -> TargetReport {
        let url = match (endpoint, self.target) {
            (Some(e), _) => Some(e.url()),
            (None, Target::Url(url)) => Some(url.clone()),
            (None, _) => None,
        };
        TargetReport::skipped(self.target, url, reason)
    }

    /// `expected`: this row's expected body, filled from this round's check if still unset.
    fn run(&self, expected: &mut Option<Expected>) -> TargetReport {
        let session = self.session;
        // `process` lives until this function returns: every path out stops the target.
        let (endpoint, process) = match session.start(self.target, self.config, self.path) {
            Ok(started) => started,
            Err((endpoint, reason)) => return self.skipped(endpoint.as_ref(), reason),
        };
        let (check, body) = match session
            .runtime
            .block_on(check_target_body(&endpoint, self.payload.clone()))
        {
            Ok(answer) => answer,
            Err(reason) => return self.skipped(Some(&endpoint), reason),
        };
        let expected = match expected {
            Some(e) if e.body != body => {
                return self.skipped(
                    Some(&endpoint),
                    format!(
                        "the check request's body differs from the expected one ({}: {} bytes): \
                         it answered {} bytes: {}",
                        e.source,
                        e.body.len(),
                        body.len(),
                        snippet(&body)
                    ),
                );
            }
            Some(e) => e.clone(),
            None => expected
                .insert(Expected {
                    body,
                    source: format!("check (round {})", self.round + 1),
                })
                .clone(),
        };

        let spec = LoadSpec {
            endpoint: endpoint.clone(),
            payload: self.payload.clone(),
            connections: self.opts.connections,
            rate: self.opts.rate,
            step: None,
            timeout: REQUEST_TIMEOUT,
            record: false,
            verify: (self.opts.verify_every > 0).then(|| Verify {
                expected: expected.body.clone(),
                every: self.opts.verify_every,
            }),
        };
        let root = process.as_ref().map(|p| p.pid());
        let label = self.target.display_name();
        let interrupt = &session.interrupt;
        let measured = session.runtime.block_on(async {
            tokio::select! {
                m = measure(spec, self.opts, root, label) => Some(m),
                () = interrupt.wait() => None,
            }
        });
        let Some(measured) = measured else {
            return self.skipped(Some(&endpoint), "interrupted during the measurement");
        };
        if let Some(mut process) = process
            && let Some(status) = process.exited()
        {
            eprintln!(
                "  warning: the target exited during the run ({status}); its last output:\n{}",
                process.log_tail(LOG_LINES)
            );
        }
        self.report(&endpoint, check, &expected, measured)
    }

    fn report(
        &self,
        endpoint: &Endpoint,
        check: CheckSample,
        expected: &Expected,
        m: Measured,
    ) -> TargetReport {
        let LoadResult {
            histogram,
            ok,
            errors,
            lateness,
            samples: _,
            verified,
            first_wrong,
        } = m.load;
        let duration = self.opts.duration.as_secs_f64();
        // CPU is read at the window's edges by a task that a loaded machine can wake late,
        // so the readings may span less (or more) than the window whose requests are
        // counted. Per request is therefore CPU-seconds per second of the readings' interval
        // over requests per second of the window.
        let scale = m
            .interval_s
            .filter(|&i| i > 0.0)
            .map_or(1.0, |interval| duration / interval);
        let per_request = |seconds: f64| (ok > 0).then(|| seconds * scale / ok as f64);
        let latency = |q: f64| (ok > 0).then(|| histogram.value_at_quantile(q));
        let cdf = (ok > 0).then(|| {
            CDF_QUANTILES
                .iter()
                .map(|&q| CdfPoint {
                    q,
                    us: histogram.value_at_quantile(q),
                })
                .collect()
        });
        let system_cpu = match (m.stat, self.baseline) {
            (Some(delta), Some(baseline)) => Some(sysstat::net_system_cpu(
                &delta,
                baseline,
                m.loadgen_cpu_s.unwrap_or(0.0),
            )),
            _ => None,
        };
        let bytes_copied = scrape::per_request(m.metrics.0, m.metrics.1, ok);
        let verification = (self.opts.verify_every > 0).then(|| Verification {
            source: expected.source.clone(),
            every: self.opts.verify_every,
            expected_bytes: expected.body.len(),
            verified,
            wrong_body: errors.wrong_body,
            first_mismatch: first_wrong.map(|w| Mismatch {
                round: Some(self.round),
                bytes: w.len,
                body: snippet(&w.head),
            }),
        });
        TargetReport {
            name: self.target.display_name(),
            mode: self.target.mode().to_string(),
            url: Some(endpoint.url()),
            rps: Some(round1(ok as f64 / duration)),
            p50_us: latency(0.5),
            p90_us: latency(0.9),
            p99_us: latency(0.99),
            p999_us: latency(0.999),
            max_us: (ok > 0).then(|| histogram.max()),
            mean_us: (ok > 0).then(|| round1(histogram.mean())),
            errors: Some(errors.total()),
            error_kinds: Some(errors),
            requests: Some(ok),
            duration_s: Some(duration),
            intended_rps: self.opts.rate.map(|r| r as f64),
            sched_lateness_p99_us: (self.opts.rate.is_some() && !lateness.is_empty())
                .then(|| lateness.value_at_quantile(0.99)),
            cpu_s_per_req: m.tree.as_ref().and_then(|t| per_request(t.seconds)),
            cpu_s: m.tree.as_ref().map(|t| t.seconds),
            loadgen_cpu_s_per_req: m.loadgen_cpu_s.and_then(per_request),
            processes: m.tree.map(|t| t.processes),
            check: Some(check),
            cdf,
            skipped: None,
            round: Some(self.round),
            payload_bytes: Some(self.payload.len()),
            system_cpu_s_per_req: system_cpu.as_ref().and_then(|s| per_request(s.net_s)),
            softirq_s_per_req: system_cpu
                .as_ref()
                .and_then(|s| per_request(s.net_softirq_s)),
            softirq_share: system_cpu.as_ref().and_then(|s| s.softirq_share),
            system_cpu,
            bytes_copied_per_req: bytes_copied.as_ref().ok().copied(),
            bytes_copied_note: bytes_copied.err(),
            verification,
            cpu_interval_s: m.interval_s,
            spread: None,
            rounds_measured: None,
            rounds: None,
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    // Bound and released: the target binds it again a few milliseconds later. Another
    // process could grab it in between; then the target fails to start and says so.
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.trim().to_string()
}

/// The line of a failed target's output that most likely says why: the last one mentioning
/// an error, else the last one. The skip reason leads with it, since its first line is what
/// the progress output and the Markdown list show.
fn key_line(output: &str) -> &str {
    let lines = || {
        output
            .lines()
            .rev()
            .map(str::trim)
            .filter(|l| !l.is_empty())
    };
    lines()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or_else(|| lines().next())
        .unwrap_or("no output")
}

async fn wait_ready(
    process: &mut TargetProcess,
    endpoint: &Endpoint,
    interrupt: &Interrupt,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if interrupt.fired() {
            return Err("interrupted while starting".into());
        }
        if let Some(status) = process.exited() {
            let tail = process.log_tail(LOG_LINES);
            return Err(format!(
                "exited ({status}) before it was ready: {}\n{tail}",
                key_line(&tail)
            ));
        }
        let probe = client::one_shot(
            Method::GET,
            endpoint,
            "/readyz",
            Bytes::new(),
            Duration::from_secs(1),
        )
        .await;
        let last = match probe {
            Ok((status, _)) if status.as_u16() == 200 => return Ok(()),
            Ok((status, body)) => format!("GET /readyz answered {status}: {}", snippet(&body)),
            Err(e) => format!("GET /readyz: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "not ready after {} s: {last}\n{}",
                READY_TIMEOUT.as_secs(),
                process.log_tail(LOG_LINES)
            ));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// One request before the load: a target that answers the configured request with an error
/// (wrong path, bad config) would otherwise be benchmarked serving error pages.
pub(crate) async fn check_target(
    endpoint: &Endpoint,
    payload: Bytes,
) -> Result<CheckSample, String> {
    check_target_body(endpoint, payload).await.map(|(c, _)| c)
}

/// [`check_target`], also returning the whole body (the expected body under load).
pub(crate) async fn check_target_body(
    endpoint: &Endpoint,
    payload: Bytes,
) -> Result<(CheckSample, Bytes), String> {
    let sent = payload.len();
    let answer = client::one_shot(
        Method::POST,
        endpoint,
        &endpoint.path,
        payload,
        REQUEST_TIMEOUT,
    )
    .await;
    match answer {
        Ok((status, body)) if status.is_success() => Ok((
            CheckSample {
                status: status.as_u16(),
                body: snippet(&body),
                bytes: Some(body.len()),
            },
            body,
        )),
        // A size the target does not take is a property of the target (its slot size), not a
        // failure of the run: say so plainly, so a sweep's row shows it as such.
        Ok((status, body)) if status == hyper::StatusCode::PAYLOAD_TOO_LARGE => Err(format!(
            "413 Payload Too Large: the target's limit is below this {} body ({sent} bytes): {}",
            crate::report::human_bytes(sent),
            snippet(&body)
        )),
        Ok((status, body)) => Err(format!(
            "the check request POST {} answered {status}, expected 2xx: {}",
            endpoint.url(),
            snippet(&body)
        )),
        Err(e) => Err(format!(
            "the check request POST {} failed: {e}",
            endpoint.url()
        )),
    }
}

/// The target's `spindle_payload_bytes_copied_total`, summed: Ok(None) if not exposed.
async fn scrape_bytes_copied(endpoint: &Endpoint) -> Result<Option<f64>, String> {
    match client::one_shot(
        Method::GET,
        endpoint,
        "/metrics",
        Bytes::new(),
        SCRAPE_TIMEOUT,
    )
    .await
    {
        Ok((status, body)) if status.is_success() => Ok(scrape::counter_sum(
            &String::from_utf8_lossy(&body),
            scrape::BYTES_COPIED_FAMILY,
        )),
        Ok((status, _)) => Err(format!("not exposed: GET /metrics answered {status}")),
        Err(e) => Err(format!("GET /metrics failed: {e}")),
    }
}

struct Measured {
    load: LoadResult,
    tree: Option<cpu::TreeCpu>,
    loadgen_cpu_s: Option<f64>,
    /// The whole machine's CPU between the window's two readings.
    stat: Option<sysstat::StatDelta>,
    /// bytes-copied counter before and after.
    metrics: (Result<Option<f64>, String>, Result<Option<f64>, String>),
    /// Seconds between the two CPU readings.
    interval_s: Option<f64>,
}

/// One edge of the measured window.
struct Snapshot {
    at: Instant,
    stat: Option<CpuTimes>,
    self_cpu: Option<f64>,
    tree: Option<cpu::TreeSnapshot>,
    metrics: Result<Option<f64>, String>,
}

async fn snapshot(root: Option<i32>, endpoint: &Endpoint) -> Snapshot {
    // The cheap, whole-machine readings first and together, so their interval is the window.
    let at = Instant::now();
    let stat = sysstat::read_proc_stat();
    let self_cpu = cpu::self_cpu_seconds();
    let tree = match root {
        // Reading a few hundred /proc files takes milliseconds: keep it off the workers.
        Some(pid) => tokio::task::spawn_blocking(move || cpu::tree(pid))
            .await
            .ok(),
        None => None,
    };
    let metrics = scrape_bytes_copied(endpoint).await;
    Snapshot {
        at,
        stat,
        self_cpu,
        tree,
        metrics,
    }
}

async fn measure(
    spec: LoadSpec,
    opts: &BenchOptions,
    root: Option<i32>,
    label: String,
) -> Measured {
    let window = Window::starting_now(opts.warmup, opts.duration);
    let endpoint = spec.endpoint.clone();
    let accounting = async {
        tokio::time::sleep_until(window.measure_start).await;
        let a = snapshot(root, &endpoint).await;
        tokio::time::sleep_until(window.end).await;
        let b = snapshot(root, &endpoint).await;
        let tree = match (&a.tree, &b.tree) {
            (Some(x), Some(y)) => Some(cpu::diff(x, y)),
            _ => None,
        };
        let loadgen = match (a.self_cpu, b.self_cpu) {
            (Some(x), Some(y)) => Some(y - x),
            _ => None,
        };
        let stat = match (&a.stat, &b.stat) {
            (Some(x), Some(y)) => Some(sysstat::delta(
                x,
                y,
                b.at.duration_since(a.at).as_secs_f64(),
            )),
            _ => None,
        };
        let interval = b.at.duration_since(a.at).as_secs_f64();
        (tree, loadgen, stat, (a.metrics, b.metrics), interval)
    };
    let (load, (tree, loadgen_cpu_s, stat, metrics, interval)) =
        tokio::join!(load::generate(spec, window, Some(label)), accounting);
    Measured {
        load,
        tree,
        loadgen_cpu_s,
        stat,
        metrics,
        interval_s: Some(interval),
    }
}

fn emit(report: &Report, opts: &BenchOptions) -> Result<(), BenchError> {
    use std::io::Write;
    let markdown = report.to_markdown();
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(markdown.as_bytes());
    let _ = stdout.flush();
    drop(stdout);
    // Write every requested file even if one fails; report the first failure.
    let mut first_error = None;
    let mut keep = |r: Result<(), BenchError>| {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    };
    if let Some(path) = &opts.json {
        keep(
            std::fs::write(path, report.to_json())
                .map_err(BenchError::io(format!("writing {}", path.display()))),
        );
    }
    if let Some(path) = &opts.markdown {
        keep(
            std::fs::write(path, &markdown)
                .map_err(BenchError::io(format!("writing {}", path.display()))),
        );
    }
    if let Some(path) = &opts.plot {
        keep(report.write_svg(path));
    }
    first_error.map_or(Ok(()), Err)
}

/// SIGINT/SIGTERM while a run is in progress: a flag the run polls, so it can stop and reap
/// its targets and still write the report. Installed for the duration of `run` (counted, so
/// concurrent runs in one process share it) and then the previous handlers are restored.
pub(crate) struct Interrupt;

static FIRED: AtomicBool = AtomicBool::new(false);
static INSTALLED: Mutex<(usize, Vec<(Signal, SigAction)>)> = Mutex::new((0, Vec::new()));

extern "C" fn on_signal(sig: std::ffi::c_int) {
    if FIRED.swap(true, Ordering::SeqCst) {
        // The second Ctrl-C: stop waiting for a graceful end. Dying by the signal's default
        // action still takes the targets along (parent-death signal).
        // Only SIGINT and SIGTERM are routed here, so the conversion cannot fail.
        if let Ok(sig) = Signal::try_from(sig) {
            // SAFETY: the handler it replaces is on_signal, so the previous handler nix hands
            // back is a valid function; signal and raise are one libc call each here,
            // async-signal-safe and allocation-free.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
            let _ = raise(sig);
        }
    }
}

impl Interrupt {
    fn install() -> Interrupt {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if installed.0 == 0 {
            FIRED.store(false, Ordering::SeqCst);
            let action = SigAction::new(
                SigHandler::Handler(on_signal),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            for sig in [Signal::SIGINT, Signal::SIGTERM] {
                // SAFETY: the handler only touches an atomic and makes async-signal-safe calls.
                if let Ok(old) = unsafe { sigaction(sig, &action) } {
                    installed.1.push((sig, old));
                }
            }
        }
        installed.0 += 1;
        Interrupt
    }

    pub fn fired(&self) -> bool {
        FIRED.load(Ordering::SeqCst)
    }

    /// Resolves once a signal has arrived. Polled: a signal handler cannot wake a task.
    pub async fn wait(&self) {
        while !self.fired() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("spindle bench: interrupted, stopping the target");
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        installed.0 -= 1;
        if installed.0 == 0 {
            for (sig, old) in installed.1.drain(..) {
                // SAFETY: restores the action sigaction returned when we installed ours.
                let _ = unsafe { sigaction(sig, &old) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(targets: Vec<Target>) -> BenchOptions {
        BenchOptions {
            targets,
            ..BenchOptions::default()
        }
    }

    #[test]
    fn rejects_bad_options_before_starting_anything() {
        let exe = Path::new("/nonexistent/spindle");
        let mut o = opts(vec![Target::Ceiling]);
        o.connections = 0;
        assert!(
            matches!(run(&o, exe), Err(BenchError::BadOptions(m)) if m.contains("connections"))
        );
        let mut o = opts(vec![Target::Ceiling]);
        o.rate = Some(0);
        assert!(matches!(run(&o, exe), Err(BenchError::BadOptions(m)) if m.contains("rate")));
        let mut o = opts(vec![Target::Ceiling]);
        o.duration = Duration::ZERO;
        assert!(matches!(run(&o, exe), Err(BenchError::BadOptions(_))));
        assert!(matches!(
            run(&opts(vec![]), exe),
            Err(BenchError::NoTargets)
        ));
        let o = opts(vec![Target::Url("https://example.com".into())]);
        assert!(matches!(run(&o, exe), Err(BenchError::BadUrl { .. })));
    }

    #[test]
    fn a_missing_config_is_an_error_only_for_targets_that_need_it() {
        let mut o = opts(vec![Target::Ceiling, Target::Userspace, Target::Knative]);
        o.config = PathBuf::from("/nonexistent/hello.yaml");
        let err = config_for(&o).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file /nonexistent/hello.yaml not found (needed to start userspace, knative; pass --config FILE)"
        );
        o.targets = vec![Target::Ceiling];
        assert_eq!(config_for(&o).unwrap(), None);
        assert_eq!(request_path(&o, None).unwrap(), "/");
        o.path = Some("hop8".into());
        assert_eq!(request_path(&o, None).unwrap(), "/hop8");
    }

    #[test]
    fn the_default_path_is_the_first_chain_route() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench.yaml");
        let o = BenchOptions {
            config: config.clone(),
            ..BenchOptions::default()
        };
        let resolved = config_for(&o).unwrap().unwrap();
        assert!(resolved.is_absolute());
        assert_eq!(request_path(&o, Some(&resolved)).unwrap(), "/hello");

        let dir = std::env::temp_dir().join(format!("spindle-bench-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let no_route = dir.join("empty.yaml");
        std::fs::write(&no_route, "functions: []\nchains: []\n").unwrap();
        let o = BenchOptions {
            config: no_route.clone(),
            ..BenchOptions::default()
        };
        let err = request_path(&o, Some(&no_route)).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.to_string().contains("no chain with a `route:`"),
            "{err}"
        );
    }

    #[test]
    fn leads_a_skip_reason_with_the_error_line() {
        let log = "INFO starting\nerror: unrecognized subcommand 'bench-ceiling'\nUsage: spindle <COMMAND>\n";
        assert_eq!(
            key_line(log),
            "error: unrecognized subcommand 'bench-ceiling'"
        );
        assert_eq!(key_line("a\nlast words\n\n"), "last words");
        assert_eq!(key_line(""), "no output");
    }

    #[test]
    fn builds_the_documented_command_lines() {
        let config = Path::new("/c/hello.yaml");
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let line = |target: &Target| {
            target_args(target, Some(config), addr)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line(&Target::Ceiling),
            "bench-ceiling --listen 127.0.0.1:4000"
        );
        assert_eq!(
            line(&Target::Userspace),
            "run /c/hello.yaml --listen 127.0.0.1:4000 --dataplane userspace"
        );
        assert_eq!(
            line(&Target::Sockmap),
            "run /c/hello.yaml --listen 127.0.0.1:4000 --dataplane sockmap"
        );
        assert_eq!(
            line(&Target::Knative),
            "knative-baseline run --config /c/hello.yaml --listen 127.0.0.1:4000"
        );
    }
}
