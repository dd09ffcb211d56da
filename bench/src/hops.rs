//! `spindle bench --hops 1,3,6`: what one function-to-function hop costs, as the slope of
//! latency over chain length, next to the floor for one hop measured in the same run.
//!
//! Chains of 1, 3 and 6 copies of one trivial function (generated config, `/h1`, `/h3`,
//! `/h6`) are measured at one connection, closed loop, so latency is the path's own cost and
//! not queueing. A chain of n functions has n + 1 transitions (gateway → f1 → … → fn →
//! gateway), so the least-squares slope of p50 over transitions is the cost of one
//! transition with everything per-request (HTTP, the arena copy, routing) in the intercept.
//! The slope is fitted per round (spread) and through the medians. Each round also measures
//! the floor ([`crate::floor`]): two processes ping-ponging 32 bytes over loopback TCP and a
//! Unix socketpair, blocking and spinning. Rounds are interleaved: floor, every target, then
//! the next round.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::Endpoint;
use crate::floor::{self, FloorSample, FloorVariant};
use crate::load::{self, LoadSpec, Verify, Window};
use crate::report::{ErrorKinds, Machine, thousands};
use crate::runner::{Session, check_target_body, snippet};
use crate::stats::{LineFit, Spread, fit_line, median_of, spread_of};
use crate::{BenchError, REQUEST_TIMEOUT, Target};

/// What the hops mode takes. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct HopsOptions {
    /// Functions per chain, e.g. 1, 3, 6.
    pub hops: Vec<usize>,
    /// userspace, sockmap and/or knative: targets started from a chain configuration.
    pub targets: Vec<Target>,
    pub rounds: usize,
    /// Measured window per chain, per target, per round.
    pub duration: Duration,
    pub warmup: Duration,
    /// The function every step of every chain runs.
    pub module: PathBuf,
    pub payload: Vec<u8>,
    /// Body verification as in [`crate::BenchOptions::verify_every`].
    pub verify_every: u64,
    /// Round trips per floor variant per round.
    pub floor_round_trips: usize,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
}

impl Default for HopsOptions {
    fn default() -> Self {
        HopsOptions {
            hops: vec![1, 3, 6],
            targets: vec![Target::Userspace, Target::Sockmap],
            rounds: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            module: PathBuf::from("examples/wasm/uppercase.wasm"),
            payload: b"hello spindle".to_vec(),
            verify_every: 16,
            floor_round_trips: 50_000,
            json: None,
            markdown: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopsReport {
    pub machine: Machine,
    pub options: HopsOptionsReport,
    /// The generated chain configuration, verbatim.
    pub config: String,
    pub targets: Vec<HopsTarget>,
    pub floor: FloorReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopsOptionsReport {
    pub hops: Vec<usize>,
    pub targets: Vec<String>,
    pub rounds: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub module: String,
    pub payload_bytes: usize,
    /// Always 1, closed loop.
    pub connections: usize,
    pub verify_every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopsTarget {
    pub name: String,
    pub mode: String,
    pub points: Vec<HopPoint>,
    /// µs per transition: slope of the least-squares line through the points' median p50
    /// over transitions.
    pub per_hop_p50_us: Option<f64>,
    pub per_hop_p99_us: Option<f64>,
    pub fit_p50: Option<LineFit>,
    pub fit_p99: Option<LineFit>,
    /// The p50 slope fitted within each round, and its spread.
    pub per_hop_p50_rounds: Vec<Option<f64>>,
    pub per_hop_p50_spread: Option<Spread>,
    pub per_hop_p99_rounds: Vec<Option<f64>>,
    pub per_hop_p99_spread: Option<Spread>,
    /// Why nothing was measured, or null.
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopPoint {
    pub functions: usize,
    /// functions + 1.
    pub transitions: usize,
    pub path: String,
    /// Medians over rounds.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub rps: Option<f64>,
    pub p50_spread: Option<Spread>,
    pub p99_spread: Option<Spread>,
    /// Totals over rounds.
    pub errors: u64,
    pub verified: u64,
    pub rounds: Vec<HopRound>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopRound {
    pub round: usize,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub rps: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub error_kinds: ErrorKinds,
    pub verified: u64,
    /// The first body that differed from the check's, lossy and cut.
    pub first_wrong_body: Option<String>,
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorReport {
    pub round_trips: usize,
    pub message_bytes: usize,
    pub variants: Vec<FloorVariantReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorVariantReport {
    pub variant: FloorVariant,
    pub label: String,
    /// Medians over rounds of the one-way (RTT/2) p50 and p99, µs.
    pub one_way_p50_us: Option<f64>,
    pub one_way_p99_us: Option<f64>,
    pub p50_spread: Option<Spread>,
    pub rounds: Vec<Option<FloorSample>>,
    /// The first failure, if a round could not measure it.
    pub error: Option<String>,
}

impl HopsReport {
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(self).unwrap_or_default();
        json.push('\n');
        json
    }

    pub fn to_markdown(&self) -> String {
        let o = &self.options;
        let us = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
        let with_spread = |v: Option<f64>, s: Option<&Spread>| match (v, s.filter(|s| s.n > 1)) {
            (Some(v), Some(s)) => format!("{v:.1} [{:.1}–{:.1}]", s.min, s.max),
            (v, _) => us(v),
        };
        let mut md = String::from("## spindle bench --hops\n\n");
        md.push_str(&format!("Machine: {}\n\n", self.machine.line()));
        md.push_str(&format!(
            "Chains of {} copies of `{}` (n functions = n + 1 transitions: gateway → f1 → … → fn → \
             gateway), POST {} bytes, one connection, closed loop, {} s measured after {} s \
             warm-up per chain, {} interleaved round{}{}.\n\n",
            o.hops
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            o.module,
            o.payload_bytes,
            o.duration_s,
            o.warmup_s,
            o.rounds,
            if o.rounds == 1 { "" } else { "s" },
            if o.rounds > 1 {
                " (cells: median [min–max] over rounds)"
            } else {
                ""
            }
        ));
        md.push_str("| dataplane | µs per hop (p50 slope) | µs per hop (p99 slope) | r² (p50) |");
        for n in &o.hops {
            md.push_str(&format!(" {n} fn p50 µs |"));
        }
        md.push_str("\n|---|---:|---:|---:|");
        md.push_str(&"---:|".repeat(o.hops.len()));
        md.push('\n');
        for t in &self.targets {
            if let Some(reason) = &t.skipped {
                md.push_str(&format!(
                    "| {} | skipped: {} |\n",
                    t.name,
                    reason.lines().next().unwrap_or("").replace('|', "\\|")
                ));
                continue;
            }
            md.push_str(&format!(
                "| {} | {} | {} | {} |",
                t.name,
                with_spread(t.per_hop_p50_us, t.per_hop_p50_spread.as_ref()),
                with_spread(t.per_hop_p99_us, t.per_hop_p99_spread.as_ref()),
                t.fit_p50
                    .as_ref()
                    .and_then(|f| f.r2)
                    .map_or("–".into(), |r| format!("{r:.3}")),
            ));
            for p in &t.points {
                md.push_str(&format!(
                    " {} |",
                    with_spread(p.p50_us, p.p50_spread.as_ref())
                ));
            }
            md.push('\n');
        }
        let problems: Vec<String> = self
            .targets
            .iter()
            .flat_map(|t| {
                t.points.iter().flat_map(move |p| {
                    p.rounds.iter().filter_map(move |r| {
                        let why = r.skipped.clone().or_else(|| {
                            (r.errors > 0).then(|| {
                                format!(
                                    "{} errors ({:?}){}",
                                    r.errors,
                                    r.error_kinds,
                                    r.first_wrong_body
                                        .as_ref()
                                        .map_or(String::new(), |b| format!(
                                            ", first wrong body `{b}`"
                                        ))
                                )
                            })
                        })?;
                        Some(format!(
                            "- {} {} round {}: {}\n",
                            t.name,
                            p.path,
                            r.round + 1,
                            why.lines().next().unwrap_or("")
                        ))
                    })
                })
            })
            .collect();
        if !problems.is_empty() {
            md.push_str("\nNot clean:\n");
            md.extend(problems);
        }
        let verified: u64 = self
            .targets
            .iter()
            .flat_map(|t| &t.points)
            .map(|p| p.verified)
            .sum();
        md.push_str(&format!(
            "\nBodies compared with each chain's check response: {}.\n",
            thousands(verified)
        ));
        md.push_str(&format!(
            "\nFloor, same run: two processes ping-ponging {} bytes, {} round trips per round, \
             one-way = round trip / 2:\n\n| path | one-way p50 µs | one-way p99 µs |\n|---|---:|---:|\n",
            self.floor.message_bytes,
            thousands(self.floor.round_trips as u64)
        ));
        for v in &self.floor.variants {
            match &v.error {
                Some(e) if v.one_way_p50_us.is_none() => {
                    md.push_str(&format!("| {} | failed: {e} | |\n", v.label));
                }
                _ => md.push_str(&format!(
                    "| {} | {} | {} |\n",
                    v.label,
                    with_spread(v.one_way_p50_us, v.p50_spread.as_ref()),
                    us(v.one_way_p99_us)
                )),
            }
        }
        let blocking: Vec<&FloorVariantReport> = self
            .floor
            .variants
            .iter()
            .filter(|v| !v.variant.spinning && v.one_way_p50_us.is_some())
            .collect();
        let gaps: Vec<String> = self
            .targets
            .iter()
            .filter_map(|t| {
                let hop = t.per_hop_p50_us?;
                let vs: Vec<String> = blocking
                    .iter()
                    .filter_map(|v| {
                        let f = v.one_way_p50_us?;
                        (f > 0.0).then(|| format!("{:.1}× {} ({f:.1} µs)", hop / f, v.label))
                    })
                    .collect();
                (!vs.is_empty())
                    .then(|| format!("- {}: {hop:.1} µs/hop = {}\n", t.name, vs.join(", ")))
            })
            .collect();
        if !gaps.is_empty() {
            md.push_str("\nPer hop against the blocking floor (p50):\n");
            md.extend(gaps);
        }
        md
    }
}

/// The generated chain configuration: functions h1..h{max} all running `module`, and one
/// chain per entry of `hops`, `hops{n}` on route `/h{n}` through h1..h{n}.
pub(crate) fn hops_config(hops: &[usize], module: &Path) -> String {
    let max = hops.iter().copied().max().unwrap_or(0);
    let quoted = format!(
        "\"{}\"",
        module
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    );
    let mut yaml = String::from(
        "# Generated by `spindle bench --hops`: chains of n copies of one function.\nfunctions:\n",
    );
    for i in 1..=max {
        yaml.push_str(&format!("  - {{ name: h{i}, module: {quoted} }}\n"));
    }
    yaml.push_str("chains:\n");
    for &n in hops {
        let steps: Vec<String> = (1..=n).map(|i| format!("h{i}")).collect();
        yaml.push_str(&format!(
            "  - {{ name: hops{n}, route: /h{n}, steps: [{}] }}\n",
            steps.join(", ")
        ));
    }
    yaml
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_hops_options(opts: &HopsOptions) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::BadOptions(m));
    if opts.hops.is_empty() || opts.hops.contains(&0) {
        return bad("--hops needs chain lengths of at least 1 function".into());
    }
    let mut distinct = opts.hops.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 2 {
        return bad("--hops needs at least two different chain lengths to fit a slope".into());
    }
    if distinct.len() != opts.hops.len() {
        return bad("--hops lists a chain length twice".into());
    }
    if opts.targets.is_empty() {
        return Err(BenchError::NoTargets);
    }
    if let Some(t) = opts
        .targets
        .iter()
        .find(|t| !matches!(t, Target::Userspace | Target::Sockmap | Target::Knative))
    {
        return bad(format!(
            "--hops measures chains: target `{t}` has none (use userspace, sockmap, knative)"
        ));
    }
    if opts.rounds == 0 {
        return bad("--rounds must be at least 1".into());
    }
    if opts.duration.is_zero() {
        return bad("--duration must be longer than 0".into());
    }
    if opts.floor_round_trips == 0 {
        return bad("--floor-round-trips must be at least 1".into());
    }
    if !opts.module.is_file() {
        return bad(format!(
            "the hops function {} does not exist (build the examples: make -C examples, or pass --hops-module)",
            opts.module.display()
        ));
    }
    Ok(())
}

/// Runs the hops mode: see the module documentation. Prints the Markdown report and writes
/// the files `opts` names; targets are started from `exe` as in [`crate::run`].
pub fn run_hops(opts: &HopsOptions, exe: &Path) -> Result<HopsReport, BenchError> {
    check_hops_options(opts)?;
    let module = std::fs::canonicalize(&opts.module)
        .map_err(BenchError::io(format!("reading {}", opts.module.display())))?;
    let dir =
        Scratch(std::env::temp_dir().join(format!("spindle-bench-hops-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)
        .map_err(BenchError::io(format!("creating {}", dir.0.display())))?;
    let yaml = hops_config(&opts.hops, &module);
    let config = dir.0.join("hops.yaml");
    std::fs::write(&config, &yaml)
        .map_err(BenchError::io(format!("writing {}", config.display())))?;
    let session = Session::new(exe, 1)?;
    let machine = Machine::detect();
    let payload = Bytes::from(opts.payload.clone());

    // [target][point] → rounds; [variant] → rounds.
    let mut measured: Vec<Vec<Vec<HopRound>>> =
        vec![vec![Vec::new(); opts.hops.len()]; opts.targets.len()];
    let mut expected: Vec<Vec<Option<Bytes>>> =
        vec![vec![None; opts.hops.len()]; opts.targets.len()];
    let mut floors: Vec<Vec<Option<FloorSample>>> = vec![Vec::new(); FloorVariant::ALL.len()];
    let mut floor_errors: Vec<Option<String>> = vec![None; FloorVariant::ALL.len()];
    for round in 0..opts.rounds {
        for (v, variant) in FloorVariant::ALL.iter().enumerate() {
            if session.interrupt.fired() {
                floors[v].push(None);
                continue;
            }
            eprintln!(
                "spindle bench --hops: round {}/{}: floor, {}",
                round + 1,
                opts.rounds,
                variant.label()
            );
            match floor::ping_pong(*variant, opts.floor_round_trips) {
                Ok(sample) => floors[v].push(Some(sample)),
                Err(e) => {
                    tracing::warn!("floor ({}) not measured: {e}", variant.label());
                    floors[v].push(None);
                    floor_errors[v].get_or_insert(e.to_string());
                }
            }
        }
        for (t, target) in opts.targets.iter().enumerate() {
            let skip_all = |measured: &mut Vec<Vec<Vec<HopRound>>>, why: &str| {
                for point in measured[t].iter_mut() {
                    point.push(HopRound::skipped(round, why));
                }
            };
            if session.interrupt.fired() {
                skip_all(&mut measured, "not run: interrupted");
                continue;
            }
            eprintln!(
                "spindle bench --hops: round {}/{}: {}",
                round + 1,
                opts.rounds,
                target.display_name()
            );
            let first_path = format!("/h{}", opts.hops[0]);
            let (endpoint, _process) = match session.start(target, Some(&config), &first_path) {
                Ok(started) => started,
                Err((_, reason)) => {
                    eprintln!("  skipped: {}", reason.lines().next().unwrap_or(""));
                    skip_all(&mut measured, &reason);
                    continue;
                }
            };
            for (p, &n) in opts.hops.iter().enumerate() {
                let result = if session.interrupt.fired() {
                    HopRound::skipped(round, "not run: interrupted")
                } else {
                    let endpoint = Endpoint {
                        path: format!("/h{n}"),
                        ..endpoint.clone()
                    };
                    measure_point(
                        &session,
                        opts,
                        &endpoint,
                        &payload,
                        round,
                        &mut expected[t][p],
                    )
                };
                measured[t][p].push(result);
            }
            // `_process` is dropped here: the target is stopped before the next one starts.
        }
    }
    let interrupted = session.interrupt.fired();
    drop(session);

    let targets = opts
        .targets
        .iter()
        .zip(measured)
        .map(|(target, points)| summarize_target(target, &opts.hops, points, opts.rounds))
        .collect();
    let floor = FloorReport {
        round_trips: opts.floor_round_trips,
        message_bytes: floor::MESSAGE_BYTES,
        variants: FloorVariant::ALL
            .iter()
            .zip(floors)
            .zip(floor_errors)
            .map(|((variant, rounds), error)| {
                let p50: Vec<Option<f64>> = rounds
                    .iter()
                    .map(|r| r.as_ref().map(|s| s.one_way_p50_us))
                    .collect();
                let p99: Vec<Option<f64>> = rounds
                    .iter()
                    .map(|r| r.as_ref().map(|s| s.one_way_p99_us))
                    .collect();
                FloorVariantReport {
                    variant: *variant,
                    label: variant.label(),
                    one_way_p50_us: median_of(&p50),
                    one_way_p99_us: median_of(&p99),
                    p50_spread: spread_of(&p50),
                    rounds,
                    error,
                }
            })
            .collect(),
    };
    let report = HopsReport {
        machine,
        options: HopsOptionsReport {
            hops: opts.hops.clone(),
            targets: opts.targets.iter().map(|t| t.to_string()).collect(),
            rounds: opts.rounds,
            duration_s: opts.duration.as_secs_f64(),
            warmup_s: opts.warmup.as_secs_f64(),
            module: opts.module.display().to_string(),
            payload_bytes: opts.payload.len(),
            connections: 1,
            verify_every: opts.verify_every,
        },
        config: yaml,
        targets,
        floor,
    };
    emit(&report, opts)?;
    if interrupted {
        return Err(BenchError::HopsInterrupted {
            report: Box::new(report),
        });
    }
    if report.targets.iter().all(|t| t.skipped.is_some()) {
        return Err(BenchError::HopsNothingMeasured {
            report: Box::new(report),
        });
    }
    Ok(report)
}

impl HopRound {
    fn skipped(round: usize, why: &str) -> HopRound {
        HopRound {
            round,
            p50_us: None,
            p99_us: None,
            rps: None,
            requests: 0,
            errors: 0,
            error_kinds: ErrorKinds::default(),
            verified: 0,
            first_wrong_body: None,
            skipped: Some(why.to_string()),
        }
    }
}

fn measure_point(
    session: &Session<'_>,
    opts: &HopsOptions,
    endpoint: &Endpoint,
    payload: &Bytes,
    round: usize,
    expected: &mut Option<Bytes>,
) -> HopRound {
    let (_, body) = match session
        .runtime
        .block_on(check_target_body(endpoint, payload.clone()))
    {
        Ok(answer) => answer,
        Err(reason) => return HopRound::skipped(round, &reason),
    };
    let expected = match expected {
        Some(e) if *e != body => {
            return HopRound::skipped(
                round,
                &format!(
                    "the check answered a different body than in the first round: {}",
                    snippet(&body)
                ),
            );
        }
        Some(e) => e.clone(),
        None => expected.insert(body).clone(),
    };
    let spec = LoadSpec {
        endpoint: endpoint.clone(),
        payload: payload.clone(),
        connections: 1,
        rate: None,
        step: None,
        timeout: REQUEST_TIMEOUT,
        record: false,
        verify: (opts.verify_every > 0).then(|| Verify {
            expected,
            every: opts.verify_every,
        }),
    };
    let interrupt = &session.interrupt;
    let label = format!("{}{}", endpoint.authority, endpoint.path);
    let result = session.runtime.block_on(async {
        let window = Window::starting_now(opts.warmup, opts.duration);
        tokio::select! {
            r = load::generate(spec, window, Some(label)) => Some(r),
            () = interrupt.wait() => None,
        }
    });
    let Some(r) = result else {
        return HopRound::skipped(round, "interrupted during the measurement");
    };
    let latency = |q: f64| (r.ok > 0).then(|| r.histogram.value_at_quantile(q));
    HopRound {
        round,
        p50_us: latency(0.5),
        p99_us: latency(0.99),
        rps: Some((r.ok as f64 / opts.duration.as_secs_f64() * 10.0).round() / 10.0),
        requests: r.ok,
        errors: r.errors.total(),
        error_kinds: r.errors,
        verified: r.verified,
        first_wrong_body: r.first_wrong.map(|w| snippet(&w.head)),
        skipped: None,
    }
}

/// Medians per point, and the slope through them and within each round.
fn summarize_target(
    target: &Target,
    hops: &[usize],
    points: Vec<Vec<HopRound>>,
    rounds: usize,
) -> HopsTarget {
    let points: Vec<HopPoint> = hops
        .iter()
        .zip(points)
        .map(|(&n, rounds)| {
            let p50: Vec<Option<f64>> = rounds.iter().map(|r| r.p50_us.map(|v| v as f64)).collect();
            let p99: Vec<Option<f64>> = rounds.iter().map(|r| r.p99_us.map(|v| v as f64)).collect();
            let rps: Vec<Option<f64>> = rounds
                .iter()
                .map(|r| r.rps.filter(|_| r.skipped.is_none()))
                .collect();
            HopPoint {
                functions: n,
                transitions: n + 1,
                path: format!("/h{n}"),
                p50_us: median_of(&p50),
                p99_us: median_of(&p99),
                rps: median_of(&rps),
                p50_spread: spread_of(&p50),
                p99_spread: spread_of(&p99),
                errors: rounds.iter().map(|r| r.errors).sum(),
                verified: rounds.iter().map(|r| r.verified).sum(),
                rounds,
            }
        })
        .collect();
    let fit = |pick: &dyn Fn(&HopPoint) -> Option<f64>| {
        fit_line(
            &points
                .iter()
                .filter_map(|p| Some((p.transitions as f64, pick(p)?)))
                .collect::<Vec<_>>(),
        )
    };
    let fit_p50 = fit(&|p| p.p50_us);
    let fit_p99 = fit(&|p| p.p99_us);
    let per_round = |pick: &dyn Fn(&HopRound) -> Option<u64>| -> Vec<Option<f64>> {
        (0..rounds)
            .map(|r| {
                let xy: Vec<(f64, f64)> = points
                    .iter()
                    .filter_map(|p| {
                        let round = p.rounds.get(r)?;
                        Some((p.transitions as f64, pick(round)? as f64))
                    })
                    .collect();
                fit_line(&xy).map(|f| f.slope)
            })
            .collect()
    };
    let per_hop_p50_rounds = per_round(&|r| r.p50_us);
    let per_hop_p99_rounds = per_round(&|r| r.p99_us);
    let skipped = points.iter().all(|p| p.p50_us.is_none()).then(|| {
        points
            .iter()
            .flat_map(|p| &p.rounds)
            .find_map(|r| r.skipped.clone())
            .unwrap_or_else(|| "no chain answered successfully".into())
    });
    HopsTarget {
        name: target.display_name(),
        mode: target.mode().to_string(),
        per_hop_p50_us: fit_p50.as_ref().map(|f| f.slope),
        per_hop_p99_us: fit_p99.as_ref().map(|f| f.slope),
        fit_p50,
        fit_p99,
        per_hop_p50_spread: spread_of(&per_hop_p50_rounds),
        per_hop_p50_rounds,
        per_hop_p99_spread: spread_of(&per_hop_p99_rounds),
        per_hop_p99_rounds,
        points,
        skipped,
    }
}

fn emit(report: &HopsReport, opts: &HopsOptions) -> Result<(), BenchError> {
    use std::io::Write;
    let markdown = report.to_markdown();
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(markdown.as_bytes());
    let _ = stdout.flush();
    drop(stdout);
    if let Some(path) = &opts.json {
        std::fs::write(path, report.to_json())
            .map_err(BenchError::io(format!("writing {}", path.display())))?;
    }
    if let Some(path) = &opts.markdown {
        std::fs::write(path, &markdown)
            .map_err(BenchError::io(format!("writing {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_one_chain_per_length_over_shared_functions() {
        let yaml = hops_config(&[1, 3, 6], Path::new("/w/examples/wasm/uppercase.wasm"));
        assert_eq!(
            yaml,
            "# Generated by `spindle bench --hops`: chains of n copies of one function.\n\
             functions:\n\
             \x20 - { name: h1, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             \x20 - { name: h2, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             \x20 - { name: h3, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             \x20 - { name: h4, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             \x20 - { name: h5, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             \x20 - { name: h6, module: \"/w/examples/wasm/uppercase.wasm\" }\n\
             chains:\n\
             \x20 - { name: hops1, route: /h1, steps: [h1] }\n\
             \x20 - { name: hops3, route: /h3, steps: [h1, h2, h3] }\n\
             \x20 - { name: hops6, route: /h6, steps: [h1, h2, h3, h4, h5, h6] }\n"
        );
        assert_eq!(crate::config::first_route(&yaml).as_deref(), Some("/h1"));
    }

    #[test]
    fn rejects_what_cannot_give_a_slope() {
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let ok = HopsOptions {
            module: module.clone(),
            ..HopsOptions::default()
        };
        assert!(check_hops_options(&ok).is_ok());
        let bad = |o: HopsOptions| check_hops_options(&o).unwrap_err().to_string();
        assert!(
            bad(HopsOptions {
                hops: vec![3],
                ..ok.clone()
            })
            .contains("two different")
        );
        assert!(
            bad(HopsOptions {
                hops: vec![0, 3],
                ..ok.clone()
            })
            .contains("at least 1")
        );
        assert!(
            bad(HopsOptions {
                hops: vec![1, 3, 3],
                ..ok.clone()
            })
            .contains("twice")
        );
        assert!(
            bad(HopsOptions {
                targets: vec![Target::Ceiling],
                ..ok.clone()
            })
            .contains("target `ceiling` has none")
        );
        assert!(
            bad(HopsOptions {
                module: "/nonexistent.wasm".into(),
                ..ok.clone()
            })
            .contains("make -C examples")
        );
    }

    fn round(r: usize, p50: u64, p99: u64) -> HopRound {
        HopRound {
            p50_us: Some(p50),
            p99_us: Some(p99),
            rps: Some(1e6 / p50 as f64),
            requests: 100,
            skipped: None,
            ..HopRound::skipped(r, "")
        }
    }

    #[test]
    fn fits_the_slope_per_round_and_through_the_medians() {
        // Round 0: 30 + 10·t; round 1: 30 + 14·t; p99 twice p50.
        let points = vec![
            vec![round(0, 50, 100), round(1, 58, 116)],
            vec![round(0, 70, 140), round(1, 86, 172)],
            vec![round(0, 100, 200), round(1, 128, 256)],
        ];
        let t = summarize_target(&Target::Sockmap, &[1, 3, 6], points, 2);
        assert_eq!(t.skipped, None);
        let slopes: Vec<f64> = t.per_hop_p50_rounds.iter().map(|s| s.unwrap()).collect();
        assert!(
            (slopes[0] - 10.0).abs() < 1e-9 && (slopes[1] - 14.0).abs() < 1e-9,
            "{slopes:?}"
        );
        // Medians 54, 78, 114 at t = 2, 4, 7: slope 12.
        assert!((t.per_hop_p50_us.unwrap() - 12.0).abs() < 1e-9, "{t:?}");
        assert!((t.per_hop_p99_us.unwrap() - 24.0).abs() < 1e-9);
        let s = t.per_hop_p50_spread.unwrap();
        assert_eq!((s.min.round(), s.max.round(), s.n), (10.0, 14.0, 2));
        assert_eq!(t.points[2].transitions, 7);
        assert_eq!(t.points[0].p50_us, Some(54.0));
        // A target that never answered is skipped, with the reason.
        let none = vec![
            vec![HopRound::skipped(
                0,
                "exited (status 1) before it was ready"
            )];
            3
        ];
        let t = summarize_target(&Target::Userspace, &[1, 3, 6], none, 1);
        assert_eq!(
            t.skipped.as_deref(),
            Some("exited (status 1) before it was ready")
        );
        assert_eq!(t.per_hop_p50_us, None);
        assert_eq!(t.per_hop_p50_rounds, vec![None]);
    }
}
