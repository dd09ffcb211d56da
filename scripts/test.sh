#!/usr/bin/env bash
# Runs every test: the example functions natively (ASan/UBSan), the Rust workspace (unit tests
# and integration tests that start the real spindle binary, userspace dataplane), then the
# gateway's integration tests again on the eBPF sk_msg dataplane.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-prometheus
make -s -C examples all native-test
cargo test --workspace --locked "$@"
if [ "$(id -u)" -eq 0 ]; then
  echo "== gateway integration tests again, kernel (sockmap) dataplane"
  SPINDLE_TEST_DATAPLANE=sockmap cargo test --locked -p gateway --tests "$@"
else
  echo "SKIPPED: the sockmap pass of the integration tests needs root (eBPF); ran userspace only"
fi
