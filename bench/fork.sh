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
#   bench/fork.sh [ROUNDS]     (default 7; needs root for the namespaces and userfaultfd)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
[ "$(id -u)" -eq 0 ] || { echo "bench/fork.sh needs root (network namespaces, userfaultfd)" >&2; exit 1; }
scripts/setup.sh >/dev/null
make -s -C examples
cargo build --release --locked -p gateway
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/spindle

a=spf-bench-a-$$ b=spf-bench-b-$$
out=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
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
