#!/usr/bin/env bash
# Side-by-side benchmark on loopback, one run, same machine, same payload (13-byte POST):
#   1. throughput of the 3-function hello chain: bare hyper (ceiling), Spindle userspace
#      dataplane, Spindle sockmap (eBPF) dataplane — wrk, 2 threads, CONNECTIONS connections;
#   2. per-hop latency on each dataplane: one connection against a 1-function and an
#      8-function chain; per hop = (p(8 hops) - p(1 hop)) / 7.
#
#   bench/run.sh [DURATION_S] [CONNECTIONS]     (defaults: 10 s, 32 connections)
# The sockmap rows need root; without it they are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
connections=${2:-32}
scripts/setup.sh
make -s -C examples
cargo build --release --locked -p gateway -p spindle-bench

out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$out"' EXIT
printf 'wrk.method = "POST"\nwrk.body = "hello spindle"\n' > "$out/body.lua"

wait_ready() { # port log
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$2"; return 1
}

target/release/hyper-hello 127.0.0.1:18090 2>/dev/null &
target/release/spindle run bench/bench.yaml --listen 127.0.0.1:18081 --dataplane userspace 2>"$out/user.log" &
wait_ready 18081 "$out/user.log"
sockmap=yes
if [ "$(id -u)" -ne 0 ]; then
  sockmap="no (needs root)"
else
  target/release/spindle run bench/bench.yaml --listen 127.0.0.1:18082 --dataplane sockmap 2>"$out/sock.log" &
  wait_ready 18082 "$out/sock.log" || sockmap="no (failed to start, log above)"
fi

# wrk's latency distribution value at percentile $2 in microseconds, from report $1.
pct_us() {
  awk -v p="$2" '$1==p { v=$2; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u=="ms") v*=1000; else if (u=="s") v*=1000000; printf "%.1f", v }' "$1"
}
run() { # name url threads connections
  wrk -t"$3" -c"$4" -d2s -s "$out/body.lua" "$2" >/dev/null   # warm-up
  wrk -t"$3" -c"$4" -d"${duration}s" --latency -s "$out/body.lua" "$2" > "$out/$1.txt"
  awk '/Requests\/sec/ {print $2}' "$out/$1.txt" > "$out/$1.rps"
  pct_us "$out/$1.txt" "50%" > "$out/$1.p50"
  pct_us "$out/$1.txt" "99%" > "$out/$1.p99"
  printf '| %-34s | %10s | %9s | %9s |\n' "$1" "$(cat "$out/$1.rps")" "$(cat "$out/$1.p50")" "$(cat "$out/$1.p99")"
}

echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), Linux $(uname -r), $(date -u +%F)"
echo "sockmap dataplane: $sockmap"
echo
echo "Throughput, 3-function chain (wrk -t2 -c$connections -d${duration}s, POST 13 bytes)"
printf '| %-34s | %10s | %9s | %9s |\n' target "requests/s" "p50 µs" "p99 µs"
printf '|%s|%s|%s|%s|\n' ------------------------------------ ------------ ----------- -----------
run "hyper hello-world (ceiling)" http://127.0.0.1:18090/ 2 "$connections"
run "spindle userspace" http://127.0.0.1:18081/hello 2 "$connections"
[ "$sockmap" = yes ] && run "spindle sockmap" http://127.0.0.1:18082/hello 2 "$connections"

echo
echo "Latency, one connection (wrk -t1 -c1 -d${duration}s)"
printf '| %-34s | %10s | %9s | %9s |\n' target "requests/s" "p50 µs" "p99 µs"
printf '|%s|%s|%s|%s|\n' ------------------------------------ ------------ ----------- -----------
modes="userspace:18081"
[ "$sockmap" = yes ] && modes="$modes sockmap:18082"
for m in $modes; do
  run "${m%%:*} 1 hop" "http://127.0.0.1:${m##*:}/hop1" 1 1
  run "${m%%:*} 8 hops" "http://127.0.0.1:${m##*:}/hop8" 1 1
done

echo
ratio() { awk -v a="$(cat "$out/$1")" -v b="$(cat "$out/$2")" 'BEGIN { printf "%.2f", a / b }'; }
hop() { awk -v a="$(cat "$out/$1 8 hops.$2")" -v b="$(cat "$out/$1 1 hop.$2")" 'BEGIN { printf "%.1f", (a - b) / 7 }'; }
echo "spindle userspace / ceiling throughput: $(ratio 'spindle userspace.rps' 'hyper hello-world (ceiling).rps')"
echo "per-hop latency, userspace: p50 $(hop userspace p50) µs, p99 $(hop userspace p99) µs"
if [ "$sockmap" = yes ]; then
  echo "spindle sockmap / ceiling throughput:   $(ratio 'spindle sockmap.rps' 'hyper hello-world (ceiling).rps')"
  echo "spindle sockmap / userspace throughput: $(ratio 'spindle sockmap.rps' 'spindle userspace.rps')"
  echo "per-hop latency, sockmap:   p50 $(hop sockmap p50) µs, p99 $(hop sockmap p99) µs"
fi
