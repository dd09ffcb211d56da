#!/usr/bin/env bash
# Runs every test: the example functions natively (ASan/UBSan), then the Rust workspace
# (unit tests and the integration tests that start the real spindle binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C examples all native-test
cargo test --workspace --locked "$@"
