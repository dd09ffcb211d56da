#!/usr/bin/env bash
# What confining workers costs at start (docs/security.md): `spindle fork local-bench` on
# configs/fork.yaml's forkrand with the sandbox on (the default) and off
# (`sandbox: { enabled: false }`), ROUNDS interleaved runs each (the order alternates), on
# this build. Prints, per setting, the median over runs of each run's p50 and p99 of a
# forked instance's and a cold exec'd instance's first response. Needs root (the sandbox
# joins namespaces and changes uid only as root).
#
#   bench/sandbox.sh [ROUNDS]   (default 7)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
[ "$(id -u)" -eq 0 ] || { echo "bench/sandbox.sh needs root" >&2; exit 1; }
scripts/setup.sh >/dev/null
make -s -C examples
cargo build --release --locked -p gateway
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle
off=$(mktemp configs/.fork-sandbox-off-XXXX.yaml)
out=$(mktemp)
trap 'rm -f "$off" "$out"' EXIT
{ echo "sandbox: { enabled: false }"; cat configs/fork.yaml; } >"$off"
for r in $(seq "$rounds"); do
  order="on off"
  [ $((r % 2)) -eq 0 ] && order="off on"
  for setting in $order; do
    config=configs/fork.yaml
    [ "$setting" = off ] && config=$off
    "$bin" fork local-bench "$config" --chain rand --function forkrand --rounds 1 --samples 40 2>/dev/null |
      sed "s/^/$setting /" >>"$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    setting, text = line.split(" ", 1)
    row = json.loads(text)
    if row.get("result") in ("local_fork", "cold_exec"):
        for q in ("p50", "p99"):
            runs.setdefault((setting, row["result"], q), []).append(row["first_response_us"][q] / 1000)
print("| first response, ms (median of runs) | sandbox on p50 / p99 | sandbox off p50 / p99 | on / off (p50) |")
print("|---|---:|---:|---:|")
for kind in ("local_fork", "cold_exec"):
    m = {(s, q): statistics.median(runs[(s, kind, q)]) for s in ("on", "off") for q in ("p50", "p99")}
    print(f"| {kind} ({len(runs[('on', kind, 'p50')])} runs) | {m['on','p50']:.2f} / {m['on','p99']:.2f} "
          f"| {m['off','p50']:.2f} / {m['off','p99']:.2f} | {m['on','p50'] / m['off','p50']:.2f}x |")
PY
