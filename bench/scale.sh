#!/usr/bin/env bash
# Autoscaling (issue 9), measured with the I/O-bound sleepy guest (examples/src/sleepy.c:
# 2 ms per request blocked in WASI poll_oneoff, then an echo). One chain, one function, the
# release `spindle run` on the userspace dataplane, loopback only. Three sections:
#
#   burst   The offered load jumps 10x (open loop, RATE req/s for 5 s, 2 s of it warm-up,
#           then 10 x RATE for 8 s: `spindle_bench::run_step`, the bench crate's `step`
#           example). Modes, interleaved over ROUNDS rounds: fork-based scale-out
#           (`start: fork`, instances {min: 1, max: 16}), fixed (`instances: 1`), cold-start
#           scale-out (`start: exec`, same autoscale block). p50/p99 and errors before the step,
#           during the ramp (the first 2 s after it) and after it; the instance count (sampled
#           from /metrics every 100 ms) and instance starts. One instance serves ~450 req/s
#           (2.2 ms a request), so RATE=200 is under half of one before the step and 2000 needs
#           at least 5 busy instances after it.
#   zero    Scale from zero (`min: 0`, `scale_down_delay_ms: 300`), fork against exec, both
#           gateways up at once and asked in turn: wait until `spindle_instances_up` is 0,
#           time one request (a POST on a new connection), then one more (warm); ZERO_N
#           times each.
#   memory  N instances forked from the zygote against N cold instances (`instances: N`,
#           `start: fork` vs `start: exec`), N in MEM_N: each worker's Pss, Rss and
#           Private_Dirty from /proc/PID/smaps_rollup (pids from `spindle_instance_pid`)
#           after every instance has served requests; MEM_ROUNDS interleaved rounds.
#
#   bench/scale.sh [SECTIONS]      (default "burst zero memory")
#   ROUNDS=3 RATE=200 CONNECTIONS=64 ZERO_N=40 MEM_N="1 4 16" MEM_ROUNDS=3 DATAPLANE=userspace
#   KEEP=1 keeps the scratch directory (configs, logs, JSON, samples); SPINDLE=PATH runs another
#   binary of the same CLI.
#
# Every section runs gateways with configs written below; one that does not start (e.g. a
# gateway that does not parse the `instances:` mapping) is reported with its error and the
# script exits 1 at the end. Every wait is bounded; traps stop every process started here.
set -euo pipefail
cd "$(dirname "$0")/.."
sections=${1:-burst zero memory}
has() { [[ " $sections " == *" $1 "* ]]; }
rounds=${ROUNDS:-3} rate=${RATE:-200} connections=${CONNECTIONS:-64}
zero_n=${ZERO_N:-40} mem_n=${MEM_N:-1 4 16} mem_rounds=${MEM_ROUNDS:-3}
dataplane=${DATAPLANE:-userspace}
for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "bench/scale.sh needs $tool" >&2; exit 1; }
done
make -s -C examples
# One invocation, so the load generator's dependencies are built with the gateway's features.
cargo build --release --locked -p gateway -p spindle-bench --bin spindle --example step
target=${CARGO_TARGET_DIR:-$PWD/target}/release
bin=${SPINDLE:-$target/spindle}
module=$PWD/examples/wasm/sleepy.wasm
out=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $out" >&2; else rm -rf "$out"; fi
}
trap cleanup EXIT
port=18580
failed=0

# config FILE START INSTANCES-YAML: one function, sleepy, in one chain at /sleepy.
config() {
  cat >"$1" <<YAML
functions:
  - name: sleepy
    module: $module
    start: $2
$3
chains:
  - name: sleepy
    route: /sleepy
    steps: [sleepy]
YAML
}
fixed() { printf '    instances: %s\n' "$1"; }
# autoscale MIN MAX SCALE_DOWN_DELAY_MS STABLE_MS PANIC_MS: the issue-9 block.
autoscale() {
  cat <<YAML
    instances:
      min: $1
      max: $2
      target: 1
      stable_window_ms: $4
      panic_window_ms: $5
      scale_down_delay_ms: $3
YAML
}

# Prometheus text helpers, shared by every section's Python.
cat >"$out/prom.py" <<'PY'
import re, urllib.request
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
def scrape(port, timeout=2):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()
def samples(text):
    for line in text.splitlines():
        m = LINE.match(line)
        if m and not line.startswith("#"):
            yield m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))
def value(text, name, **labels):
    """Sum of NAME over the series whose labels include LABELS; None if there is none."""
    found = [v for n, l, v in samples(text) if n == name and all(l.get(k) == w for k, w in labels.items())]
    return sum(found) if found else None
PY
# Samples one gauge set every 100 ms for a bounded time, one JSON line each.
cat >"$out/sampler.py" <<'PY'
import json, sys, time
sys.path.insert(0, sys.argv[1])
from prom import scrape, value
port, seconds = int(sys.argv[2]), float(sys.argv[3])
end = time.time() + seconds
while time.time() < end:
    t = time.time()
    try:
        m = scrape(port, timeout=1)
    except Exception:
        m = ""
    f = dict(chain="sleepy", function="sleepy")
    print(json.dumps(dict(t=t, up=value(m, "spindle_instances_up", **f),
                          desired=value(m, "spindle_instances_desired", **f),
                          fork=value(m, "spindle_instance_starts_total", mode="fork", **f),
                          exec=value(m, "spindle_instance_starts_total", mode="exec", **f),
                          in_flight=value(m, "spindle_requests_in_flight", chain="sleepy"))), flush=True)
    time.sleep(max(0, 0.1 - (time.time() - t)))
PY

gauge() { # PORT NAME: the value of NAME{chain="sleepy",function="sleepy"}, empty if absent
  python3 - "$out" "$1" "$2" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from prom import scrape, value
try:
    v = value(scrape(int(sys.argv[2]), timeout=1), sys.argv[3], chain="sleepy", function="sleepy")
except Exception:
    v = None
print("" if v is None else int(v))
PY
}

# start_gw CONFIG LOG -> sets $gw (pid); waits for /healthz (bounded). Fails, printing the
# gateway's last lines, if it exits or does not answer within 20 s.
start_gw() {
  "$bin" run "$1" --listen "127.0.0.1:$port" --dataplane "$dataplane" >"$2" 2>&1 &
  gw=$!
  for _ in $(seq 400); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.05
  done
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  gw=
  return 1
}
stop_gw() {
  [ -n "${gw:-}" ] || return 0
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  gw=
}
# wait_up PORT N SECONDS: until spindle_instances_up >= N.
wait_up() {
  local n
  for _ in $(seq $(($3 * 10))); do
    n=$(gauge "$1" spindle_instances_up)
    [ -n "$n" ] && [ "$n" -ge "$2" ] && return 0
    sleep 0.05
  done
  return 1
}
# why LOG: the line of a gateway's log that says why it did not start.
why() { grep -m1 -iE 'error|invalid|expected|unknown' "$1" || tail -1 "$1" || echo "no output"; }

if has burst; then
step_rate=$((rate * 10))
modes="fork fixed exec"
echo "burst: $rate -> $step_rate req/s, $connections connections, $rounds interleaved rounds"
for round in $(seq "$rounds"); do
  for mode in $modes; do
    cfg=$out/burst-$mode.yaml
    case $mode in
      fork) config "$cfg" fork "$(autoscale 1 16 2000 6000 600)" ;;
      fixed) config "$cfg" fork "$(fixed 1)" ;;
      exec) config "$cfg" exec "$(autoscale 1 16 2000 6000 600)" ;;
    esac
    log=$out/burst-$mode-$round.log
    if ! start_gw "$cfg" "$log" || ! wait_up "$port" 1 20; then
      echo "  $mode round $round: gateway did not start: $(why "$log")"
      echo "$(why "$log")" >"$out/burst-$mode-$round.failed"
      stop_gw; failed=1; port=$((port + 1)); continue
    fi
    # 2 s warm-up + 3 s before + 2 s ramp + 6 s after, then up to 3 s of drain.
    python3 "$out/sampler.py" "$out" "$port" 17 >"$out/burst-$mode-$round.samples" &
    sampler=$!
    "$target/examples/step" "http://127.0.0.1:$port/sleepy" --rate "$rate" --step-rate "$step_rate" \
      --connections "$connections" --warmup 2s --before 3s --ramp 2s --after 6s --bucket 500ms \
      --json "$out/burst-$mode-$round.json" >/dev/null 2>"$out/burst-$mode-$round.step.log" || {
        echo "  $mode round $round: the load failed: $(tail -1 "$out/burst-$mode-$round.step.log")"
        failed=1; }
    kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
    stop_gw
    port=$((port + 1))
  done
done
python3 - "$out" "$rounds" "$modes" <<'PY'
import json, os, statistics, sys
out, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
describe = {"fork": "fork scale-out (start: fork, min 1, max 16)",
            "fixed": "fixed (instances: 1)",
            "exec": "cold scale-out (start: exec, min 1, max 16)"}
ms = lambda us: "-" if us is None else f"{us / 1000:.1f}"
med = lambda xs: statistics.median(xs) if xs else None
lateness = []
print()
print("| mode | before p50 / p99 ms | ramp (0-2 s) p50 / p99 ms | ramp errors | after (2-8 s) p50 / p99 ms"
      " | after errors | instances: max (desired max) | step -> max instances | starts fork / exec |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for mode in modes:
    runs = []
    for r in range(1, rounds + 1):
        base = f"{out}/burst-{mode}-{r}"
        if os.path.exists(base + ".failed") or not os.path.exists(base + ".json"):
            continue
        rep = json.load(open(base + ".json"))
        lines = [json.loads(l) for l in open(base + ".samples") if l.strip()]
        step_t = rep["started_unix_us"] / 1e6 + rep["step_at_s"]
        ups = [(s["t"], s["up"]) for s in lines if s["up"] is not None]
        top = max((u for _, u in ups), default=None)
        reach = next((t - step_t for t, u in ups if u == top and t >= step_t), None)
        desired = [s["desired"] for s in lines if s["desired"] is not None]
        def delta(key):
            v = [s[key] for s in lines if s[key] is not None]
            return v[-1] - v[0] if v else 0
        runs.append(dict(phases={p["name"]: p for p in rep["phases"]}, top=top, reach=reach,
                         desired=max(desired) if desired else None,
                         fork=delta("fork"), exec=delta("exec"), lateness=rep["sched_lateness_p99_us"]))
    if not runs:
        failed = f"{out}/burst-{mode}-1.failed"
        reason = open(failed).read().strip().replace(out + "/", "") if os.path.exists(failed) else "no run"
        print(f"| {describe[mode]} | did not start: {reason} |" + " |" * 8)
        continue
    def pct(phase, key):
        xs = [r["phases"][phase][key] for r in runs if r["phases"][phase][key] is not None]
        return med(xs), (max(xs) if xs else None)
    def cell(phase):
        p50, _ = pct(phase, "p50_us")
        p99, worst = pct(phase, "p99_us")
        return f"{ms(p50)} / {ms(p99)} ({ms(worst)})"
    errs = lambda phase: (f'{sum(sum(r["phases"][phase]["errors"].values()) for r in runs)}'
                          f' of {sum(r["phases"][phase]["due"] for r in runs)}')
    top = med([r["top"] for r in runs if r["top"] is not None])
    des = med([r["desired"] for r in runs if r["desired"] is not None])
    reach = med([r["reach"] for r in runs if r["reach"] is not None])
    lateness += [r["lateness"] for r in runs]
    print(f"| {describe[mode]} | {cell('before')} | {cell('ramp')} | {errs('ramp')}"
          f" | {cell('after')} | {errs('after')}"
          f" | {'-' if top is None else f'{top:.0f}'} ({'-' if des is None else f'{des:.0f}'})"
          f" | {'-' if reach is None or top <= 1 else f'{reach:+.1f} s'}"
          f" | {med([r['fork'] for r in runs]):.0f} / {med([r['exec'] for r in runs]):.0f} |")
print()
print(f"p50 / p99: medians over {rounds} rounds, (worst round's p99); latency from each request's due time"
      " (open loop), so queueing counts. Errors: every round's, of the requests due in the phase."
      " Instances: spindle_instances_up sampled every 100 ms; starts: spindle_instance_starts_total during the run."
      f" Load generator lateness p99 (worst round): {max(lateness, default=0) / 1000:.1f} ms.")

# Round 1 over time: each 0.5 s bucket's p99 (of the requests due in it) and the instances up
# at its end.
cols = []
for mode in modes:
    base = f"{out}/burst-{mode}-1"
    if not os.path.exists(base + ".json"):
        continue
    rep = json.load(open(base + ".json"))
    lines = [json.loads(l) for l in open(base + ".samples") if l.strip()]
    step_t = rep["started_unix_us"] / 1e6 + rep["step_at_s"]
    def up_at(t):
        before = [s["up"] for s in lines if s["t"] - step_t <= t and s["up"] is not None]
        return before[-1] if before else None
    cols.append((mode, {round(b["from_s"], 2): (b, up_at(b["to_s"])) for b in rep["timeline"]}))
if cols:
    print()
    print("Round 1 over time (seconds from the step): p99 ms of the requests due in each 0.5 s, errors, instances up at its end")
    print()
    print("| t (s) | " + " | ".join(f"{m}: p99 ms / errors / up" for m, _ in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for t in sorted(k for k in cols[0][1] if k >= -1.0):
        cells = []
        for _, by in cols:
            b, up = by.get(t, (None, None))
            if b is None:
                cells.append("")
                continue
            cells.append(f"{ms(b['p99_us'])} / {sum(b['errors'].values())} / {'-' if up is None else f'{up:.0f}'}")
        print(f"| {t:+.1f} | " + " | ".join(cells) + " |")
PY
fi

if has zero; then
echo
echo "zero: scale from zero, $zero_n requests per mode, fork and exec asked in turn"
zports=()
for mode in fork exec; do
  cfg=$out/zero-$mode.yaml
  config "$cfg" "$mode" "$(autoscale 0 4 300 1000 100)"
  if start_gw "$cfg" "$out/zero-$mode.log"; then
    zports+=("$mode=$port")
    gw=  # stopped below (or by the trap)
  else
    echo "  $mode: gateway did not start: $(why "$out/zero-$mode.log")"
    failed=1
  fi
  port=$((port + 1))
done
# One process for the whole loop: polls /metrics every 50 ms until the function has no
# instance (at most 20 s; a mode that twice in a row never gets there is dropped), then times
# one POST on a new connection and a second one right after it (warm), for each mode in turn.
python3 - "$out" "$zero_n" "${zports[@]}" <<'PY' || failed=1
import http.client, math, sys, time
sys.path.insert(0, sys.argv[1])
from prom import scrape, value
out, n = sys.argv[1], int(sys.argv[2])
ports = dict(a.split("=") for a in sys.argv[3:])
f = dict(chain="sleepy", function="sleepy")
def post(port):
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        c.request("POST", "/sleepy", body=b"hello spindle")
        r = c.getresponse()
        r.read()
        c.close()
        return r.status, time.perf_counter() - t
    except Exception:
        return 0, time.perf_counter() - t
def zero(port):
    end = time.time() + 20
    while time.time() < end:
        try:
            if value(scrape(int(port), timeout=1), "spindle_instances_up", **f) == 0:
                return True
        except Exception:
            pass
        time.sleep(0.05)
    return False
# One request each first, not counted: the first start may wait for the zygote's compile.
for port in ports.values():
    post(port)
rows = {m: [] for m in ports}
misses = {m: 0 for m in ports}  # in a row: after 2, the mode is not asked again (bounded time)
for _ in range(n):
    for mode, port in ports.items():
        if misses[mode] >= 2:
            continue
        if zero(port):
            misses[mode] = 0
            rows[mode].append((post(port), post(port)))
        else:
            misses[mode] += 1
            rows[mode].append(None)
def pct(xs, q):  # nearest rank
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else None
ms = lambda s: "-" if s is None else f"{s * 1000:.1f}"
print()
print("| start | n | first request p50 / p99 / max ms | warm request p50 / p99 ms | errors (non-200)"
      " | never reached 0 | instance start, gateway's mean (starts) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for mode in ["fork", "exec"]:
    if mode not in ports:
        print(f"| {mode} | 0 | did not start |||||")
        continue
    ok = [r for r in rows[mode] if r is not None]
    first = [a[1] for a, b in ok if a[0] == 200]
    warm = [b[1] for a, b in ok if b[0] == 200]
    errors = sum((a[0] != 200) + (b[0] != 200) for a, b in ok)
    text = scrape(int(ports[mode]))
    s = value(text, "spindle_instance_start_seconds_sum", **f) or 0
    c = value(text, "spindle_instance_start_seconds_count", **f) or 0
    start = f"{s / c * 1000:.1f} ms ({c:.0f})" if c else "-"
    print(f"| {mode} | {len(first)} | {ms(pct(first, .5))} / {ms(pct(first, .99))} / {ms(max(first) if first else None)}"
          f" | {ms(pct(warm, .5))} / {ms(pct(warm, .99))} | {errors} | {len(rows[mode]) - len(ok)} | {start} |")
print()
print("Each first request is sent once spindle_instances_up is 0 (polled every 50 ms), the warm one right after"
      " it; POST on a new loopback connection, timed from connect to the last byte (Python http.client).")
# Fails the script when a mode measured nothing (never at 0 instances, or every request failed).
sys.exit(0 if all(any(r and r[0][0] == 200 for r in rows[m]) for m in ports) else 1)
PY
[ "${#zports[@]}" -eq 2 ] || failed=1
kill $(jobs -p) 2>/dev/null || true
wait 2>/dev/null || true
fi

if has memory; then
echo
echo "memory: N instances, fork vs exec, $mem_rounds interleaved rounds"
: >"$out/mem.txt"
for round in $(seq "$mem_rounds"); do
  for n in $mem_n; do
    for mode in fork exec; do
      cfg=$out/mem-$mode-$n.yaml
      config "$cfg" "$mode" "$(fixed "$n")"
      log=$out/mem-$mode-$n-$round.log
      if ! start_gw "$cfg" "$log" || ! wait_up "$port" "$n" 60; then
        echo "  N=$n $mode round $round: gateway did not start: $(why "$log")"
        stop_gw; failed=1; port=$((port + 1)); continue
      fi
      # Every instance serves: 4N requests, N at a time, for 3 rounds.
      urls=()
      for _ in $(seq $((4 * n))); do urls+=("http://127.0.0.1:$port/sleepy"); done
      for _ in 1 2 3; do
        curl -s --no-progress-meter --parallel --parallel-max "$n" -X POST --data 'hello spindle' "${urls[@]}" &>/dev/null || true
      done
      sleep 0.5
      python3 - "$out" "$port" "$gw" "$mode" "$n" "$round" >>"$out/mem.txt" <<'PY'
import json, os, sys
sys.path.insert(0, sys.argv[1])
from prom import samples, scrape
port, gw, mode, n, rnd = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
text = scrape(port)
pids = {int(l["instance"]): int(v) for name, l, v in samples(text)
        if name == "spindle_instance_pid" and l.get("function") == "sleepy"}
served = sum(v for name, l, v in samples(text)
             if name == "spindle_function_invocations_total" and l.get("function") == "sleepy")
def rollup(pid):
    kib = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            kib[parts[0].rstrip(":")] = int(parts[1])
    return {k: kib.get(k, 0) for k in ("Rss", "Pss", "Private_Dirty")}
def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids
workers = [rollup(p) for p in pids.values()]
# Children of the gateway that are not instances: the function's zygote (start: fork).
others = [rollup(p) for p in children(gw) if p not in pids.values()]
print(json.dumps(dict(mode=mode, n=n, round=rnd, instances=len(pids), served=served,
                      workers=workers, others=others, gateway=rollup(gw))))
PY
      stop_gw
      port=$((port + 1))
    done
  done
done
python3 - "$out" "$mem_n" <<'PY'
import json, statistics, sys
out, ns = sys.argv[1], [int(x) for x in sys.argv[2].split()]
rows = [json.loads(l) for l in open(f"{out}/mem.txt") if l.strip()]
mib = lambda kib: f"{kib / 1024:.2f}"
print()
print("| N | start | Pss per instance, mean (MiB) | Rss per instance | Private_Dirty per instance"
      " | zygote Pss | (instances + zygote) Pss / N | rounds |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for n in ns:
    for mode in ["fork", "exec"]:
        mine = [r for r in rows if r["n"] == n and r["mode"] == mode and r["instances"] == n]
        if not mine:
            print(f"| {n} | {mode} | did not run |||||| 0 |")
            continue
        per = lambda key: statistics.median(statistics.mean(w[key] for w in r["workers"]) for r in mine)
        zyg = statistics.median(sum(o["Pss"] for o in r["others"]) for r in mine)
        total = statistics.median((sum(w["Pss"] for w in r["workers"]) + sum(o["Pss"] for o in r["others"])) / n
                                  for r in mine)
        print(f"| {n} | {mode} | {mib(per('Pss'))} | {mib(per('Rss'))} | {mib(per('Private_Dirty'))}"
              f" | {mib(zyg) if mode == 'fork' else '-'} | {mib(total)} | {len(mine)} |")
print()
print("/proc/PID/smaps_rollup of each instance (spindle_instance_pid) after 12N requests, N at a time;"
      " medians over rounds of the per-round mean. Pss splits every shared page among the processes"
      " that map it (zygote included), so the last column is the whole function's memory per instance.")
PY
fi
exit "$failed"
