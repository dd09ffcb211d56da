#!/usr/bin/env bash
# Remote fork, measured: time from "a new instance is needed" to its first response for a
# child resumed on another node (a network namespace joined by a veth pair), lazy (pages on
# first touch, userfaultfd; with and without 15 pages of readahead; with fault-order prefetch
# on a second connection, `lazy-order`: the order an earlier child faulted, kept in a node
# cache file that holds no pages; and from a warm node page cache, `lazy-cached`: every page
# an earlier child on the node fetched is read locally, `lazy-cached-order` with fault-order
# prefetch from it too) against eager (every page that holds data fetched first), for a
# guest with 1 MiB of warm state that each request reads (table1m) and one that touches a
# few pages (forkrand). Rounds are interleaved; medians and the worst round are printed,
# beside the floors measured in the same run: one veth round trip (ping) and the node's
# one-time module compile (the cold start's dominant part, which a child never pays).
#
# Then local fork on this node (`spindle fork local-bench`): a child forked from the
# function's zygote against a cold exec'd worker, with the floors of a bare fork and of
# fork + exec of /bin/true, forks per second from one zygote and each one's memory.
#
# Throughput (`fork resume --children N`): one parent image and K = 1, 2, 4 child nodes, each a
# network namespace with its own veth to the parent's, every node running one resume process
# that compiles once and resumes N children back to back, all nodes at once; aggregate forks/s,
# CPU per fork on each side, bytes per fork, lazy (without and with 15 pages of readahead) /
# eager / lazy from a warm node page cache; then
# each child's memory (N children held alive at once) against a cold instance.
#
#   bench/fork.sh [ROUNDS] [SECTIONS]   (default 7 and "latency throughput local"; needs root
#                                        for the namespaces and userfaultfd)
#   TP_SCALE_PCT: children per node and run, in percent of the defaults (table1m lazy 100,
#   table1m eager and cached 400, forkrand 2000: about a second or more per run).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
sections=${2:-latency throughput local}
has() { [[ " $sections " == *" $1 "* ]]; }
[ "$(id -u)" -eq 0 ] || { echo "bench/fork.sh needs root (network namespaces, userfaultfd)" >&2; exit 1; }
scripts/setup.sh >/dev/null
make -s -C examples
cargo build --release --locked -p gateway
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle

a=spf-bench-a-$$ b=spf-bench-b-$$
extra_ns=()
out=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  for ns in "$a" "$b" "${extra_ns[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "va$$" type veth peer name "vb$$"
ip link set "va$$" netns "$a"; ip link set "vb$$" netns "$b"
ip -n "$a" addr add 10.251.0.1/30 dev "va$$"; ip -n "$b" addr add 10.251.0.2/30 dev "vb$$"
for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
ip -n "$a" link set "va$$" up; ip -n "$b" link set "vb$$" up

serve() { # function chain port -> descriptor file
  ip netns exec "$a" "$bin" fork serve configs/fork.yaml --chain "$2" --function "$1" \
    --listen "10.251.0.1:$3" --warm a --warm b --warm c >"$out/$1.desc" 2>"$out/$1.log" &
  # `ip netns exec` execs the command: this is the page server's pid (its CPU is measured).
  echo $! >"$out/$1.pid"
  for _ in $(seq 100); do [ -s "$out/$1.desc" ] && return 0; sleep 0.05; done
  cat "$out/$1.log"; return 1
}
serve table1m table 7071
serve forkrand rand 7072

resume() { # function chain extra... -> one JSON line
  local fn=$1 chain=$2; shift 2
  ip netns exec "$b" "$bin" fork resume "@$out/$fn.desc" --config configs/fork.yaml \
    --chain "$chain" --function "$fn" --body x "$@" 2>>"$out/resume.log"
}
if has latency; then
# One earlier child per function on the child node: it logs its fault order (no pages kept)
# for lazy-order, and fills the page cache lazy-cached reads.
for f in table1m:table forkrand:rand; do
  fn=${f%%:*} chain=${f##*:}
  resume "$fn" "$chain" --cache "$out/$fn.order" --no-cache-fill >/dev/null
  resume "$fn" "$chain" --cache "$out/$fn.cache" >/dev/null
done

rtt=$(ip netns exec "$b" ping -c 50 -i 0.01 -q 10.251.0.1 | awk -F/ '/rtt/ {print $5}')
for round in $(seq "$rounds"); do
  for f in table1m:table forkrand:rand; do
    fn=${f%%:*} chain=${f##*:}
    for mode in lazy lazy-ra15 lazy-order lazy-cached lazy-cached-order eager; do
      case $mode in
        lazy) extra=() ;;
        lazy-ra15) extra=(--readahead 15) ;;
        lazy-order) extra=(--cache "$out/$fn.order" --no-cache-fill --prefetch order) ;;
        lazy-cached) extra=(--cache "$out/$fn.cache") ;;
        lazy-cached-order) extra=(--cache "$out/$fn.cache" --prefetch order) ;;
        eager) extra=(--eager) ;;
      esac
      resume "$fn" "$chain" "${extra[@]}" >>"$out/$fn-$mode.jsonl"
    done
  done
done

python3 - "$out" "$rtt" <<'PY'
import json, statistics, sys
out, rtt = sys.argv[1], float(sys.argv[2])
print(f"veth round trip (ping, avg of 50): {rtt * 1000:.0f} µs")
for fn in ["table1m", "forkrand"]:
    for mode in ["lazy", "lazy-ra15", "lazy-order", "lazy-cached", "lazy-cached-order", "eager"]:
        rows = [json.loads(l) for l in open(f"{out}/{fn}-{mode}.jsonl")]
        first = [r["timings_us"]["first_response"] for r in rows]
        restored = [r["timings_us"]["restored"] for r in rows]
        connect = [r["timings_us"]["connect_and_authenticate"] for r in rows]
        r0 = rows[0]
        print(f"{fn:8} {mode:17}: first response p50 {statistics.median(first):6.0f} µs, worst {max(first):6.0f} µs"
              f" | connect+auth p50 {statistics.median(connect):5.0f} µs, restored p50 {statistics.median(restored):6.0f} µs"
              f" | faults {r0['faults']}, pages {r0['pages_copied']} ({r0['bytes_fetched']} B) of {r0['memory_pages']},"
              f" resident {r0['resident_pages']}, prefetched {r0['order_prefetched']}, cache hits {r0['cache_hits']}"
              f" | module compile (once per node) p50"
              f" {statistics.median(r['compile_us_once_per_node'] for r in rows) / 1000:.1f} ms")
    print(f"{fn:8} answer: {rows[0]['output']}")
PY
fi

if has throughput; then
# K child nodes: separate namespaces (not K processes in one) so each node has its own network
# stack, veth and node page cache, as separate machines would; all of them share this
# machine's 2 cores with the parent, which is the point of the measurement. Node 1 is $b;
# node i > 1 is 10.251.i.2, routed to the parent's 10.251.0.1 over its own veth.
nodes=("$b")
for i in 2 3 4; do
  ns=spf-bench-c$i-$$
  extra_ns+=("$ns")
  ip netns add "$ns"
  ip link add "pa$i-$$" type veth peer name "pc$i-$$"
  ip link set "pa$i-$$" netns "$a"; ip link set "pc$i-$$" netns "$ns"
  ip -n "$a" addr add "10.251.$i.1/30" dev "pa$i-$$"; ip -n "$ns" addr add "10.251.$i.2/30" dev "pc$i-$$"
  ip -n "$ns" link set lo up; ip -n "$a" link set "pa$i-$$" up; ip -n "$ns" link set "pc$i-$$" up
  ip -n "$ns" route add 10.251.0.0/30 via "10.251.$i.1"
  nodes+=("$ns")
done
# Thousands of children a second each open a connection to the parent and close it: the
# node's ephemeral ports fill with TIME_WAIT within a run (28k ports, 60 s), and connect()
# then spends its time searching for a free port. A node forking at this rate reuses
# TIME_WAIT ports (safe with TCP timestamps) over the full port range, as configured here.
for ns in "${nodes[@]}"; do
  ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65535"
done
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; } # user, system; the comm field has no spaces here
tp_extra() { # fn mode node-index -> resume flags
  case $2 in
    lazy) ;;
    lazy-ra15) echo --readahead 15 ;;
    eager) echo --eager ;;
    lazy-cached) echo --cache "$out/tp-$1-node$3.cache" ;;
  esac
}
many() { # fn chain node-index children flags... -> one JSON summary
  local fn=$1 chain=$2 j=$3 n=$4; shift 4
  ip netns exec "${nodes[$j]}" "$bin" fork resume "@$out/$fn.desc" --config configs/fork.yaml \
    --chain "$chain" --function "$fn" --body x --children "$n" "$@" 2>>"$out/tp.log"
}
# Warm each node's page cache for lazy-cached with one child (what "a warm node" means).
for f in table1m:table forkrand:rand; do
  fn=${f%%:*} chain=${f##*:}
  for j in 0 1 2 3; do many "$fn" "$chain" "$j" 1 $(tp_extra "$fn" lazy-cached "$j") >/dev/null; done
done
tp_n() { # fn mode -> children per node
  local n=2000
  [ "$1" = table1m ] && { [ "$2" = lazy ] && n=100 || n=400; }
  echo $(( n * ${TP_SCALE_PCT:-100} / 100 > 0 ? n * ${TP_SCALE_PCT:-100} / 100 : 1 ))
}
tp_rounds=$(( rounds < 3 ? rounds : 3 ))
for round in $(seq "$tp_rounds"); do
  for f in table1m:table forkrand:rand; do
    fn=${f%%:*} chain=${f##*:}
    for mode in lazy lazy-ra15 eager lazy-cached; do
      n=$(tp_n "$fn" "$mode")
      for k in 1 2 4; do
        parent=$(cat "$out/$fn.pid")
        read -r pu0 ps0 < <(cpu_ticks "$parent")
        pids=()
        for j in $(seq 0 $((k - 1))); do
          # shellcheck disable=SC2046 # tp_extra's words are flags
          many "$fn" "$chain" "$j" "$n" $(tp_extra "$fn" "$mode" "$j") >"$out/tp-$fn-$mode-$k-$round-$j.json" &
          pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p"; done
        read -r pu1 ps1 < <(cpu_ticks "$parent")
        echo "$fn $mode $k $round $((pu1 - pu0)) $((ps1 - ps0))" >>"$out/tp-parent.txt"
      done
    done
  done
done
# Child memory: 50 children alive at once on one node, against a cold instance.
for f in table1m:table forkrand:rand; do
  fn=${f%%:*} chain=${f##*:}
  for mode in lazy eager; do
    many "$fn" "$chain" 0 50 --hold $(tp_extra "$fn" "$mode" 0) >"$out/mem-$fn-$mode.json"
  done
done

python3 - "$out" "$(getconf CLK_TCK)" "$tp_rounds" <<'PY'
import json, statistics, sys
out, tck, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parent = {}
for line in open(f"{out}/tp-parent.txt"):
    fn, mode, k, r, user, system = line.split()
    parent[(fn, mode, int(k), int(r))] = (int(user) * 1e6 / tck, int(system) * 1e6 / tck)
print(f"throughput: one parent, K child nodes each resuming N children back to back, all at once;"
      f" medians over {rounds} rounds; 2 vCPU shared by all")
for fn in ["table1m", "forkrand"]:
    for mode in ["lazy", "lazy-ra15", "eager", "lazy-cached"]:
        for k in [1, 2, 4]:
            per_round = []
            for r in range(1, rounds + 1):
                rows = [json.load(open(f"{out}/tp-{fn}-{mode}-{k}-{r}-{j}.json")) for j in range(k)]
                total = sum(x["children"] for x in rows)
                span = (max(x["loop_end_unix_us"] for x in rows) - min(x["loop_start_unix_us"] for x in rows)) / 1e6
                child_cpu = sum(x["per_fork"]["cpu_us"] * x["children"] for x in rows)
                child_sys = sum(x["per_fork"]["cpu_sys_us"] * x["children"] for x in rows)
                par_user, par_sys = parent[(fn, mode, k, r)]
                par_cpu = par_user + par_sys
                per_round.append(dict(
                    n=rows[0]["children"], rate=total / span,
                    child=child_cpu / total, parent=par_cpu / total,
                    child_sys=child_sys / max(child_cpu, 1), parent_sys=par_sys / max(par_cpu, 1),
                    busy=(child_cpu + par_cpu) / 1e6 / span,
                    bytes=sum(x["bytes_fetched"] for x in rows) / total,
                    wire=sum(x["per_fork"]["wire_bytes_received"] * x["children"] for x in rows) / total,
                    faults=sum(x["per_fork"]["faults"] * x["children"] for x in rows) / total,
                    p50=statistics.median(x["first_response_us"]["p50"] for x in rows),
                    restored=statistics.median(x["steps_us_p50"]["restored"] for x in rows),
                    connect=statistics.median(x["steps_us_p50"]["connect_and_authenticate"] for x in rows),
                    p99=max(x["first_response_us"]["p99"] for x in rows)))
            m = lambda key: statistics.median(d[key] for d in per_round)
            print(f"{fn:8} {mode:11} K={k} (N={per_round[0]['n']}/node): {m('rate'):6.0f} forks/s"
                  f" (rounds {min(d['rate'] for d in per_round):.0f}-{max(d['rate'] for d in per_round):.0f})"
                  f" | CPU/fork child {m('child'):5.0f} µs ({m('child_sys') * 100:.0f}% sys) + parent {m('parent'):4.0f} µs"
                  f" ({m('parent_sys') * 100:.0f}% sys), busy {m('busy'):.2f} of 2 cores"
                  f" | fetched {m('bytes') / 1024:6.1f} KiB/fork (wire {m('wire') / 1024:6.1f}), faults {m('faults'):5.1f}"
                  f" | first response p50 {m('p50'):5.0f} µs (connect+auth {m('connect'):4.0f}, restored {m('restored'):5.0f}),"
                  f" p99 {m('p99'):6.0f} µs")
print("child memory: 50 children alive at once in one process (after the first), against a cold instance")
for fn in ["table1m", "forkrand"]:
    for mode in ["lazy", "eager"]:
        x = json.load(open(f"{out}/mem-{fn}-{mode}.json"))
        c, h, cold = x["child_memory"], x["child_memory"]["held"], x["cold"]
        print(f"{fn:8} {mode:5}: child linear memory resident {c['resident_pages_per_child']:.0f} pages,"
              f" installed {c['pages_installed_per_child']:.0f}, faults {x['per_fork']['faults']:.0f}; process growth per live child"
              f" Private_Dirty {h['private_dirty_kib_per_child']:.0f} KiB, Rss {h['rss_kib_per_child']:.0f} KiB"
              f" | cold instance: resident {cold['resident_pages']} pages,"
              f" Private_Dirty {cold['private_dirty_kib']} KiB, Rss {cold['rss_kib']} KiB")
PY
fi

if has local; then
echo
echo "local fork (spindle fork local-bench, $rounds interleaved rounds):"
for f in table1m:table forkrand:rand; do
  fn=${f%%:*} chain=${f##*:}
  "$bin" fork local-bench configs/fork.yaml --chain "$chain" --function "$fn" --rounds "$rounds" \
    >"$out/local-$fn.jsonl" 2>"$out/local-$fn.log" || { cat "$out/local-$fn.log"; exit 1; }
  python3 - "$out/local-$fn.jsonl" "$fn" <<'PY'
import json, sys
rows = {r["result"]: r for r in map(json.loads, open(sys.argv[1]))}
f, c = rows["local_fork"], rows["cold_exec"]
fmt = lambda d: f"p50 {d['p50']:7.0f} µs, p99 {d['p99']:7.0f} µs"
print(f"{sys.argv[2]}: zygote up in {rows['zygote']['up_ms']:.0f} ms")
print(f"  local fork first response {fmt(f['first_response_us'])} | clone {fmt(f['syscall_us'])}"
      f" | pid reply {fmt(f['launched_us'])} | ready {fmt(f['ready_us'])}")
print(f"  cold exec  first response {fmt(c['first_response_us'])} | ready {fmt(c['ready_us'])}"
      f" ({c['first_response_us']['p50'] / f['first_response_us']['p50']:.0f}x the fork)")
print(f"  floors: bare fork {fmt(rows['floor_bare_fork']['us'])}; fork+exec /bin/true {fmt(rows['floor_fork_exec_true']['us'])}")
b = rows["burst"]
print(f"  burst of {b['children']}: {b['forks_per_s']:.0f} forks/s, {b['ready_per_s']:.0f} ready/s")
m = rows["memory_kib"]
print(f"  memory KiB (Rss/Pss/Private_Dirty): forked {m['forked']['rss']}/{m['forked']['pss']}/{m['forked']['private_dirty']},"
      f" cold {m['cold']['rss']}/{m['cold']['pss']}/{m['cold']['private_dirty']}")
PY
done
fi
