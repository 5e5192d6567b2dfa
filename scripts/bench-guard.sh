#!/usr/bin/env bash
# CI's benchmark guard: a short throughput run (RabbitMQ lanes, admission on) beside the durable
# floor measured in the same run; fails when Sluice falls below a share of the floor. A ratio of
# two figures taken one after the other on this machine, never an absolute time.
#
# The threshold comes from the ratios docs/PERFORMANCE.md records, with room for a noisy machine;
# a run below it is tried once more, so a passing burst of noise is not a failure but a slower
# hot path, below it both times, is.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_RATIO="${BENCH_GUARD_MIN_RATIO:-0.19}"
JOBS="${BENCH_GUARD_JOBS:-6000}"
# A release build of its own (CI keeps it outside the clone, like the debug one). The settings
# are not named SLUICE_*: those are Sluice's configuration, which refuses names it does not know.
export CARGO_TARGET_DIR="${BENCH_TARGET_DIR:-${CARGO_TARGET_DIR:-target}}"

cargo build --release --quiet -p sluice -p sluice-bench
for attempt in 1 2; do
  if SLUICE_LOG="${SLUICE_LOG:-warn}" "$CARGO_TARGET_DIR/release/sluice-bench" --config /dev/null \
    throughput --jobs "$JOBS" --clients 64 --backends rabbitmq --admission on \
    --min-floor-ratio "$MIN_RATIO" --timeout-secs 120; then
    exit 0
  fi
  echo "bench-guard: attempt $attempt below ${MIN_RATIO}x of the durable floor (or failed)" >&2
done
echo "bench-guard: FAILED: Sluice stayed below ${MIN_RATIO}x of the durable floor twice" >&2
exit 1
