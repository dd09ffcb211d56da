#!/usr/bin/env bash
# The main demo: install dependencies, build, and serve configs/hello.yaml on 127.0.0.1:8080.
# Then, from another shell:   curl -d 'hello spindle' http://127.0.0.1:8080/hello
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C examples
cargo build --release --locked -p gateway
echo
echo "Try:  curl -d 'hello spindle' http://127.0.0.1:8080/hello"
echo "      curl http://127.0.0.1:8080/metrics"
echo
exec target/release/spindle run "${1:-configs/hello.yaml}"
