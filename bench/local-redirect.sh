#!/usr/bin/env bash
# Same-host acceleration (`ingress.local_redirect`, sock_ops + sk_msg) measured honestly: two
# gateways on this host's loopback, one with it and one without, same chain
# (configs/hello.yaml's), loaded by `spindle bench` in one run with the targets interleaved
# round by round; at saturation (32 connections, closed loop) and at one connection. The
# load generator's own CPU is its own column (its side of every connection is accelerated
# too), next to the system's CPU less it.
#
#   bench/local-redirect.sh [ROUNDS] [OUT]     (defaults: 5 rounds, docs/bench/local-redirect)
#
# Needs root (eBPF on the cgroup) and a quiet machine. DURATION [10] seconds per target and
# round; SKIP_BUILD=1 uses target/release as built.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
out=${2:-docs/bench/local-redirect}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive whole number" >&2; exit 2; }
duration=${DURATION:-10}
[[ $(id -u) == 0 ]] || { echo "needs root (eBPF)" >&2; exit 2; }
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  make -s -C examples
  cargo build --release --locked -p gateway
fi
spindle=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle
work=$(mktemp -d /tmp/spindle-local-redirect.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

config() { # FILE PORT HEAD
  { printf 'listen: 127.0.0.1:%s\n%s\n' "$2" "$3"
    sed -e '/^listen:/d' -e '/^#/d' -e "s|module: \.\./|module: $PWD/|" configs/hello.yaml; } >"$1"
}
config "$work/on.yaml" 18201 "ingress: { local_redirect: true }"
config "$work/off.yaml" 18202 ""
for side in on off; do
  "$spindle" run "$work/$side.yaml" >"$work/$side.log" 2>&1 &
  pids+=($!)
done
for port in 18201 18202; do
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
grep -q 'socket to socket' "$work/on.log" || { cat "$work/on.log" >&2; exit 1; }
targets=http://127.0.0.1:18201/hello,http://127.0.0.1:18202/hello
mkdir -p "$(dirname "$out")"
"$spindle" bench --targets "$targets" --rounds "$rounds" --duration "${duration}s" \
  --connections 32 --json "$out-32.json" --markdown "$out-32.md"
"$spindle" bench --targets "$targets" --rounds "$rounds" --duration "${duration}s" \
  --connections 1 --json "$out-1.json" --markdown "$out-1.md"
curl -s http://127.0.0.1:18201/metrics | grep '^spindle_ingress_local_redirect_total' | tee "$out-counters.txt"
echo "target 18201 = local_redirect on, 18202 = off; results in $out-32.md and $out-1.md"
