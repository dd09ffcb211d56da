#!/usr/bin/env bash
# Installs what building and testing Spindle needs on Debian 12 (run as root or with sudo).
# Idempotent: skips apt entirely when everything is already there.
set -euo pipefail

packages=(
  clang lld wasi-libc libclang-rt-14-dev-wasm32   # example functions -> wasm32-wasi
  make gcc pkg-config libelf-dev zlib1g-dev       # C parts and -sys crates
  wrk curl                                        # load generator and probe for bench/
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust 1.95 or newer (https://rustup.rs)" >&2
  exit 1
fi
