#!/usr/bin/env bash
# CI's benchmark guard: a short throughput run (RabbitMQ lanes, admission on) beside the durable
# floor measured in the same run; fails when Sluice falls below a share of the floor. A ratio of
# two figures taken one after the other on this machine, never an absolute time.
#
# The threshold comes from docs/PERFORMANCE.md's measurements, with room for a noisy machine.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_RATIO="${SLUICE_BENCH_MIN_RATIO:-0.25}"
JOBS="${SLUICE_BENCH_GUARD_JOBS:-4000}"

cargo build --release --quiet --bin sluice-bench
target="${CARGO_TARGET_DIR:-target}"
"$target/release/sluice-bench" --config /dev/null throughput \
  --jobs "$JOBS" --clients 64 --backends rabbitmq --admission on \
  --min-floor-ratio "$MIN_RATIO" --timeout-secs 120
