#!/usr/bin/env bash
# N Spindle nodes on one machine, wired the way deploy/kubernetes wires a cluster: each node
# in a network namespace of its own (a pod on hostNetwork of its machine) on one bridge (the
# cluster network), all running the same config (the ConfigMap, configs/cluster.yaml), and a
# name server (the headless Service) answering spindle-peers.spindle.svc.cluster.local with
# every node's address, so the nodes find each other as peers by DNS. Needs root.
#
#   scripts/cluster.sh up [N] [CONFIG]   start N nodes (default 3) on CONFIG (configs/cluster.yaml)
#   scripts/cluster.sh status            where each node is and what it sees
#   scripts/cluster.sh down              stop everything and delete what up made
#
# Then, from this machine:  curl -d 'hello spindle' http://10.210.0.1:8080/hello
#
# Environment: SPINDLE (binary, default target/release/spindle, built when missing),
# CLUSTER_STATE (logs, key and sockets, default target/cluster), CLUSTER_NET (the first three
# octets of the /24, default 10.210.0), CLUSTER_TAG (names, default spc: namespaces spc-1..N),
# CLUSTER_SCALE_OUT=1 (node 1 counts as over its CPU budget and the others never do — they
# all share this machine's CPUs, so real budgets would fill together — to watch node 1 fork
# instances onto its peers under load).
set -euo pipefail
cd "$(dirname "$0")/.."

state=${CLUSTER_STATE:-target/cluster}
net=${CLUSTER_NET:-10.210.0}
tag=${CLUSTER_TAG:-spc}
bridge="${tag}-br0"
dns_ns="${tag}-dns"
dns_ip="$net.253"
host_ip="$net.254"
name=spindle-peers.spindle.svc.cluster.local

die() { echo "cluster: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, a bridge, eBPF)"

node_ns() { echo "${tag}-$1"; }
node_ip() { echo "$net.$1"; }

down() {
  local pidfile ns
  for pidfile in "$state"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  # Gateways drain their requests on SIGTERM; give them a moment before the namespaces go.
  for pidfile in "$state"/*.pid; do
    [ -e "$pidfile" ] || continue
    for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${tag}-([0-9]+|dns)$" || true); do
    ip netns del "$ns"
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$bridge" 2>/dev/null || true
}

status() {
  local ns i
  [ -f "$state/nodes" ] || { echo "no cluster is up (scripts/cluster.sh up)"; return 0; }
  for i in $(seq "$(cat "$state/nodes")"); do
    ns=$(node_ns "$i")
    printf 'node %s  %-14s http://%s:8080  ' "$i" "$ns" "$(node_ip "$i")"
    if curl -fsS --max-time 2 "http://$(node_ip "$i"):8080/readyz" >/dev/null 2>&1; then
      echo "ready, peers: $(curl -fsS --max-time 2 "http://$(node_ip "$i"):8080/metrics" \
        | sed -n 's/^spindle_peer_address_info{.*http="\([^"]*\)".*peer="\([^"]*\)".*/\2=\1/p' \
        | tr '\n' ' ')"
    else
      echo "not answering (log: $state/node-$i.log)"
    fi
  done
}

veth_to_bridge() { # NS DEV-IN-NS ADDRESS HOST-END
  ip link add "$4" type veth peer name "$2" netns "$1"
  ip link set "$4" master "$bridge" up
  ip -n "$1" addr add "$3/24" dev "$2"
  ip -n "$1" link set "$2" up
  ip -n "$1" link set lo up
}

up() {
  local nodes=${1:-3} config=${2:-configs/cluster.yaml} spindle=${SPINDLE:-target/release/spindle}
  [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] \
    || die "N must be 1..200, got $nodes"
  [ -f "$config" ] || die "no config $config"
  if [ ! -x "$spindle" ]; then
    echo "cluster: building $spindle"
    cargo build --release --locked -p gateway
  fi
  make -s -C examples
  command -v dnsmasq >/dev/null || die "needs dnsmasq (scripts/setup.sh installs dnsmasq-base)"
  "$spindle" validate "$config" >/dev/null || "$spindle" validate "$config"
  if ip link show "$bridge" >/dev/null 2>&1; then
    die "a cluster is already up ($bridge exists): scripts/cluster.sh down first"
  fi
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  trap 'echo "cluster: start-up failed; cleaning up" >&2; down' ERR

  ip link add "$bridge" type bridge
  ip addr add "$host_ip/24" dev "$bridge"
  ip link set "$bridge" up

  # The cluster key every node shares (a Secret in Kubernetes).
  head -c 48 /dev/urandom | base64 > "$state/cluster.key"
  chmod 600 "$state/cluster.key"

  # The name server: every node's address under one name, like a headless Service.
  ip netns add "$dns_ns"
  veth_to_bridge "$dns_ns" eth0 "$dns_ip" "${tag}-dnsh"
  : > "$state/peers.hosts"
  local i
  for i in $(seq "$nodes"); do echo "$(node_ip "$i") $name" >> "$state/peers.hosts"; done
  ip netns exec "$dns_ns" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv \
    --no-hosts --bind-interfaces --listen-address="$dns_ip" --addn-hosts="$state/peers.hosts" \
    --user=root --group=root --pid-file= --local-ttl=1 > "$state/dns.log" 2>&1 &
  echo $! > "$state/dns.pid"

  for i in $(seq "$nodes"); do
    local ns ip
    ns=$(node_ns "$i")
    ip=$(node_ip "$i")
    ip netns add "$ns"
    veth_to_bridge "$ns" eth0 "$ip" "${tag}-n$i"
    ip -n "$ns" route add default via "$host_ip"
    mkdir -p "/etc/netns/$ns"
    echo "nameserver $dns_ip" > "/etc/netns/$ns/resolv.conf"
    local extra=()
    if [ -n "${CLUSTER_SCALE_OUT:-}" ]; then
      if [ "$i" -eq 1 ]; then extra=(--cpu-budget 0%); else extra=(--cpu-budget 100%); fi
    fi
    # The DaemonSet's flags: this node's own addresses for its peers and its page server.
    ip netns exec "$ns" "$spindle" run "$config" "${extra[@]}" \
      --node-name "node-$i" \
      --cluster-key "$state/cluster.key" \
      --peer-listen "$ip:7070" \
      --serve-images "$ip:7071" \
      --admin "$state/node-$i.sock" \
      > "$state/node-$i.log" 2>&1 &
    echo $! > "$state/node-$i.pid"
  done
  echo "$nodes" > "$state/nodes"

  for i in $(seq "$nodes"); do
    local waited=0
    until curl -fsS --max-time 1 "http://$(node_ip "$i"):8080/readyz" >/dev/null 2>&1; do
      kill -0 "$(cat "$state/node-$i.pid")" 2>/dev/null \
        || { tail -n 20 "$state/node-$i.log" >&2; die "node $i exited"; }
      waited=$((waited + 1))
      [ "$waited" -le 600 ] || { tail -n 20 "$state/node-$i.log" >&2; die "node $i not ready in 60 s"; }
      sleep 0.1
    done
  done
  trap - ERR
  echo "cluster: $nodes node(s) up; each found the others by DNS ($name)"
  status
  cat <<EOF

Try:
  curl -d 'hello spindle' http://$(node_ip 1):8080/hello
  curl -s http://$(node_ip 1):8080/metrics | grep spindle_peer_address_info
  # started with CLUSTER_SCALE_OUT=1: load node 1, and it forks instances onto its peers
  wrk -t2 -c32 -d10s 'http://$(node_ip 1):8080/sleepy'
  curl -s http://$(node_ip 1):8080/metrics | grep 'spindle_requests_forwarded_total.*ok'
  scripts/cluster.sh down
EOF
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down; rm -f "$state/nodes"; echo "cluster: down" ;;
  status) status ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
