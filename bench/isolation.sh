#!/usr/bin/env bash
# What `isolation: fresh_per_request` costs per request over HTTP, against the reused
# instance, side by side in one run. One module (`spindle_handle` writes one byte into each
# of K pages, K = the request body's length) serves two functions of one `spindle run`
# that differ only in their isolation: `reuse` and `fresh` (each its own chain, one
# instance, `start: fork`). For K = 1, 16, 64, 256 and 600, `spindle bench` drives the two routes in
# interleaved rounds (reuse, fresh, reuse, fresh, ...), once in closed loop at 1 connection
# (latency: the reset runs after the answer is flushed) and once at 16 connections
# (throughput: requests queue, so the reset runs before the next call). Each function's
# worker CPU per request comes from /metrics (its CPU and invocations over all its rounds),
# and so does the reset time it measured itself (spindle_function_reset_seconds).
#
#   bench/isolation.sh [ROUNDS] [SECONDS]      (defaults: 3 rounds, 3 s per target and round)
#
# In-process cost of the reset alone, without HTTP:
#   cargo run --release -p chain-runtime --example reset_cost
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-3}
cargo build --release --locked -p gateway
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$out"' EXIT

cat >"$out/touch.wat" <<'WAT'
(module
  (import "spindle" "output" (func $output (param i32 i32)))
  (memory (export "memory") 40)
  (global $calls (mut i32) (i32.const 0))
  (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
    (local $i i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (block $done
      (loop $page
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store8 (i32.shl (i32.add (local.get $i) (i32.const 16)) (i32.const 12))
          (global.get $calls))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $page)))
    (i32.store8 (i32.const 200) (i32.const 0x6b))
    (call $output (i32.const 200) (i32.const 1))
    (i32.const 0)))
WAT
cat >"$out/isolation.yaml" <<YAML
functions:
  - { name: reuse, module: touch.wat }
  - { name: fresh, module: touch.wat, isolation: fresh_per_request }
chains:
  - { name: reuse, route: /reuse, steps: [reuse], content_type: text/plain }
  - { name: fresh, route: /fresh, steps: [fresh], content_type: text/plain }
YAML

port=18620
"$bin" run "$out/isolation.yaml" --listen "127.0.0.1:$port" --dataplane userspace \
  2>"$out/run.log" &
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
base="http://127.0.0.1:$port"
targets=$(for _ in $(seq "$rounds"); do printf '%s/reuse,%s/fresh,' "$base" "$base"; done)
targets=${targets%,}

for pages in 1 16 64 256 600; do
  body=$(head -c "$pages" /dev/zero | tr '\0' x)
  for conns in 1 16; do
    curl -s "$base/metrics" >"$out/before.txt"
    "$bin" bench --targets "$targets" --duration "${secs}s" --connections "$conns" \
      --payload "$body" --json "$out/bench-$pages-$conns.json" >/dev/null 2>"$out/bench.log"
    curl -s "$base/metrics" >"$out/after.txt"
    python3 - "$pages" "$conns" "$out/bench-$pages-$conns.json" "$out/before.txt" \
      "$out/after.txt" <<'PY'
import json, re, statistics, sys
pages, conns, report, before, after = sys.argv[1:]
targets = json.load(open(report))["targets"]
def med(route, field):
    vals = [t[field] for t in targets if t["url"].endswith(route) and t[field] is not None]
    return statistics.median(vals) if vals else float("nan")
def scrape(path):
    m = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        series, value = line.rsplit(" ", 1)
        m[series] = float(value)
    return m
b, a = scrape(before), scrape(after)
def grew(pattern):
    rx = re.compile(pattern)
    return sum(v - b.get(k, 0.0) for k, v in a.items() if rx.search(k))
rows = {}
for f in ["reuse", "fresh"]:
    calls = grew(r'^spindle_function_invocations_total\{chain="%s",function="%s"\}' % (f, f))
    cpu = grew(r'^spindle_process_cpu_seconds_total\{chain="%s",function="%s",instance="0",process="worker"\}' % (f, f))
    resets = grew(r'^spindle_function_reset_seconds_count\{chain="%s",function="%s"\}' % (f, f))
    reset_s = grew(r'^spindle_function_reset_seconds_sum\{chain="%s",function="%s"\}' % (f, f))
    dropped = grew(r'^spindle_function_reset_pages_total\{chain="%s",function="%s",how=' % (f, f))
    rows[f] = dict(rps=med("/" + f, "rps"), p50=med("/" + f, "p50_us"), p99=med("/" + f, "p99_us"),
                   cpu_us=1e6 * cpu / calls if calls else float("nan"),
                   reset_us=1e6 * reset_s / resets if resets else 0.0,
                   pages=dropped / resets if resets else 0.0)
r, f = rows["reuse"], rows["fresh"]
print(f"K={pages:>3} pages, {conns:>2} conn | reuse: {r['rps']:8.0f} req/s p50 {r['p50']:5.0f} p99 {r['p99']:5.0f} us"
      f" worker {r['cpu_us']:6.1f} us CPU/req | fresh: {f['rps']:8.0f} req/s p50 {f['p50']:5.0f} p99 {f['p99']:5.0f} us"
      f" worker {f['cpu_us']:6.1f} us CPU/req, reset {f['reset_us']:5.1f} us, {f['pages']:.0f} pages/reset"
      f" | fresh/reuse: rps {f['rps'] / r['rps']:.2f}x p50 {f['p50'] / r['p50']:.2f}x worker CPU {f['cpu_us'] / r['cpu_us']:.2f}x")
PY
  done
done
