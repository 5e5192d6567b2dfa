#!/usr/bin/env bash
# BullMQ on this machine's Redis, the figure `sluice bench throughput` is compared with: one
# `queue.add` per job (64 in flight, like the Sluice bench's 64 HTTP clients) and a Worker with
# concurrency 50 whose processor does nothing; prints the add rate and jobs/s end to end (first
# add to last completion). Arguments go to scripts/bench/bullmq/bench.cjs (--jobs 20000,
# --adds-in-flight 64, --concurrency 50, --redis URL, --worker-after-adds, --timeout-secs 600).
# bullmq is installed with npm into a cache outside the repository, once per pinned version: a
# stamp file written after the install records the package.json it was made from.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/bench/bullmq"
dir="${SLUICE_BULLMQ_DIR:-$HOME/.cache/sluice/bullmq}"
want="$(sha256sum "$src/package.json" "$src/package-lock.json" | sha256sum | cut -d' ' -f1)"

installed() {
  [ -f "$dir/.sluice-bullmq" ] && [ "$(cat "$dir/.sluice-bullmq")" = "$want" ] &&
    [ -f "$dir/node_modules/bullmq/package.json" ]
}

if ! installed; then
  mkdir -p "$dir"
  # Two runs at once: one installs, the other waits for it.
  exec 9>"$dir/.lock"
  flock 9
  if ! installed; then
    echo "bench-bullmq: installing $src/package.json into $dir" >&2
    rm -f "$dir/.sluice-bullmq"
    cp "$src/package.json" "$src/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --silent --no-audit --no-fund >&2)
    echo "$want" > "$dir/.sluice-bullmq"
  fi
  exec 9>&-
fi

NODE_PATH="$dir/node_modules" exec node "$src/bench.cjs" "$@"
