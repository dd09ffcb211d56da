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
    pub timeout: Duration,
}

/// Load runs from `start`; what is sent (closed loop) or due (open loop) from
/// `measure_start` until `end` is measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub start: Instant,
    pub measure_start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Window {
        let start = Instant::now();
        Window {
            start,
            measure_start: start + warmup,
            end: start + warmup + duration,
        }
    }
}

/// What the measured window produced.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Latency of successful requests, µs (open loop: from the intended send time).
    pub histogram: Histogram<u64>,
    pub ok: u64,
    pub errors: ErrorKinds,
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

/// Where an open-loop request's latency starts, given when it was `due`, when its task `woke`
/// to send it, and when the connection's previous response completed.
///
/// Time queued behind the previous response is the server's doing and is charged to the
/// request (no coordinated omission): if that response came after `due`, latency runs from
/// `due`. The timer's own lateness (tokio rounds deadlines up to the next millisecond) is the
/// load generator's, not the server's, and is left out: a request on an idle connection
/// counts from when it was actually sent.
pub(crate) fn open_loop_basis(
    due: Instant,
    woke: Instant,
    previous_done: Option<Instant>,
) -> Instant {
    let queued = previous_done.map_or(Duration::ZERO, |p| p.saturating_duration_since(due));
    woke.checked_sub(queued).unwrap_or(due).max(due)
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Status,
    Connect,
    Timeout,
    Io,
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
        };
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(out) => {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = result.histogram.add(&out.histogram);
                    result.ok += out.ok;
                    result.errors.add(&out.errors);
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

async fn worker(ctx: Arc<Ctx>, index: usize) -> WorkerOut {
    let mut out = WorkerOut {
        histogram: new_histogram(),
        ok: 0,
        errors: ErrorKinds::default(),
    };
    let window = ctx.window;
    let mut conn: Option<Conn> = None;
    // When this connection's previous request completed.
    let mut previous_done: Option<Instant> = None;
    for k in 0u64.. {
        // `scheduled` decides which phase the request belongs to; latency runs from `basis`.
        let (scheduled, basis) = match ctx.spec.rate {
            Some(rate) => {
                let due = window.start + intended_offset(rate, ctx.spec.connections, index, k);
                if due >= window.end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                (due, open_loop_basis(due, Instant::now(), previous_done))
            }
            None => {
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                (now, now)
            }
        };
        let outcome = tokio::select! {
            biased;
            // In flight when the window closes: neither a success nor an error of the window.
            _ = tokio::time::sleep_until(window.end) => break,
            outcome = attempt(&mut conn, &ctx.spec) => outcome,
        };
        let done = Instant::now();
        previous_done = Some(done);
        let measured = scheduled >= window.measure_start;
        let counters = &ctx.counters;
        match outcome {
            Ok(()) => {
                if measured {
                    let us = done.saturating_duration_since(basis).as_micros();
                    out.histogram
                        .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
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

/// One request on this task's connection, (re)connecting first if needed.
async fn attempt(conn: &mut Option<Conn>, spec: &LoadSpec) -> Result<(), Failure> {
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
    let result = tokio::time::timeout(spec.timeout, async {
        let response = c.sender.send_request(request).await?;
        let status = response.status();
        // The response is complete when its last byte is in, not when the headers are.
        response.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    })
    .await;
    match result {
        Ok(Ok(status)) if status.is_success() => Ok(()),
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
    let mut tick = tokio::time::interval_at(w.start + second, second);
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
    fn open_loop_latency_counts_queueing_but_not_timer_lateness() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Idle connection, timer fired 1 ms late: count from the actual send.
        assert_eq!(open_loop_basis(ms(10), ms(11), Some(ms(3))), ms(11));
        assert_eq!(open_loop_basis(ms(10), ms(11), None), ms(11));
        // Previous response came 200 ms after this request was due; it was sent right then:
        // the whole wait counts.
        assert_eq!(open_loop_basis(ms(10), ms(210), Some(ms(210))), ms(10));
        // ... and a little scheduling delay after that response is not blamed on the server.
        assert_eq!(open_loop_basis(ms(10), ms(212), Some(ms(210))), ms(12));
    }

    /// A server that answers 200 at once, except request number `stall_at` (0-based), which it
    /// holds for `stall` first; `status` for every answer.
    async fn stalling_server(stall_at: u64, stall: Duration, status: StatusCode) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            if seen.fetch_add(1, Ordering::SeqCst) == stall_at {
                                tokio::time::sleep(stall).await;
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

    fn spec(addr: SocketAddr, connections: usize, rate: Option<u64>) -> LoadSpec {
        LoadSpec {
            endpoint: Endpoint::loopback(addr, "/x"),
            payload: Bytes::from_static(b"hello spindle"),
            connections,
            rate,
            timeout: Duration::from_secs(3),
        }
    }

    fn at_least_100ms(h: &Histogram<u64>) -> u64 {
        h.count_between(100_000, MAX_LATENCY_US)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_charges_queued_requests_for_a_stall() {
        let addr = stalling_server(100, Duration::from_millis(200), StatusCode::OK).await;
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
    async fn closed_loop_shows_a_stall_as_one_slow_request() {
        let addr = stalling_server(100, Duration::from_millis(200), StatusCode::OK).await;
        let window = Window::starting_now(Duration::ZERO, Duration::from_secs(2));
        let r = generate(spec(addr, 1, None), window, None).await;
        assert_eq!(at_least_100ms(&r.histogram), 1, "{:?}", r.histogram.max());
        assert!(r.histogram.value_at_quantile(0.99) < 100_000);
        assert_eq!(r.ok, r.histogram.len());
        assert_eq!(r.errors.total(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_non_2xx_and_refused_connections_as_errors() {
        let addr = stalling_server(u64::MAX, Duration::ZERO, StatusCode::NOT_FOUND).await;
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
        // Open loop: one error per scheduled request (30 due, give or take the edge).
        assert!((25..=31).contains(&r.errors.connect), "{:?}", r.errors);
    }
}
