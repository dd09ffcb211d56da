#!/usr/bin/env bash
# Live fuzzing with libFuzzer through cargo-fuzz (docs/fuzzing.md).
#
#   scripts/fuzz.sh                 every target, 300 s each
#   scripts/fuzz.sh TARGET [SECONDS]  one target (`scripts/fuzz.sh --list` names them)
#   scripts/fuzz.sh --ci            the cheap pass scripts/test.sh runs: only the targets that
#                                   do not link wasmer, fixed seed, 5 s each (FUZZ_CI_SECONDS),
#                                   no sanitizer, no cargo-fuzz needed
#
# A campaign keeps what it learns in target/fuzz/corpus/TARGET (not committed), seeded from
# the committed fuzz/corpus/TARGET. Every crash, timeout or out-of-memory input it finds is
# copied into fuzz/corpus/TARGET as a regression input and named at the end: commit it with
# the fix, and the target's replay test (an ordinary `cargo test`) keeps it fixed.
#
# Builds are release with debug assertions and no sanitizer, on stable Rust. FUZZ_SANITIZER=address
# builds with AddressSanitizer instead (needs nightly flags: RUSTC_BOOTSTRAP=1 is set for it).
# FUZZ_TARGET_DIR overrides where builds go (default target/fuzz). cargo-fuzz is installed into
# target/fuzz/tools when it is not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

# Targets that do not link wasmer: cheap to build, fuzzed live in CI.
CHEAP=(descriptor_arena config_bytes config_yaml local_wire page_frames image_meta page_server peers_wire)
# Targets that link wasmer (chain-runtime, gateway): an instrumented release build of wasmer and
# Cranelift takes longer than CI has, so CI only replays their corpora.
HEAVY=(descriptor_worker router wasi_guest)
CARGO_FUZZ_VERSION=0.13.2
# An input running longer than this is a hang (the replay tests use the same limit).
HANG_SECONDS=20
# What cargo-fuzz $CARGO_FUZZ_VERSION passes rustc with `--sanitizer none` (from its
# `cargo build` invocation): libFuzzer's coverage instrumentation, `--cfg fuzzing`, debug
# assertions. Only the --ci build uses it directly.
SANCOV_RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Ccodegen-units=1"

target_dir=${FUZZ_TARGET_DIR:-$repo/target/fuzz}
sanitizer=${FUZZ_SANITIZER:-none}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
[ "$sanitizer" = none ] || export RUSTC_BOOTSTRAP=1

is_heavy() {
  local t
  for t in "${HEAVY[@]}"; do [ "$t" = "$1" ] && return 0; done
  return 1
}

ensure_cargo_fuzz() {
  if command -v cargo-fuzz >/dev/null && cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    return
  fi
  local root=$target_dir/tools
  export PATH=$root/bin:$PATH
  if [ -x "$root/bin/cargo-fuzz" ]; then
    return
  fi
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $root"
  local started=$SECONDS
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION" \
    --root "$root" --target-dir "$target_dir/tools-build"
  echo "fuzz: cargo-fuzz installed in $((SECONDS - started)) s"
}

# cargo fuzz build|run with this script's options; runs in fuzz/.
cargo_fuzz() {
  local cmd=$1 target=$2
  shift 2
  local features=()
  if [ -z "$target" ] || is_heavy "$target"; then
    features=(--features wasmer)
  fi
  (cd "$repo/fuzz" && cargo fuzz "$cmd" --sanitizer "$sanitizer" --target-dir "$target_dir" \
    "${features[@]}" ${target:+"$target"} "$@")
}

# Runs one target for `seconds`; copies what it found into the committed corpus. Returns 1
# if it found anything.
campaign() {
  local target=$1 seconds=$2
  shift 2
  local work=$target_dir/corpus/$target artifacts=$target_dir/artifacts/$target
  mkdir -p "$work" "$artifacts"
  local log=$target_dir/logs/$target.log
  mkdir -p "$(dirname "$log")"
  echo "== fuzz $target for ${seconds} s"
  local status=0
  # -fork would survive crashes but splits the time budget across processes; one process
  # stops at the first finding, which is what a regression input needs.
  # New inputs go to the first corpus directory only: the committed one is read.
  local corpora=("$work" "$repo/fuzz/corpus/$target")
  local args=(-max_total_time="$seconds" -timeout="$HANG_SECONDS" -rss_limit_mb=4096
    -artifact_prefix="$artifacts/" -print_final_stats=1 "$@")
  if [ -n "${prebuilt:-}" ]; then
    # Built already (--ci): run the binary itself, without a cargo invocation per target.
    "$prebuilt/$target" "${args[@]}" "${corpora[@]}" >"$log" 2>&1 || status=$?
  else
    # Built first, in view: a wasmer-linking target's first build takes many minutes.
    cargo_fuzz build "$target"
    cargo_fuzz run "$target" "${corpora[@]}" -- "${args[@]}" >"$log" 2>&1 || status=$?
  fi
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done ' "$log" |
    sed 's/^/   /' || true
  local found=0 f
  for f in "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-*; do
    [ -e "$f" ] || continue
    found=1
    local dest=$repo/fuzz/corpus/$target/$(basename "$f")
    cp "$f" "$dest"
    rm -f "$f"
    echo "   FOUND: $(basename "$f") -> ${dest#"$repo"/}"
    local flag=""
    if is_heavy "$target"; then flag=" --features wasmer"; fi
    echo "   reproduce: (cd fuzz && cargo fuzz run --sanitizer $sanitizer$flag $target ${dest#"$repo"/fuzz/})"
    grep -m1 -A1 -E "panicked at|ERROR: libFuzzer" "$log" | sed "s/^/   /" || true
  done
  if [ "$status" -ne 0 ] && [ "$found" -eq 0 ]; then
    echo "   the fuzzer failed without an artifact (exit $status); its log: $log" >&2
    tail -20 "$log" >&2
    return 1
  fi
  return "$found"
}

case "${1:-}" in
--list)
  printf '%s\n' "${CHEAP[@]}" "${HEAVY[@]}"
  exit 0
  ;;
--ci)
  # CI: build the cheap targets (one cargo build) and fuzz each briefly with a fixed seed.
  # scripts/test.sh runs this. It builds with plain cargo and the flags cargo-fuzz
  # $CARGO_FUZZ_VERSION uses (SANCOV_RUSTFLAGS, same output directory), so a fresh machine does
  # not spend most of its budget installing cargo-fuzz; campaigns then reuse that build.
  # Measured on a fresh 2-core machine: docs/fuzzing.md.
  per_target=${FUZZ_CI_SECONDS:-5}
  started=$SECONDS
  host=$(rustc -vV | sed -n 's/^host: //p')
  echo "== fuzz: building the targets that do not link wasmer"
  RUSTFLAGS="$SANCOV_RUSTFLAGS" cargo build --locked --quiet --manifest-path "$repo/fuzz/Cargo.toml" \
    --target "$host" --release --config 'profile.release.debug="line-tables-only"' --bins \
    --target-dir "$target_dir"
  echo "== fuzz: built in $((SECONDS - started)) s"
  prebuilt=$target_dir/$host/release
  failed=()
  for t in "${CHEAP[@]}"; do
    campaign "$t" "$per_target" -seed=1 || failed+=("$t")
  done
  echo "== fuzz: CI pass took $((SECONDS - started)) s"
  if ((${#failed[@]})); then
    echo "FAILED: fuzzing found inputs that break: ${failed[*]} (copied into fuzz/corpus/, see above)" >&2
    exit 1
  fi
  exit 0
  ;;
-h | --help)
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
  ;;
esac

targets=("${1:-all}")
seconds=${2:-300}
if [ "${targets[0]}" = all ]; then
  targets=("${CHEAP[@]}" "${HEAVY[@]}")
elif ! printf '%s\n' "${CHEAP[@]}" "${HEAVY[@]}" | grep -qx "${targets[0]}"; then
  echo "fuzz: unknown target ${targets[0]}; targets: ${CHEAP[*]} ${HEAVY[*]}" >&2
  exit 2
fi
ensure_cargo_fuzz
found=()
for t in "${targets[@]}"; do
  campaign "$t" "$seconds" || found+=("$t")
done
if ((${#found[@]})); then
  echo "== fuzz: found breaking inputs in: ${found[*]}; they are in fuzz/corpus/<target>/ now." \
    "Fix the code, then commit them: the replay tests keep them fixed."
  exit 1
fi
echo "== fuzz: nothing found in ${targets[*]}"
