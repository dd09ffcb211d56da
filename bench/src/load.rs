//! The load generator: `connections` tasks, each owning one HTTP/1.1 connection, in a closed
//! or an open loop, recording latency into per-connection HDR histograms.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::Method;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Conn, Endpoint};
use crate::report::{ErrorKinds, thousands};

/// Highest latency the histogram holds exactly (1 hour, in µs); longer saturates.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// After a refused connect in closed loop: without a pause a dead target turns every
/// connection task into a busy loop that starves the rest of the machine.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);
/// How late an open-loop request may go out without that counting as latency: one tick of
/// tokio's millisecond timer, which rounds every deadline up to the next millisecond.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(1);

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid")
}

/// What to send, how hard.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    pub endpoint: Endpoint,
    pub payload: Bytes,
    pub connections: usize,
    /// Requests per second over all connections (open loop), or None (closed loop).
    pub rate: Option<u64>,
    /// Open loop only: the rate changes once, from `rate` to the step's (see [`RateStep`]).
    pub step: Option<RateStep>,
    pub timeout: Duration,
    /// Keep one [`Sample`] per request, warm-up included, in [`LoadResult::samples`].
    pub record: bool,
    /// Compare (a deterministic sample of) the response bodies with the expected one.
    pub verify: Option<Verify>,
}

/// Body verification under load: a server that answers 200 with the wrong bytes (a torn
/// shared-memory slot, a descriptor naming another request's payload) must not count as a
/// success just because it was fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verify {
    pub expected: Bytes,
    /// Compare a connection's responses number 0, every, 2·every, … (0-based, counted per
    /// connection, so the first response of every new connection is always compared);
    /// 1 compares every response.
    pub every: u64,
}

impl Verify {
    /// Whether a connection's `n`-th response (0-based) is compared.
    pub fn samples(&self, n: u64) -> bool {
        self.every > 0 && n.is_multiple_of(self.every)
    }
}

/// The first body that did not match, cut for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrongBody {
    pub len: usize,
    pub head: Bytes,
}

/// How much of a wrong body the report shows.
pub(crate) const WRONG_BODY_SHOWN: usize = 200;

/// An open-loop rate that changes once: `at` after the start of the load, requests become due
/// at `rate` per second instead of the spec's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateStep {
    pub at: Duration,
    pub rate: u64,
}

/// One request, as [`LoadSpec::record`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// When it was scheduled (open loop: due; closed loop: sent), from the start of the load.
    pub at: Duration,
    /// Its latency in µs (as the histogram has it), or why it failed.
    pub outcome: Result<u64, Failure>,
}

/// Load runs from `start`; what is sent (closed loop) or due (open loop) from
/// `measure_start` until `end` is measured. Nothing new starts (closed loop) or is due (open
/// loop) at or after `end`, but what did is finished, for up to the request timeout after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub start: Instant,
    pub measure_start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Window {
        let start = Instant::now();
        let measure_start = later(start, warmup);
        Window {
            start,
            measure_start,
            end: later(measure_start, duration),
        }
    }
}

/// `t + d`, or a time decades away if that is not representable (instead of panicking).
/// `parse_duration` keeps command-line durations far below that; [`crate::BenchOptions`] can
/// still be built with any `Duration`.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    const DECADES: Duration = Duration::from_secs(30 * 365 * 86_400);
    t.checked_add(d)
        .or_else(|| t.checked_add(DECADES))
        .unwrap_or(t)
}

/// What the measured window produced.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Latency of successful requests, µs (open loop: from the intended send time).
    pub histogram: Histogram<u64>,
    pub ok: u64,
    pub errors: ErrorKinds,
    /// Open loop: for each measured request sent, how late the load generator sent it beyond
    /// the one [`TIMER_TICK`] left out of its latency, µs (so: included in its latency).
    /// Empty in closed loop.
    pub lateness: Histogram<u64>,
    /// Every request of the load, warm-up included, when [`LoadSpec::record`] is set (in no
    /// particular order); empty otherwise.
    pub samples: Vec<Sample>,
    /// Measured responses whose body was compared with [`Verify::expected`] (matching or
    /// not: the mismatches are `errors.wrong_body`).
    pub verified: u64,
    /// The first measured response that did not match.
    pub first_wrong: Option<WrongBody>,
}

/// When connection `conn`'s `k`-th request is due, counted from the start of the load.
///
/// Request n of the whole run is due at n / rate, and goes to connection n mod connections,
/// so each connection's requests are `connections / rate` apart and the union over all
/// connections is evenly spaced: no burst at each second boundary.
pub(crate) fn intended_offset(rate: u64, connections: usize, conn: usize, k: u64) -> Duration {
    let n = u128::from(k) * connections as u128 + conn as u128;
    let nanos = n * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// [`intended_offset`] with an optional [`RateStep`]: request n of the whole run is due at
/// n / rate while that is before the step, and the ones after it follow at the step's rate,
/// the first exactly at the step. Still round-robin over the connections, so each rate is
/// evenly spaced over all of them.
pub(crate) fn scheduled_offset(
    rate: u64,
    step: Option<RateStep>,
    connections: usize,
    conn: usize,
    k: u64,
) -> Duration {
    let Some(step) = step else {
        return intended_offset(rate, connections, conn, k);
    };
    let n = u128::from(k) * connections as u128 + conn as u128;
    // Requests due strictly before the step at the first rate: ceil(at * rate).
    let before = (step.at.as_nanos() * u128::from(rate.max(1))).div_ceil(1_000_000_000);
    let nanos = if n < before {
        n * 1_000_000_000 / u128::from(rate.max(1))
    } else {
        step.at.as_nanos() + (n - before) * 1_000_000_000 / u128::from(step.rate.max(1))
    };
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// When an open-loop request is taken to start, and how much of the load generator's own
/// lateness in sending it is nevertheless charged to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenLoopSend {
    /// Latency runs from here: the due time plus at most one [`TIMER_TICK`].
    pub basis: Instant,
    /// The load generator's lateness beyond that tick (included in the latency).
    pub charged_lateness: Duration,
}

/// Where an open-loop request's latency starts, given when it was `due`, when its task `woke`
/// to send it, and when the connection's previous response completed.
///
/// Latency counts from the due time. Time queued behind the previous response is the
/// server's doing and is charged in full (no coordinated omission). Of the load generator's
/// own lateness (from when the request could have gone out, `due` or the previous response,
/// to `woke`), one timer tick is left out: tokio rounds deadlines up to the next millisecond,
/// so every request would otherwise carry up to 1 ms that is nobody's latency. Lateness beyond
/// that tick (e.g. the load generator starved of CPU by the target) is charged, and returned
/// so it can be reported on its own. On an idle connection this is
/// `basis = max(due, min(woke, due + 1 ms))`.
pub(crate) fn open_loop_basis(
    due: Instant,
    woke: Instant,
    previous_done: Option<Instant>,
) -> OpenLoopSend {
    let ready = previous_done.map_or(due, |p| p.max(due));
    let late = woke.saturating_duration_since(ready);
    let excused = late.min(TIMER_TICK);
    OpenLoopSend {
        basis: due.checked_add(excused).unwrap_or(due),
        charged_lateness: late - excused,
    }
}

#[derive(Default)]
struct Counters {
    warmup_ok: AtomicU64,
    warmup_err: AtomicU64,
    ok: AtomicU64,
    err: AtomicU64,
}

struct Ctx {
    spec: LoadSpec,
    window: Window,
    counters: Counters,
}

struct WorkerOut {
    histogram: Histogram<u64>,
    ok: u64,
    errors: ErrorKinds,
    lateness: Histogram<u64>,
    samples: Vec<Sample>,
    verified: u64,
    first_wrong: Option<WrongBody>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Status,
    Connect,
    Timeout,
    Io,
    /// 2xx, but not the expected body.
    WrongBody,
}

/// Runs the load through `window` and returns the measured part. With `progress`, prints a
/// line per second to stderr labelled with it. Dropping the future stops every connection.
pub(crate) async fn generate(
    spec: LoadSpec,
    window: Window,
    progress: Option<String>,
) -> LoadResult {
    let ctx = Arc::new(Ctx {
        spec,
        window,
        counters: Counters::default(),
    });
    // JoinSet aborts the workers (closing their sockets) if this future is dropped, e.g. when
    // the run is interrupted.
    let mut workers = JoinSet::new();
    for index in 0..ctx.spec.connections {
        workers.spawn(worker(ctx.clone(), index));
    }
    let collect = async {
        let mut result = LoadResult {
            histogram: new_histogram(),
            ok: 0,
            errors: ErrorKinds::default(),
            lateness: new_histogram(),
            samples: Vec::new(),
            verified: 0,
            first_wrong: None,
        };
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(out) => {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = result.histogram.add(&out.histogram);
                    let _ = result.lateness.add(&out.lateness);
                    result.ok += out.ok;
                    result.errors.add(&out.errors);
                    result.samples.extend(out.samples);
                    result.verified += out.verified;
                    if result.first_wrong.is_none() {
                        result.first_wrong = out.first_wrong;
                    }
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        result
    };
    let report = async {
        if let Some(label) = progress {
            print_progress(&label, &ctx).await;
        }
    };
    let (result, ()) = tokio::join!(collect, report);
    result
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn worker(ctx: Arc<Ctx>, index: usize) -> WorkerOut {
    let mut out = WorkerOut {
        histogram: new_histogram(),
        ok: 0,
        errors: ErrorKinds::default(),
        lateness: new_histogram(),
        samples: Vec::new(),
        verified: 0,
        first_wrong: None,
    };
    let window = ctx.window;
    // Requests of the window still unanswered this long after it closed are timeouts: each
    // has waited longer than the request timeout since it was due (open loop) or sent
    // (closed loop, give or take connecting).
    let drain_deadline = later(window.end, ctx.spec.timeout);
    let mut conn: Option<Conn> = None;
    // When this connection's previous request completed.
    let mut previous_done: Option<Instant> = None;
    for k in 0u64.. {
        // `scheduled` decides which phase the request belongs to; latency runs from `basis`.
        // Once the window has closed no new request starts (closed loop) or is due (open
        // loop), but those that did are finished and counted below.
        let (scheduled, basis, lateness) = match ctx.spec.rate {
            Some(rate) => {
                let offset = scheduled_offset(rate, ctx.spec.step, ctx.spec.connections, index, k);
                let Some(due) = window.start.checked_add(offset) else {
                    break;
                };
                if due >= window.end {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let send = open_loop_basis(due, Instant::now(), previous_done);
                (due, send.basis, Some(send.charged_lateness))
            }
            None => {
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                (now, now, None)
            }
        };
        let measured = scheduled >= window.measure_start;
        let mut wrong = None;
        let outcome = if Instant::now() >= drain_deadline {
            // Open loop: due inside the window, still queued behind slow responses the
            // request timeout after it closed.
            Err(Failure::Timeout)
        } else {
            if measured && let Some(late) = lateness {
                out.lateness.saturating_record(micros(late));
            }
            let exchange = attempt(&mut conn, &ctx.spec, &mut wrong);
            match tokio::time::timeout_at(drain_deadline, exchange).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    // Abandoned mid-request: the connection cannot be reused.
                    conn = None;
                    Err(Failure::Timeout)
                }
            }
        };
        let done = Instant::now();
        previous_done = Some(done);
        let counters = &ctx.counters;
        let us = micros(done.saturating_duration_since(basis)).max(1);
        if ctx.spec.record {
            out.samples.push(Sample {
                at: scheduled.saturating_duration_since(window.start),
                outcome: outcome.map(|_| us),
            });
        }
        if measured && matches!(outcome, Ok(true) | Err(Failure::WrongBody)) {
            out.verified += 1;
        }
        if measured && out.first_wrong.is_none() {
            out.first_wrong = wrong;
        }
        match outcome {
            Ok(_) => {
                if measured {
                    out.histogram.saturating_record(us);
                    out.ok += 1;
                    counters.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.warmup_ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(failure) => {
                if measured {
                    match failure {
                        Failure::Status => out.errors.status += 1,
                        Failure::Connect => out.errors.connect += 1,
                        Failure::Timeout => out.errors.timeout += 1,
                        Failure::Io => out.errors.io += 1,
                        Failure::WrongBody => out.errors.wrong_body += 1,
                    }
                    counters.err.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.warmup_err.fetch_add(1, Ordering::Relaxed);
                }
                if failure == Failure::Connect && ctx.spec.rate.is_none() {
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                        _ = tokio::time::sleep_until(window.end) => break,
                    }
                }
            }
        }
    }
    out
}

/// One request on this task's connection, (re)connecting first if needed. Ok(true) if the
/// body was compared (and matched); a mismatch is [`Failure::WrongBody`], its body in `wrong`.
async fn attempt(
    conn: &mut Option<Conn>,
    spec: &LoadSpec,
    wrong: &mut Option<WrongBody>,
) -> Result<bool, Failure> {
    let mut reused = conn.is_some();
    loop {
        let c = match conn {
            Some(c) => c,
            None => {
                reused = false;
                conn.insert(
                    client::connect(spec.endpoint.addr)
                        .await
                        .map_err(|_| Failure::Connect)?,
                )
            }
        };
        if c.sender.ready().await.is_ok() {
            break;
        }
        *conn = None;
        // A kept-alive connection the server closed while idle (or after a
        // `Connection: close` answer) is not an error of the next request: reconnect once.
        if !reused {
            return Err(Failure::Io);
        }
    }
    let Some(c) = conn.as_mut() else {
        return Err(Failure::Io);
    };
    let request = client::request(
        Method::POST,
        &spec.endpoint,
        &spec.endpoint.path,
        spec.payload.clone(),
    );
    // Counted per connection, so a fresh connection's first answer is always compared.
    let verify = spec.verify.as_ref().filter(|v| v.samples(c.responses));
    c.responses += 1;
    let result = tokio::time::timeout(spec.timeout, async {
        let response = c.sender.send_request(request).await?;
        let status = response.status();
        // The response is complete when its last byte is in, not when the headers are.
        let body = response.into_body().collect().await?;
        Ok::<_, hyper::Error>((status, body))
    })
    .await;
    match result {
        Ok(Ok((status, body))) if status.is_success() => match verify {
            None => Ok(false),
            Some(v) => {
                let body = body.to_bytes();
                if body == v.expected {
                    Ok(true)
                } else {
                    *wrong = Some(WrongBody {
                        len: body.len(),
                        head: body.slice(..body.len().min(WRONG_BODY_SHOWN)),
                    });
                    Err(Failure::WrongBody)
                }
            }
        },
        Ok(Ok(_)) => Err(Failure::Status),
        // HTTP/1.1 cannot abandon a request and reuse the connection: replace it.
        Ok(Err(_)) => {
            *conn = None;
            Err(Failure::Io)
        }
        Err(_) => {
            *conn = None;
            Err(Failure::Timeout)
        }
    }
}

async fn print_progress(label: &str, ctx: &Ctx) {
    let w = ctx.window;
    let c = &ctx.counters;
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(later(w.start, second), second);
    let mut last_total = 0;
    let mut last_at = w.start;
    loop {
        let at = tick.tick().await;
        if at > w.end {
            break;
        }
        let now = Instant::now();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total = load(&c.warmup_ok) + load(&c.ok);
        let rps = (total - last_total) as f64 / now.duration_since(last_at).as_secs_f64();
        (last_total, last_at) = (total, now);
        let (phase, elapsed, length, ok, err) = if at <= w.measure_start {
            let length = w.measure_start - w.start;
            (
                "warm-up",
                at - w.start,
                length,
                load(&c.warmup_ok),
                load(&c.warmup_err),
            )
        } else {
            let length = w.end - w.measure_start;
            (
                "measure",
                at - w.measure_start,
                length,
                load(&c.ok),
                load(&c.err),
            )
        };
        eprintln!(
            "  {label:<28} {phase:<7} {:>5.1}/{:<5.1}s {:>12} requests {:>10} req/s {:>8} errors",
            elapsed.as_secs_f64(),
            length.as_secs_f64(),
            thousands(ok),
            thousands(rps.round() as u64),
            thousands(err),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use hyper_util::rt::TokioIo;

    #[test]
    fn open_loop_schedule_is_evenly_spaced_over_all_connections() {
        let (rate, connections) = (1000, 4);
        let mut due: Vec<Duration> = (0..connections)
            .flat_map(|c| (0..250).map(move |k| intended_offset(rate, connections, c, k)))
            .collect();
        due.sort();
        for (n, d) in due.iter().enumerate() {
            assert_eq!(*d, Duration::from_millis(n as u64), "request {n}");
        }
        // Each connection's own requests are connections/rate apart.
        assert_eq!(intended_offset(1000, 4, 1, 0), Duration::from_millis(1));
        assert_eq!(intended_offset(1000, 4, 1, 1), Duration::from_millis(5));
        assert_eq!(intended_offset(1000, 4, 3, 2), Duration::from_millis(11));
        // Rates that do not divide a second keep nanosecond precision, without drift.
        assert_eq!(intended_offset(3, 1, 0, 3), Duration::from_secs(1));
        assert_eq!(
            intended_offset(3, 1, 0, 1),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            intended_offset(7, 2, 0, 3_500_000),
            Duration::from_secs(1_000_000)
        );
    }

    #[test]
    fn a_rate_step_keeps_each_rate_evenly_spaced_and_starts_at_the_step() {
        let ms = Duration::from_millis;
        let step = Some(RateStep {
            at: Duration::from_secs(1),
            rate: 1000,
        });
        let connections = 4;
        let mut due: Vec<Duration> = (0..connections)
            .flat_map(|c| (0..300).map(move |k| scheduled_offset(100, step, connections, c, k)))
            .collect();
        due.sort();
        // 100 due before the step, 10 ms apart; from the step on, 1 ms apart.
        for (n, d) in due.iter().take(100).enumerate() {
            assert_eq!(*d, ms(10 * n as u64), "request {n}");
        }
        for (n, d) in due.iter().skip(100).enumerate() {
            assert_eq!(*d, ms(1000 + n as u64), "request {}", n + 100);
        }
        // A step between two requests of the first rate: 3/s, stepping at 0.5 s to 10/s.
        let step = Some(RateStep {
            at: ms(500),
            rate: 10,
        });
        assert_eq!(
            scheduled_offset(3, step, 1, 0, 1),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(scheduled_offset(3, step, 1, 0, 2), ms(500));
        assert_eq!(scheduled_offset(3, step, 1, 0, 3), ms(600));
        // At the start: the step's rate throughout. None: the plain schedule.
        let step = Some(RateStep {
            at: Duration::ZERO,
            rate: 1000,
        });
        assert_eq!(scheduled_offset(1, step, 1, 0, 5), ms(5));
        assert_eq!(
            scheduled_offset(7, None, 2, 1, 5),
            intended_offset(7, 2, 1, 5)
        );
    }

    #[test]
    fn open_loop_latency_counts_queueing_and_all_but_one_tick_of_lateness() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let send = |due, woke, previous| {
            let s = open_loop_basis(due, woke, previous);
            (s.basis, s.charged_lateness)
        };
        let zero = Duration::ZERO;
        // On time: counts from the due time.
        assert_eq!(send(ms(10), ms(10), None), (ms(10), zero));
        // Idle connection, timer fired within a tick: that tick is not the server's.
        assert_eq!(send(ms(10), ms(11), Some(ms(3))), (ms(11), zero));
        assert_eq!(
            send(ms(10), ms(10) + Duration::from_micros(400), None),
            (ms(10) + Duration::from_micros(400), zero)
        );
        // Idle connection, the load generator 50 ms late (starved of CPU): all but one tick
        // of it counts, and is reported as charged lateness.
        assert_eq!(
            send(ms(10), ms(60), Some(ms(3))),
            (ms(11), Duration::from_millis(49))
        );
        assert_eq!(
            send(ms(10), ms(60), None),
            (ms(11), Duration::from_millis(49))
        );
        // Previous response came 200 ms after this request was due; it was sent right then:
        // the whole wait counts, and none of it is the load generator's.
        assert_eq!(send(ms(10), ms(210), Some(ms(210))), (ms(10), zero));
        // ... a little scheduling delay after that response is not blamed on the server ...
        assert_eq!(
            send(ms(10), ms(210) + Duration::from_micros(300), Some(ms(210))).0,
            ms(10) + Duration::from_micros(300)
        );
        // ... but beyond one tick it is.
        assert_eq!(
            send(ms(10), ms(215), Some(ms(210))),
            (ms(11), Duration::from_millis(4))
        );
    }

    #[test]
    fn instant_arithmetic_does_not_panic_on_absurd_durations() {
        let w = Window::starting_now(Duration::MAX, Duration::MAX);
        assert!(w.measure_start > w.start && w.end >= w.measure_start);
        let w = Window::starting_now(Duration::from_secs(1), Duration::MAX);
        assert_eq!(w.measure_start, w.start + Duration::from_secs(1));
        assert!(w.end > w.measure_start);
        assert_eq!(
            later(w.start, Duration::from_secs(5)),
            w.start + Duration::from_secs(5)
        );
    }

    /// A server that answers every request after `stall(n)` (n: 0-based request number over
    /// all connections), with `status`.
    async fn stalling_server(
        stall: impl Fn(u64) -> Duration + Send + Sync + 'static,
        status: StatusCode,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let stall = Arc::new(stall);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let stall = stall.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let stall = stall.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            let pause = stall(seen.fetch_add(1, Ordering::SeqCst));
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Stalls request number `at` for `pause`.
    fn stall_one(at: u64, pause: Duration) -> impl Fn(u64) -> Duration + Send + Sync {
        move |n| if n == at { pause } else { Duration::ZERO }
    }

    /// Takes at least 2 ms per request: a closed loop against a server that answers at once
    /// is a busy loop, and would starve the tests running next to it.
    fn paced(
        stall: impl Fn(u64) -> Duration + Send + Sync,
    ) -> impl Fn(u64) -> Duration + Send + Sync {
        move |n| stall(n).max(Duration::from_millis(2))
    }

    /// Stalls every request arriving `from` after `t0` for `pause`; `once`: only the first.
    fn stall_after(
        t0: Instant,
        from: Duration,
        pause: Duration,
        once: bool,
    ) -> impl Fn(u64) -> Duration + Send + Sync {
        let stalled = std::sync::atomic::AtomicBool::new(false);
        move |_| {
            if Instant::now() >= t0 + from && !(once && stalled.swap(true, Ordering::SeqCst)) {
                pause
            } else {
                Duration::ZERO
            }
        }
    }

    fn spec(addr: SocketAddr, connections: usize, rate: Option<u64>) -> LoadSpec {
        LoadSpec {
            endpoint: Endpoint::loopback(addr, "/x"),
            payload: Bytes::from_static(b"hello spindle"),
            connections,
            rate,
            step: None,
            timeout: Duration::from_secs(3),
            record: false,
            verify: None,
        }
    }

    fn at_least_100ms(h: &Histogram<u64>) -> u64 {
        h.count_between(100_000, MAX_LATENCY_US)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_charges_queued_requests_for_a_stall() {
        let addr =
            stalling_server(stall_one(100, Duration::from_millis(200)), StatusCode::OK).await;
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(2));
        let r = generate(spec(addr, 1, Some(200)), window, None).await;
        let total = r.histogram.len();
        let slow = at_least_100ms(&r.histogram);
        // ~400 due; the ~40 due during the 200 ms stall queue behind it, half of them >= 100 ms.
        assert!(total >= 350, "only {total} requests");
        assert!(
            slow as f64 > 0.01 * total as f64,
            "{slow} of {total} requests >= 100 ms: the stall is hidden"
        );
        assert!(r.histogram.value_at_quantile(0.99) >= 100_000);
        assert!(r.histogram.max() >= 190_000);
        assert_eq!(r.errors.total(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorded_step_load_keeps_every_request_with_its_due_time() {
        // 100 req/s for 0.5 s, then 400 req/s for 0.5 s: 50 + 200 requests.
        let addr = stalling_server(|_| Duration::ZERO, StatusCode::OK).await;
        let window = Window::starting_now(Duration::from_millis(200), Duration::from_millis(800));
        let stepped = LoadSpec {
            step: Some(RateStep {
                at: Duration::from_millis(500),
                rate: 400,
            }),
            record: true,
            ..spec(addr, 2, Some(100))
        };
        let r = generate(stepped, window, None).await;
        assert_eq!(r.errors.total(), 0, "{:?}", r.errors);
        // Warm-up included in the samples, not in the histogram.
        assert_eq!(r.samples.len(), 250);
        assert_eq!(r.ok, 230);
        let mut at: Vec<Duration> = r.samples.iter().map(|s| s.at).collect();
        at.sort();
        assert_eq!(at[49], Duration::from_millis(490));
        assert_eq!(at[50], Duration::from_millis(500));
        assert_eq!(at[249], Duration::from_micros(997_500));
        assert!(
            r.samples
                .iter()
                .all(|s| matches!(s.outcome, Ok(us) if us >= 1))
        );

        // Without `record`, nothing is kept.
        let window = Window::starting_now(Duration::ZERO, Duration::from_millis(100));
        let r = generate(spec(addr, 1, Some(100)), window, None).await;
        assert!(r.samples.is_empty() && r.ok > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_shows_a_stall_as_one_slow_request() {
        let addr =
            stalling_server(stall_one(100, Duration::from_millis(200)), StatusCode::OK).await;
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(2));
        let r = generate(spec(addr, 1, None), window, None).await;
        // The stalled request, and none queued behind it: the stall shows as one slow request
        // (a busy 2-core machine may add a stray scheduling pause or two, never dozens as in
        // the open-loop test above).
        let slow = at_least_100ms(&r.histogram);
        assert!(
            (1..=3).contains(&slow),
            "{slow} slow, max {} µs",
            r.histogram.max()
        );
        assert!(
            r.histogram.max() >= 190_000,
            "the stall itself: max {} µs",
            r.histogram.max()
        );
        assert!(r.histogram.value_at_quantile(0.99) < 100_000);
        assert_eq!(r.ok, r.histogram.len());
        assert_eq!(r.errors.total(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_finishes_the_requests_due_before_the_window_closed() {
        // 200 req/s on one connection for 1 s: 200 due. At 0.75 s the server holds one
        // request for 400 ms, so it and the ~50 due after it are answered after the window.
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(1));
        let stall = stall_after(
            window.start,
            Duration::from_millis(750),
            Duration::from_millis(400),
            true,
        );
        let addr = stalling_server(stall, StatusCode::OK).await;
        let r = generate(spec(addr, 1, Some(200)), window, None).await;
        assert_eq!(r.errors.total(), 0, "{:?}", r.errors);
        // Every request due in the window is counted, the slowest ones included.
        assert_eq!(r.ok, 200);
        assert_eq!(r.histogram.len(), 200);
        let slow = at_least_100ms(&r.histogram);
        assert!(
            slow >= 40,
            "only {slow} requests >= 100 ms: the stall is hidden"
        );
        assert!(r.histogram.max() >= 390_000, "max {} µs", r.histogram.max());
        assert!(r.histogram.value_at_quantile(0.99) >= 100_000);
        assert_eq!(r.lateness.len(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_counts_requests_unanswered_after_the_window_as_timeouts() {
        // From 0.75 s on every request takes 500 ms; the timeout is 1 s. After the window
        // closes the queue is worked off until 1 s after it: what is left then (in flight
        // or still queued) has waited longer than the timeout since it was due.
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(1));
        let stall = stall_after(
            window.start,
            Duration::from_millis(750),
            Duration::from_millis(500),
            false,
        );
        let addr = stalling_server(stall, StatusCode::OK).await;
        let spec = LoadSpec {
            timeout: Duration::from_secs(1),
            ..spec(addr, 1, Some(200))
        };
        let r = generate(spec, window, None).await;
        let finished = Instant::now();
        assert_eq!(r.ok + r.errors.total(), 200, "{} ok, {:?}", r.ok, r.errors);
        assert_eq!(r.errors.total(), r.errors.timeout);
        assert!(r.errors.timeout >= 40, "{:?}", r.errors);
        // The stalled requests that were answered in time are there, from their due time.
        assert!(at_least_100ms(&r.histogram) >= 1);
        assert!(r.histogram.max() >= 490_000, "max {} µs", r.histogram.max());
        // Bounded: done about a timeout after the window (working off the whole queue
        // would take ~25 s).
        assert!(
            finished < window.end + Duration::from_millis(2500),
            "{:?} after the window",
            finished - window.end
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_records_the_request_in_flight_when_the_window_closes() {
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(1));
        let stall = stall_after(
            window.start,
            Duration::from_millis(800),
            Duration::from_millis(400),
            true,
        );
        let addr = stalling_server(paced(stall), StatusCode::OK).await;
        let r = generate(spec(addr, 1, None), window, None).await;
        assert_eq!(r.errors.total(), 0, "{:?}", r.errors);
        // (Thresholds well above a scheduling hiccup of a loaded test machine.)
        let stalled = |h: &Histogram<u64>| h.count_between(300_000, MAX_LATENCY_US);
        assert_eq!(stalled(&r.histogram), 1, "max {} µs", r.histogram.max());
        assert!(r.histogram.max() >= 390_000, "max {} µs", r.histogram.max());
        assert_eq!(r.ok, r.histogram.len());
        assert!(r.lateness.is_empty());

        // Longer than the request timeout: a timeout error of the window.
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(1));
        let stall = stall_after(
            window.start,
            Duration::from_millis(800),
            Duration::from_secs(5),
            true,
        );
        let addr = stalling_server(paced(stall), StatusCode::OK).await;
        let spec = LoadSpec {
            timeout: Duration::from_millis(500),
            ..spec(addr, 1, None)
        };
        let r = generate(spec, window, None).await;
        assert_eq!(r.errors.timeout, 1, "{:?}", r.errors);
        assert_eq!(r.errors.total(), 1);
        assert_eq!(stalled(&r.histogram), 0, "max {} µs", r.histogram.max());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_non_2xx_and_refused_connections_as_errors() {
        let addr = stalling_server(|_| Duration::ZERO, StatusCode::NOT_FOUND).await;
        let window = Window::starting_now(Duration::from_millis(100), Duration::from_millis(300));
        let r = generate(spec(addr, 2, None), window, None).await;
        assert_eq!(r.ok, 0);
        assert!(r.errors.status > 0);
        assert_eq!(r.errors.total(), r.errors.status);

        // Nothing listens on a port we just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let window = Window::starting_now(Duration::ZERO, Duration::from_millis(300));
        let r = generate(spec(port, 2, Some(100)), window, None).await;
        assert_eq!(r.ok, 0);
        // Open loop: one error per scheduled request, 30 due in the window.
        assert_eq!(r.errors.connect, 30, "{:?}", r.errors);
    }
}
