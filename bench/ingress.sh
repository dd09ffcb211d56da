#!/usr/bin/env bash
# What the eBPF ingress programs (`ingress:` in the config, crate xdp-bpf) cost and save, in
# one run with interleaved rounds (every variant once per round, in a fixed order, then the
# next round), against configs/hello.yaml's chain:
#   1. topologies: loopback (client and gateway in one namespace), direct veth (client ns <->
#      gateway ns), routed (client ns -> node ns, ip_forward=1 -> gateway ns) and routed with
#      `ingress.fast_path` on the node's two veths; each at a fixed offered rate and at
#      saturation (closed loop), with the node's ForwDatagrams and the fast path's
#      `redirected` counter over the run;
#   2. guard cost: no flood, a UDP flood, a SYN flood from one source and a SYN flood from a
#      spoofed /18, all from the client namespace at the gateway's veth (spindle-flood,
#      bench/src/bin/spindle-flood.rs),
#      with the guard off, on TC ingress, on native XDP (strict) and on TC with a limit over
#      all sources (syn_rate_all), while `spindle bench`
#      sends legitimate requests at a modest fixed rate: floods/s refused, whole-system CPU
#      per flood packet, legitimate p50/p99 with and without the flood, and the guard's
#      counters checked against the packets sent;
#   3. steering: one shard (the default), and http.shards: 2 on loopback at saturation with
#      ingress.steering reuseport, incoming_cpu, cpu and source_hash.
# Every cell is a fresh `spindle run` in the gateway namespace. Writes OUT.json (every cell
# of every round, and the summary) and OUT.md (the tables).
#
#   bench/ingress.sh [ROUNDS] [OUT]     (defaults: 3 rounds, docs/bench/ingress-DATE)
#
# Environment (defaults in brackets): DURATION [10] and WARMUP [2], seconds per cell;
# FIXED_RATE [10000] requests/s for the topologies' fixed-rate cells; LEGIT_RATE [1000]
# requests/s of legitimate load during floods; FLOOD_PPS [0: as fast as possible];
# CONNECTIONS [32]; PARTS [topology,guard,steering]; FLOODS [none,udp,syn,syn_spoofed]
# (the guard part's; CPU per flood packet needs `none`); SKIP_BUILD=1 to use the binaries
# as built; KEEP_WORK=1 keeps the raw cells. Needs root (namespaces, raw sockets, eBPF).
# One round takes about 6 minutes at the defaults. Run it on an otherwise idle machine: the
# report records the load average and the machine's busy time with nothing of its running,
# and warns when that was over a quarter of the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "bench/ingress.sh: $*" >&2; exit 2; }
rounds=${1:-3}
out=${2:-docs/bench/ingress-$(date +%F)}
out=${out%.md}
out=${out%.json}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive whole number, not '$rounds'"
int() { [[ ${!1} =~ ^[0-9]+$ ]] || die "$1 must be a whole number, not '${!1}'"; }
DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} FIXED_RATE=${FIXED_RATE:-10000}
LEGIT_RATE=${LEGIT_RATE:-1000} FLOOD_PPS=${FLOOD_PPS:-0} CONNECTIONS=${CONNECTIONS:-32}
PARTS=${PARTS:-topology,guard,steering} FLOODS=${FLOODS:-none,udp,syn,syn_spoofed}
for v in DURATION WARMUP FIXED_RATE LEGIT_RATE FLOOD_PPS CONNECTIONS; do int "$v"; done
((DURATION > 0)) || die "DURATION must be at least 1"
((FIXED_RATE > 0 && LEGIT_RATE > 0 && CONNECTIONS > 0)) ||
  die "FIXED_RATE, LEGIT_RATE and CONNECTIONS must be at least 1"
for part in ${PARTS//,/ }; do
  [[ $part =~ ^(topology|guard|steering)$ ]] ||
    die "PARTS: unknown part '$part' (topology, guard, steering)"
done
for f in ${FLOODS//,/ }; do
  [[ $f =~ ^(none|udp|syn|syn_spoofed)$ ]] ||
    die "FLOODS: unknown flood '$f' (none, udp, syn, syn_spoofed)"
done
[[ $(id -u) == 0 ]] || die "needs root: network namespaces, raw sockets and eBPF"
for tool in ip curl python3; do
  command -v "$tool" >/dev/null || die "needs $tool (scripts/setup.sh)"
done
mkdir -p "$(dirname "$out")"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  make -s -C examples
  cargo build --release --locked -p gateway -p spindle-bench --bin spindle --bin spindle-flood
fi
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
spindle=$bin/spindle
flood=$bin/spindle-flood
[[ -x $spindle && -x $flood ]] || die "no $spindle or $flood: build first, or unset SKIP_BUILD"

# --- namespaces and addresses (RFC 2544's benchmarking range, only inside our namespaces) --
id=$$
CLI=ingc-$id NODE=ingn-$id GW=ingg-$id
port=18080
gw_direct=198.18.1.2 gw_routed=198.18.3.2
spoof_one=198.18.100.1 spoof_net=198.18.64.0/18   # routed back to the client ns, dropped there
work=$(mktemp -d /tmp/spindle-ingress.XXXXXX)
gw_pid=
bg_pids=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${bg_pids[@]}" $gw_pid; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${bg_pids[@]}" $gw_pid; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for ns in "$CLI" "$NODE" "$GW"; do
    # Whatever still runs in our namespaces is what our gateway started.
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "raw cells kept in $work" >&2; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in "$CLI" "$NODE" "$GW"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
    net.ipv4.ip_forward=0
done
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
link() { # NS_A DEV_A ADDR_A NS_B DEV_B ADDR_B
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2"
  ip -n "$4" addr add "$6" dev "$5"
  ip -n "$1" link set "$2" up
  ip -n "$4" link set "$5" up
}
link "$CLI" vcd 198.18.1.1/24 "$GW" vgd "$gw_direct/24"        # direct
link "$CLI" vcr 198.18.2.1/24 "$NODE" vnc 198.18.2.254/24      # routed: client - node
link "$NODE" vng 198.18.3.254/24 "$GW" vgr "$gw_routed/24"     #         node - gateway
ip -n "$CLI" route add 198.18.3.0/24 via 198.18.2.254
ip -n "$GW" route add 198.18.2.0/24 via 198.18.3.254
ip -n "$GW" route add "$spoof_net" via 198.18.1.1
for ns in "$CLI" "$NODE" "$GW"; do
  for dev in $(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip netns exec "$ns" sysctl -qw "net.ipv4.conf.$dev.rp_filter=0"
  done
done
# Both paths answer before anything is measured (and the node's neighbours are resolved).
ip netns exec "$CLI" ping -q -c 1 -W 2 "$gw_direct" >/dev/null
ip netns exec "$CLI" ping -q -c 1 -W 2 "$gw_routed" >/dev/null

# --- configs: configs/hello.yaml's chain, modules by absolute path, plus the cell's head ----
config() { # FILE HEAD
  { printf '%s\n' "$2"; sed -e '/^listen:/d' -e '/^#/d' -e "s|module: \.\./|module: $repo/|" configs/hello.yaml; } >"$1"
}
head_fast="ingress:
  fast_path:
    interfaces: [vnc, vng]
    netns: /run/netns/$NODE"
head_guard() { printf 'ingress:\n  guard:\n    interface: vgd\n    hook: %s\n    mode: strict\n' "$1"; }
# The same, with a limit over all sources' new connections too (what holds a spoofed flood).
head_guard_all="$(head_guard tc)
    syn_rate_all: 2000
    syn_burst_all: 2000"
head_steer() { printf 'http: { shards: 2 }\ningress:\n  steering: %s\n' "$1"; }

# --- one cell -------------------------------------------------------------------------------
start_gateway() { # CONFIG LOG
  ip netns exec "$GW" "$spindle" run "$1" --listen "0.0.0.0:$port" >"$2" 2>&1 &
  gw_pid=$!
  for _ in $(seq 600); do
    if ! kill -0 "$gw_pid" 2>/dev/null; then
      wait "$gw_pid" || true
      gw_pid=
      return 1
    fi
    ip netns exec "$GW" curl -sf -m 1 "http://127.0.0.1:$port/readyz" >/dev/null && return 0
    sleep 0.1
  done
  return 1
}
stop_gateway() {
  [[ -n $gw_pid ]] || return 0
  kill -TERM "$gw_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$gw_pid" 2>/dev/null || true
  wait "$gw_pid" 2>/dev/null || true
  gw_pid=
  for _ in $(seq 50); do [[ -z $(ip netns pids "$GW") ]] && return 0; sleep 0.1; done
  echo "bench/ingress.sh: processes of the gateway outlived it: $(ip netns pids "$GW" | xargs)" >&2
  for p in $(ip netns pids "$GW"); do kill -KILL "$p" 2>/dev/null || true; done
}
snap() { # DIR TAG: everything the report takes deltas of
  local d=$1 t=$2
  date +%s.%N >"$d/time.$t"
  cat /proc/stat >"$d/stat.$t"
  cat /proc/net/softnet_stat >"$d/softnet.$t"
  ip netns exec "$NODE" cat /proc/net/snmp >"$d/node_snmp.$t"
  ip netns exec "$GW" cat /proc/net/snmp /proc/net/netstat >"$d/gw_snmp.$t"
  ip -n "$GW" -s -j link show >"$d/gw_links.$t"
  ip -n "$CLI" -s -j link show >"$d/cli_links.$t"
  ip netns exec "$GW" curl -s -m 5 "http://127.0.0.1:$port/metrics" >"$d/metrics.$t" || true
}
bench() { # NS URL DIR ARGS...: one spindle bench round, JSON into DIR
  local ns=$1 url=$2 d=$3
  shift 3
  ip netns exec "$ns" "$spindle" bench --targets "$url" --rounds 1 --duration "${DURATION}s" \
    --warmup "${WARMUP}s" --json "$d/bench.json" "$@" >"$d/bench.out" 2>&1
}

failures=0
cell() { # ROUND PART VARIANT LOAD FLOOD HEAD
  local round=$1 part=$2 variant=$3 load=$4 flood_kind=$5 head=$6
  local name="$part-$variant${load:+-$load}${flood_kind:+-$flood_kind}"
  local d="$work/cells/r$round-$name"
  mkdir -p "$d"
  printf 'round=%s\npart=%s\nvariant=%s\nload=%s\nflood=%s\n' "$round" "$part" "$variant" \
    "$load" "$flood_kind" >"$d/meta"
  config "$d/config.yaml" "$head"
  printf '[round %s] %-40s ' "$round" "$name"
  local began=$SECONDS
  if ! start_gateway "$d/config.yaml" "$d/gateway.log"; then
    stop_gateway
    printf 'status=failed\nreason=%s\n' \
      "gateway did not become ready: $(grep -m1 -iE 'error|refus' "$d/gateway.log" || tail -1 "$d/gateway.log")" >>"$d/meta"
    failures=$((failures + 1))
    echo "FAILED: $(sed -n 's/^reason=//p' "$d/meta")"
    return 0
  fi
  local ok=1
  case $part in
    topology | steering)
      local ns=$CLI url
      case $variant in
        loopback | one_shard | reuseport | incoming_cpu | cpu | source_hash) ns=$GW url=http://127.0.0.1:$port/hello ;;
        direct) url=http://$gw_direct:$port/hello ;;
        routed | routed_fast) url=http://$gw_routed:$port/hello ;;
      esac
      local rate=()
      [[ $load == fixed ]] && rate=(--rate "$FIXED_RATE")
      snap "$d" before
      bench "$ns" "$url" "$d" --connections "$CONNECTIONS" "${rate[@]}" || ok=0
      snap "$d" after
      ;;
    guard)
      # The legitimate load runs through warm-up and window; the flood (or, without one, a
      # sleep as long) covers both, bracketed by the snapshots the CPU figures come from.
      local span=$((WARMUP + DURATION + 1))
      bench "$CLI" "http://$gw_direct:$port/hello" "$d" --connections 16 --rate "$LEGIT_RATE" \
        --idle-baseline 0s &
      local bench_pid=$!
      bg_pids+=("$bench_pid")
      snap "$d" before
      local args=()
      case $flood_kind in
        none) sleep "$span" ;;
        udp) args=(--kind udp --target "$gw_direct:9") ;;
        syn) args=(--kind syn --target "$gw_direct:$port" --source "$spoof_one") ;;
        syn_spoofed) args=(--kind syn --target "$gw_direct:$port" --source "$spoof_net") ;;
      esac
      if ((${#args[@]})); then
        ip netns exec "$CLI" "$flood" "${args[@]}" --pps "$FLOOD_PPS" --duration "${span}s" \
          >"$d/flood.json" 2>"$d/flood.err" || ok=0
      fi
      snap "$d" after
      wait "$bench_pid" || ok=0
      bg_pids=()
      ;;
  esac
  stop_gateway
  if ((ok)); then
    echo "status=ok" >>"$d/meta"
    echo "ok ($((SECONDS - began)) s)"
  else
    printf 'status=failed\nreason=%s\n' "$(tail -3 "$d/bench.out" "$d/flood.err" 2>/dev/null | tr '\n' ' ')" >>"$d/meta"
    failures=$((failures + 1))
    echo "FAILED: $(sed -n 's/^reason=//p' "$d/meta")"
  fi
}

has() { [[ ,$PARTS, == *,$1,* ]]; }
idle() { # NAME: the machine's busy CPU over 3 s with nothing of ours running
  date +%s.%N >"$work/idle-$1.time.before"
  cat /proc/stat >"$work/idle-$1.before"
  sleep 3
  cat /proc/stat >"$work/idle-$1.after"
  date +%s.%N >"$work/idle-$1.time.after"
}
uptime >"$work/load.before"
idle before
for round in $(seq "$rounds"); do
  if has topology; then
    for load in fixed saturation; do
      cell "$round" topology loopback "$load" "" ""
      cell "$round" topology direct "$load" "" ""
      cell "$round" topology routed "$load" "" ""
      cell "$round" topology routed_fast "$load" "" "$head_fast"
    done
  fi
  if has guard; then
    for flood_kind in ${FLOODS//,/ }; do
      cell "$round" guard off "" "$flood_kind" ""
      cell "$round" guard tc "" "$flood_kind" "$(head_guard tc)"
      cell "$round" guard xdp "" "$flood_kind" "$(head_guard xdp)"
      cell "$round" guard tc_all "" "$flood_kind" "$head_guard_all"
    done
  fi
  if has steering; then
    # One shard (the default) against two under each steering mode.
    cell "$round" steering one_shard saturation "" ""
    for mode in reuseport incoming_cpu cpu source_hash; do
      cell "$round" steering "$mode" saturation "" "$(head_steer "$mode")"
    done
  fi
done
uptime >"$work/load.after"
idle after

python3 bench/ingress_report.py "$work" "$out" --rounds "$rounds" --duration "$DURATION" \
  --warmup "$WARMUP" --fixed-rate "$FIXED_RATE" --legit-rate "$LEGIT_RATE" \
  --flood-pps "$FLOOD_PPS" --connections "$CONNECTIONS" --spindle "$spindle"
echo "wrote $out.md and $out.json"
((failures == 0)) || { echo "bench/ingress.sh: $failures cell(s) failed (see $out.md)" >&2; exit 1; }
