#!/usr/bin/env bash
# Side-by-side benchmark on loopback, one run: the 3-function hello chain in Spindle
# (userspace dataplane) versus a bare hyper hello-world server (the ceiling).
# Prints wrk's requests/s and latency percentiles for both, then the ratio.
#
#   bench/run.sh [DURATION_S] [CONNECTIONS]     (defaults: 10 s, 32 connections, 2 wrk threads)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
connections=${2:-32}
scripts/setup.sh
make -s -C examples
cargo build --release --locked -p gateway -p spindle-bench

out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$out"' EXIT
body="$out/body.lua"
# The same 13-byte POST body for both targets.
printf 'wrk.method = "POST"\nwrk.body = "hello spindle"\n' > "$body"

target/release/spindle run configs/hello.yaml --listen 127.0.0.1:18080 2>"$out/spindle.log" &
target/release/hyper-hello 127.0.0.1:18090 2>/dev/null &
for _ in $(seq 1 600); do
  curl -sf http://127.0.0.1:18080/readyz >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf -d 'hello spindle' http://127.0.0.1:18080/hello >/dev/null || { cat "$out/spindle.log"; exit 1; }

run() { # name url
  wrk -t2 -c"$connections" -d2s -s "$body" "$2" >/dev/null   # warm-up
  wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$body" "$2" > "$out/$1.txt"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/$1.txt")
  p50=$(awk '$1=="50%" {print $2}' "$out/$1.txt")
  p99=$(awk '$1=="99%" {print $2}' "$out/$1.txt")
  printf '| %-28s | %10s | %8s | %8s |\n' "$1" "$rps" "$p50" "$p99"
  echo "$rps" > "$out/$1.rps"
}

echo "machine: $(nproc) cores, $(uname -r), $(date -u +%F)"
echo "wrk: 2 threads, $connections connections, ${duration}s, POST 13 bytes"
printf '| %-28s | %10s | %8s | %8s |\n' target "requests/s" p50 p99
printf '|%s|%s|%s|%s|\n' ------------------------------ ------------ ---------- ----------
run "hyper hello-world (ceiling)" http://127.0.0.1:18090/
run "spindle hello, 3 functions" http://127.0.0.1:18080/hello
awk -v s="$(cat "$out/spindle hello, 3 functions.rps")" -v h="$(cat "$out/hyper hello-world (ceiling).rps")" \
  'BEGIN { printf "spindle/ceiling throughput ratio: %.2f\n", s / h }'
