#!/usr/bin/env bash
# Usage: bench/cpu-per-request.sh (after bench/run.sh has built release binaries; sockmap needs root).
# Runs the hello chain under wrk -t2 -c32 for 8 s per dataplane and prints CPU time per 1000
# requests of the gateway and of the three workers, read from /proc/PID/stat.
# CPU seconds per 1000 requests of the gateway and of the workers, per dataplane.
set -e
cd "$(dirname "$0")/.."
tick=$(getconf CLK_TCK)
printf 'wrk.method = "POST"\nwrk.body = "hello spindle"\n' > /tmp/body.lua
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for mode in userspace sockmap; do
  target/release/spindle run bench/bench.yaml --listen 127.0.0.1:18099 --dataplane $mode 2>/dev/null &
  gw=$!
  for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18099/readyz >/dev/null 2>&1 && break; sleep 0.1; done
  workers=$(pgrep -P $gw -f -- "--chain hello" | tr '\n' ' ')
  g0=$(cpu $gw); w0=0; for w in $workers; do w0=$((w0 + $(cpu $w))); done
  r=$(wrk -t2 -c32 -d8s -s /tmp/body.lua http://127.0.0.1:18099/hello | awk '/^Requests\/sec/ {print $2} / requests in / {print $1}' | head -1)
  g1=$(cpu $gw); w1=0; for w in $workers; do w1=$((w1 + $(cpu $w))); done
  echo "$mode: requests=$r gateway_cpu_ms_per_1k=$(awk -v a=$((g1-g0)) -v t=$tick -v n=$r 'BEGIN{printf "%.1f", a/t*1e6/n}') workers_cpu_ms_per_1k=$(awk -v a=$((w1-w0)) -v t=$tick -v n=$r 'BEGIN{printf "%.1f", a/t*1e6/n}')"
  kill $gw; wait $gw 2>/dev/null || true
done
