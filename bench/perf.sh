#!/usr/bin/env bash
# The performance figures docs/benchmarks.md publishes, in one go, with `spindle bench`:
#   1. saturation: closed loop, 32 connections, every target, ROUNDS interleaved rounds;
#   2. equal low load: open loop at 1,000 requests/s for 30 s (CPU per request, idle
#      baseline subtracted, against the ceiling's);
#   3. per-hop latency: chains of 1, 3 and 6 functions at one connection, both dataplanes,
#      with the ping-pong floor measured in the same rounds;
#   4. payload sweep: 13 B, 4 KiB, 64 KiB, 1 MiB and 8 MiB through configs/large.yaml;
#   5. the same sweep through its in-place chain (no copies into or out of the guests).
#
#   bench/perf.sh [ROUNDS] [OUT_DIR]     (defaults: 5 rounds, docs/bench)
# Needs root for the sockmap target. Run it on an otherwise idle machine: every report
# warns when the idle baseline shows other load.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
out=${2:-docs/bench}
mkdir -p "$out"
scripts/setup.sh
make -s -C examples
cargo build --release --locked -p gateway
spindle=target/release/spindle

echo "== 1. saturation (closed loop, 32 connections) =="
"$spindle" bench --rounds "$rounds" --duration 10s \
  --json "$out/perf-32conn.json" --markdown "$out/perf-32conn.md" --plot "$out/perf-32conn.svg"

echo "== 2. equal load: 1,000 requests/s for 30 s =="
"$spindle" bench --rounds "$(( rounds < 3 ? rounds : 3 ))" --duration 30s --rate 1000 \
  --targets ceiling,userspace,sockmap,knative \
  --json "$out/perf-1000rps.json" --markdown "$out/perf-1000rps.md"

echo "== 3. per-hop latency at one connection =="
"$spindle" bench --hops 1,3,6 --rounds "$rounds" --duration 3s \
  --json "$out/perf-hops.json" --markdown "$out/perf-hops.md"

echo "== 4. payload sweep (configs/large.yaml) =="
"$spindle" bench --config configs/large.yaml --payload-sizes 13,4KiB,64KiB,1MiB,8MiB \
  --rounds "$(( rounds < 3 ? rounds : 3 ))" --duration 4s --connections 8 \
  --targets ceiling,userspace,sockmap,knative \
  --json "$out/perf-sweep.json" --markdown "$out/perf-sweep.md"

echo "== 5. payload sweep, in-place functions (configs/large.yaml, /hello-inplace) =="
"$spindle" bench --config configs/large.yaml --path /hello-inplace \
  --payload-sizes 13,4KiB,64KiB,1MiB,8MiB \
  --rounds "$(( rounds < 3 ? rounds : 3 ))" --duration 4s --connections 8 \
  --targets userspace,sockmap \
  --json "$out/perf-sweep-inplace.json" --markdown "$out/perf-sweep-inplace.md"
