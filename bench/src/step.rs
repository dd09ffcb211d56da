//! A load step: one open-loop load against a running server whose rate jumps once, from
//! `rate` to `step_rate`, reported per phase (before the step, the ramp right after it, and
//! after the ramp) and over time in fixed buckets. For autoscaling: how long, and at what
//! latency, a server takes to absorb a sudden rise in load (`bench/scale.sh burst`).
//!
//! It is [`crate::load`]'s open loop, unchanged but for the schedule: request n is due at
//! n / rate until the step, and from the step on at the step's rate (the first exactly at
//! it), round-robin over the connections. Latency counts from the due time (queueing behind
//! a slow response included), and whatever is still unanswered [`REQUEST_TIMEOUT`] after
//! the last request was due is a timeout, as in `spindle bench`. Each request is kept, with
//! the time it was due, and charged to the phase and bucket it was due in; the warm-up
//! (at `rate`, before the `before` phase) is in the timeline but in no phase.

use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client;
use crate::load::{self, Failure, LoadSpec, RateStep, Sample, Window};
use crate::report::{CheckSample, ErrorKinds};
use crate::{BenchError, REQUEST_TIMEOUT};

/// What [`run_step`] takes. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    /// The server, `http://host:port/path` (POSTed to).
    pub url: String,
    /// Concurrent keep-alive connections: also the most requests the server ever sees in
    /// flight at once.
    pub connections: usize,
    /// Requests per second before the step.
    pub rate: u64,
    /// Requests per second from the step on.
    pub step_rate: u64,
    /// Load at `rate` before the measured `before` phase, in the timeline only.
    pub warmup: Duration,
    /// Measured at `rate`, up to the step.
    pub before: Duration,
    /// The first part after the step, reported on its own.
    pub ramp: Duration,
    /// The rest at `step_rate`, after the ramp.
    pub after: Duration,
    /// Timeline resolution.
    pub bucket: Duration,
    /// Request body.
    pub payload: Vec<u8>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            url: String::new(),
            connections: 64,
            rate: 200,
            step_rate: 2000,
            warmup: Duration::from_secs(2),
            before: Duration::from_secs(3),
            ramp: Duration::from_secs(2),
            after: Duration::from_secs(6),
            bucket: Duration::from_millis(250),
            payload: b"hello spindle".to_vec(),
        }
    }
}

/// What one step run measured. Times are seconds from the step (negative before it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub url: String,
    pub connections: usize,
    pub rate: u64,
    pub step_rate: u64,
    /// When the load started (the first request was due), µs since the Unix epoch: lines up
    /// the timeline with what else was watched meanwhile (e.g. a server's instance count).
    pub started_unix_us: u64,
    /// When the step came, seconds after the load started (warm-up + before).
    pub step_at_s: f64,
    /// The answer to the one request sent before the load.
    pub check: CheckSample,
    /// `before`, `ramp`, `after`.
    pub phases: Vec<Interval>,
    /// The whole load, warm-up included, in buckets of `bucket`.
    pub timeline: Vec<Interval>,
    /// p99 of how late the load generator sent requests, beyond the one timer tick left out
    /// of latency (included in the latency); µs. Large values mean the figures are partly
    /// the load generator's.
    pub sched_lateness_p99_us: u64,
}

/// The requests that were due within `[from_s, to_s)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// `before`, `ramp`, `after`; empty for a timeline bucket.
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
    /// The rate requests were due at.
    pub intended_rps: f64,
    /// Requests due.
    pub due: u64,
    /// Answered 2xx.
    pub ok: u64,
    pub errors: ErrorKinds,
    /// Latency of the successes, from when each was due, µs; null without successes.
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
}

impl StepReport {
    /// The phases as a Markdown table.
    pub fn to_markdown(&self) -> String {
        let ms = |us: Option<u64>| us.map_or("-".to_string(), |u| format!("{:.1}", u as f64 / 1e3));
        let mut out = format!(
            "{} req/s, stepping to {} req/s over {} connections ({})\n\n\
             | phase | from..to (s) | due | ok | errors (status/connect/timeout/io) | p50 ms | p99 ms | max ms |\n\
             |---|---|---:|---:|---|---:|---:|---:|\n",
            self.rate, self.step_rate, self.connections, self.url
        );
        for p in &self.phases {
            let e = &p.errors;
            out.push_str(&format!(
                "| {} | {:+.1}..{:+.1} | {} | {} | {} ({}/{}/{}/{}) | {} | {} | {} |\n",
                p.name,
                p.from_s,
                p.to_s,
                p.due,
                p.ok,
                e.total(),
                e.status,
                e.connect,
                e.timeout,
                e.io,
                ms(p.p50_us),
                ms(p.p99_us),
                ms(p.max_us)
            ));
        }
        out
    }
}

fn check_options(o: &StepOptions) -> Result<(), BenchError> {
    let bad = |m: &str| Err(BenchError::BadOptions(m.into()));
    if o.connections == 0 {
        return bad("--connections must be at least 1");
    }
    if o.rate == 0 || o.step_rate == 0 {
        return bad("--rate and --step-rate must be at least 1 request/s");
    }
    if o.before.is_zero() || o.ramp.is_zero() || o.after.is_zero() {
        return bad("--before, --ramp and --after must be longer than 0");
    }
    if o.bucket < Duration::from_millis(10) {
        return bad("--bucket must be at least 10ms");
    }
    let total = o.warmup + o.before + o.ramp + o.after;
    if total > crate::MAX_DURATION {
        return bad("the whole load must last at most 24 h");
    }
    client::parse_url(&o.url)?;
    Ok(())
}

/// Runs one step load against `opts.url` and returns what it measured. Prints a progress line
/// per second to stderr.
pub fn run_step(opts: &StepOptions) -> Result<StepReport, BenchError> {
    check_options(opts)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opts.connections)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("spindle-step")
        .enable_all()
        .build()
        .map_err(BenchError::io("starting the load generator's runtime"))?;
    runtime.block_on(async {
        let endpoint = client::resolve(&opts.url)
            .await
            .map_err(BenchError::BadOptions)?;
        let payload = Bytes::from(opts.payload.clone());
        let check = crate::runner::check_target(&endpoint, payload.clone())
            .await
            .map_err(BenchError::BadOptions)?;
        let step_at = opts.warmup + opts.before;
        let spec = LoadSpec {
            endpoint,
            payload,
            connections: opts.connections,
            rate: Some(opts.rate),
            step: Some(RateStep {
                at: step_at,
                rate: opts.step_rate,
            }),
            timeout: REQUEST_TIMEOUT,
            record: true,
            verify: None,
        };
        // Everything is "measured" for the load generator; the phases are cut from the
        // samples afterwards.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let window = Window::starting_now(Duration::ZERO, step_at + opts.ramp + opts.after);
        let result = load::generate(spec, window, Some(opts.url.clone())).await;
        let mut report = summarize(opts, check, &result.samples, &result.lateness);
        report.started_unix_us = started;
        Ok(report)
    })
}

fn summarize(
    opts: &StepOptions,
    check: CheckSample,
    samples: &[Sample],
    lateness: &Histogram<u64>,
) -> StepReport {
    let step_at = opts.warmup + opts.before;
    let secs = |d: Duration| d.as_secs_f64() - step_at.as_secs_f64();
    let rate_at = |from: Duration| {
        if from < step_at {
            opts.rate
        } else {
            opts.step_rate
        }
    };
    let interval = |name: &str, from: Duration, to: Duration| {
        stats(name, secs(from), secs(to), rate_at(from), samples, from, to)
    };
    let ramp_end = step_at + opts.ramp;
    let end = ramp_end + opts.after;
    let phases = vec![
        interval("before", opts.warmup, step_at),
        interval("ramp", step_at, ramp_end),
        interval("after", ramp_end, end),
    ];
    let mut timeline = Vec::new();
    let mut from = Duration::ZERO;
    while from < end {
        // Buckets do not straddle the step: the last one before it may be shorter.
        let mut to = (from + opts.bucket).min(end);
        if from < step_at && to > step_at {
            to = step_at;
        }
        timeline.push(interval("", from, to));
        from = to;
    }
    StepReport {
        url: opts.url.clone(),
        connections: opts.connections,
        rate: opts.rate,
        step_rate: opts.step_rate,
        started_unix_us: 0,
        step_at_s: step_at.as_secs_f64(),
        check,
        phases,
        timeline,
        sched_lateness_p99_us: if lateness.is_empty() {
            0
        } else {
            lateness.value_at_quantile(0.99)
        },
    }
}

fn stats(
    name: &str,
    from_s: f64,
    to_s: f64,
    rate: u64,
    samples: &[Sample],
    from: Duration,
    to: Duration,
) -> Interval {
    let mut h = load::new_histogram();
    let mut errors = ErrorKinds::default();
    let mut due = 0;
    for s in samples.iter().filter(|s| s.at >= from && s.at < to) {
        due += 1;
        match s.outcome {
            Ok(us) => h.saturating_record(us),
            Err(Failure::Status) => errors.status += 1,
            Err(Failure::Connect) => errors.connect += 1,
            Err(Failure::Timeout) => errors.timeout += 1,
            Err(Failure::Io) => errors.io += 1,
            Err(Failure::WrongBody) => errors.wrong_body += 1,
        }
    }
    let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
    Interval {
        name: name.to_string(),
        from_s,
        to_s,
        intended_rps: rate as f64,
        due,
        ok: h.len(),
        errors,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        max_us: (!h.is_empty()).then(|| h.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, outcome: Result<u64, Failure>) -> Sample {
        Sample {
            at: Duration::from_millis(at_ms),
            outcome,
        }
    }

    #[test]
    fn samples_are_charged_to_the_phase_and_bucket_they_were_due_in() {
        let opts = StepOptions {
            url: "http://127.0.0.1:1/x".into(),
            rate: 10,
            step_rate: 100,
            warmup: Duration::from_millis(500),
            before: Duration::from_millis(500),
            ramp: Duration::from_millis(300),
            after: Duration::from_millis(700),
            bucket: Duration::from_millis(400),
            ..StepOptions::default()
        };
        let samples = [
            sample(100, Ok(5_000)), // warm-up: timeline only
            sample(600, Ok(1_000)),
            sample(999, Ok(1_800)),
            sample(1000, Ok(1_500)), // exactly at the step: the ramp's
            sample(1200, Err(Failure::Timeout)),
            sample(1299, Err(Failure::Status)),
            sample(1300, Ok(2_000)),
            sample(1999, Err(Failure::Connect)),
            sample(2000, Ok(1)), // past the end (cannot happen): nowhere
        ];
        let check = CheckSample {
            status: 200,
            body: "ok".into(),
            bytes: Some(2),
        };
        let r = summarize(&opts, check, &samples, &load::new_histogram());
        assert_eq!(r.step_at_s, 1.0);
        let [before, ramp, after] = &r.phases[..] else {
            panic!("{:?}", r.phases)
        };
        assert_eq!((before.from_s, before.to_s), (-0.5, 0.0));
        assert_eq!((before.due, before.ok, before.errors.total()), (2, 2, 0));
        assert_eq!(before.intended_rps, 10.0);
        assert_eq!(before.max_us, Some(1_800));
        assert_eq!((ramp.due, ramp.ok), (3, 1));
        assert_eq!((ramp.errors.timeout, ramp.errors.status), (1, 1));
        assert_eq!((ramp.p50_us, ramp.intended_rps), (Some(1_500), 100.0));
        assert_eq!((after.due, after.ok, after.errors.connect), (2, 1, 1));
        assert!((after.to_s - 1.0).abs() < 1e-9);
        // Buckets of 400 ms, cut at the step: 0-400, 400-800, 800-1000, 1000-1400, ...
        let edges: Vec<(f64, f64)> = r.timeline.iter().map(|b| (b.from_s, b.to_s)).collect();
        let want = [
            (-1.0, -0.6),
            (-0.6, -0.2),
            (-0.2, 0.0),
            (0.0, 0.4),
            (0.4, 0.8),
            (0.8, 1.0),
        ];
        assert_eq!(edges.len(), want.len(), "{edges:?}");
        for ((a, b), (c, d)) in edges.iter().zip(want) {
            assert!((a - c).abs() < 1e-9 && (b - d).abs() < 1e-9, "{edges:?}");
        }
        let dues: Vec<u64> = r.timeline.iter().map(|b| b.due).collect();
        assert_eq!(dues, [1, 1, 1, 4, 0, 1]);
        assert_eq!(r.timeline[3].intended_rps, 100.0);
        assert!(r.timeline[4].p50_us.is_none());
        let md = r.to_markdown();
        assert!(
            md.contains("| ramp | +0.0..+0.3 | 3 | 1 | 2 (1/0/1/0) | 1.5 | 1.5 | 1.5 |"),
            "{md}"
        );
    }

    #[test]
    fn rejects_bad_options() {
        let ok = StepOptions {
            url: "http://127.0.0.1:1/x".into(),
            ..StepOptions::default()
        };
        check_options(&ok).unwrap();
        for bad in [
            StepOptions {
                connections: 0,
                ..ok.clone()
            },
            StepOptions {
                step_rate: 0,
                ..ok.clone()
            },
            StepOptions {
                ramp: Duration::ZERO,
                ..ok.clone()
            },
            StepOptions {
                bucket: Duration::from_millis(1),
                ..ok.clone()
            },
            StepOptions {
                url: "https://x/".into(),
                ..ok.clone()
            },
        ] {
            assert!(check_options(&bad).is_err(), "{bad:?}");
        }
    }
}
