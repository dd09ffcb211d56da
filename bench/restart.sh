#!/usr/bin/env bash
# A worker SIGKILLed under load: how many requests fail and how long until its replacement
# serves, with `start: fork` (replaced by a fork from the function's zygote) against
# `start: exec` (replaced by a cold exec'd worker). configs/hello.yaml under
# `wrk -c16 -d8s`; the reverse worker is killed 3 s in. Rounds alternate the two modes.
#
#   bench/restart.sh [ROUNDS]     (default 3; needs wrk, see scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
command -v wrk >/dev/null || { echo "bench/restart.sh needs wrk (scripts/setup.sh)" >&2; exit 1; }
make -s -C examples
cargo build --release --locked -p gateway
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$out"' EXIT
cat >"$out/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "hello spindle"
LUA
port=18480
for round in $(seq "$rounds"); do
  for mode in fork exec; do
    sed "s|    module: ../examples/wasm/reverse.wasm|    module: $PWD/examples/wasm/reverse.wasm\n    start: $mode|; s|module: \.\./|module: $PWD/|" \
      configs/hello.yaml >"$out/hello-$mode.yaml"
    "$bin" run "$out/hello-$mode.yaml" --listen "127.0.0.1:$port" --dataplane userspace \
      2>"$out/run-$mode-$round.log" &
    gw=$!
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
    wrk -t2 -c16 -d8s -s "$out/post.lua" "http://127.0.0.1:$port/hello" >"$out/wrk-$mode-$round.txt" &
    sleep 3
    pid=$(curl -s "http://127.0.0.1:$port/metrics" |
      awk '/^spindle_instance_pid\{chain="hello",function="reverse",instance="0"\}/ {print $2}')
    killed=$(date +%s.%N)
    kill -9 "$pid"
    wait %2 2>/dev/null || wait "$(jobs -p | tail -1)" || true
    metrics=$(curl -s "http://127.0.0.1:$port/metrics")
    kill "$gw"; wait "$gw" || true
    restarted=$(grep 'instance restarted' "$out/run-$mode-$round.log" | head -1 | cut -d' ' -f1)
    python3 - "$mode" "$killed" "$restarted" "$out/wrk-$mode-$round.txt" <<PY
import datetime, re, sys
mode, killed, restarted, wrk = sys.argv[1], float(sys.argv[2]), sys.argv[3], open(sys.argv[4]).read()
t = datetime.datetime.fromisoformat(restarted.replace("Z", "+00:00")).timestamp()
m = """$metrics"""
code = lambda c: sum(float(l.split()[-1]) for l in m.splitlines()
                     if l.startswith('spindle_requests_total{chain="hello",code="%s"}' % c))
reqs = re.search(r"(\d+) requests in", wrk).group(1)
print(f"{mode:4}: kill -> replacement ready {1000 * (t - killed):6.1f} ms | 502: {code('502'):4.0f}"
      f" | 503: {code('503'):5.0f} | 200: {code('200'):6.0f} (wrk: {reqs} requests)")
PY
    port=$((port + 1))
  done
done
