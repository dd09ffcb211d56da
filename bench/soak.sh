#!/usr/bin/env bash
# Soak + chaos, the long version of gateway/tests/chaos.rs (CI runs each phase for 30 s at
# 30% of the throughput it measures first): configs/hello.yaml's chain and the boutique
# chain under a paced load at PERCENT% of that throughput, on both dataplanes: SECONDS of
# the load alone (the soak: every request must be answered 200 and no process of the
# gateway's tree may grow its RSS more than 5% after warm-up), then SECONDS more while a
# random worker is SIGKILLed every 2 s and one is SIGSTOPped past its chain's deadline (the
# chaos: only the killed workers' requests fail (502), only the stopped one's time out (504),
# no request gets 503, every restart is counted). After each phase both arenas must be full
# again and the gateway must hold the fds it held before. It prints the measured
# throughput, the soak rate, the answers by status and every process's RSS.
#
#   bench/soak.sh [SECONDS] [PERCENT]     (default 600 s at 80%)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
percent=${2:-80}
make -s -C examples
for dataplane in userspace sockmap; do
  echo "== $dataplane dataplane: ${seconds} s at ${percent}%"
  SPINDLE_TEST_DATAPLANE=$dataplane SPINDLE_SOAK_SECONDS=$seconds SPINDLE_SOAK_RATE_PERCENT=$percent \
    cargo test --release --locked -p gateway --test chaos -- --nocapture 2>&1 |
    grep -E '^(max|soak answers|chaos answers)|test result|panicked|not back|grew'
done
