#!/usr/bin/env bash
# Installs what building and testing Spindle needs on Debian 12 (run as root or with sudo).
# Idempotent: skips apt entirely when everything is already there.
#   scripts/setup.sh                  build, demo and bench dependencies
#   scripts/setup.sh --with-prometheus  also Prometheus and promtool (the metrics tests)
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(
  clang lld wasi-libc libclang-rt-14-dev-wasm32   # example functions -> wasm32-wasi
  make gcc pkg-config libelf-dev zlib1g-dev       # C parts and -sys crates
  wrk curl                                        # load generator and probe for bench/
  python3                                         # examples/tools/check_abi.py
  python3-venv                                    # scripts/lint-deploy.sh's virtualenv of linters
  iproute2 iputils-ping                           # network namespaces for the fork tests, bench/fork.sh
  cmake                                           # rdma-fork --features rdma: sideway's verbs shim (with clang)
  g++                                             # libFuzzer's runtime (fuzz/, scripts/fuzz.sh)
  dnsmasq-base                                    # a real DNS server for the peers-by-DNS test
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Prometheus server and promtool for the metrics tests, unpacked from Debian's package into
# target/prometheus: no system service is installed or started.
prom=target/prometheus/usr/bin
if [ "${1:-}" = --with-prometheus ] && { [ ! -x "$prom/promtool" ] || [ ! -x "$prom/prometheus" ]; }; then
  echo "setup: unpacking Debian's prometheus package into target/prometheus"
  apt-cache show prometheus >/dev/null 2>&1 || ${sudo:-} apt-get update -qq
  tmp=$(mktemp -d)
  chown _apt "$tmp" 2>/dev/null || true   # apt downloads as its sandbox user
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
  mkdir -p target/prometheus
  dpkg-deb -x "$tmp"/prometheus_*.deb target/prometheus
  rm -rf "$tmp"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust 1.95 or newer (https://rustup.rs)" >&2
  exit 1
fi
