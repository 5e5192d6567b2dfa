#!/usr/bin/env bash
# BullMQ on this machine's Redis, the figure `sluice bench throughput` is compared with: one
# `queue.add` per job (64 in flight, like the Sluice bench's 64 HTTP clients) and a Worker with
# concurrency 50 whose processor does nothing; prints the add rate and jobs/s end to end (first
# add to last completion). Arguments go to scripts/bench/bullmq/bench.cjs (--jobs 20000,
# --adds-in-flight 64, --concurrency 50, --redis URL, --worker-after-adds, --timeout-secs 600,
# --worker-processes 0 (N runs the Worker in N processes of its own), --provider URL).
# bullmq is installed with npm into a cache outside the repository, once per pinned version: a
# stamp file written after the install records the package.json it was made from.
#
# --appendfsync always|everysec runs BullMQ on a Redis of its own instead (redis-server on a free
# port, an empty directory, the append-only file on with that fsync policy; stopped and removed
# afterwards): `always` is the durability of Sluice's `202`, every add on disk before it answers.
#
# --simulator makes each BullMQ job what a Sluice job is: the processor POSTs the job's chat
# completion to `sluice sim` (started here on a free port with no rate limit, as the throughput
# bench's simulator; stopped afterwards) and keeps the answer as the job's result. The sluice
# binary is $BENCH_SLUICE_BIN, or `sluice` on PATH (not a SLUICE_* name: Sluice reads those as
# its configuration). --provider URL points the processor at another endpoint instead.
set -euo pipefail

appendfsync=""
simulator=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --simulator) simulator=1; shift ;;
    --appendfsync)
      [ $# -ge 2 ] || { echo "bench-bullmq: --appendfsync needs always or everysec" >&2; exit 2; }
      case "$2" in
        always | everysec) appendfsync="$2" ;;
        *) echo "bench-bullmq: --appendfsync is always or everysec, not '$2'" >&2; exit 2 ;;
      esac
      shift 2
      ;;
    *) args+=("$1"); shift ;;
  esac
done

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

cleanups=()
cleanup() {
  local i
  for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[$i]}" || true; done
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# refuse FLAG WHY: exit 2 when the bench's own arguments name FLAG, which this script sets itself.
refuse() {
  local arg
  for arg in "${args[@]}"; do
    if [ "$arg" = "$1" ]; then
      echo "bench-bullmq: $2; leave out $1" >&2
      exit 2
    fi
  done
}

if [ -n "$simulator" ]; then
  refuse --provider "--simulator starts a simulator of its own"
  sluice="${BENCH_SLUICE_BIN:-$(command -v sluice || true)}"
  [ -n "$sluice" ] && [ -x "$sluice" ] || {
    echo "bench-bullmq: --simulator needs the sluice binary: set BENCH_SLUICE_BIN or put sluice on PATH (cargo build --release)" >&2
    exit 1
  }
  sim_dir="$(mktemp -d)"
  cleanups+=("rm -rf '$sim_dir'")
  # No rate limit, no latency: the simulator the throughput bench runs in its own process.
  printf '[sim]\ndefault_rpm = 0\n' > "$sim_dir/sluice.toml"
  sim_port="$(free_port)"
  env -u SLUICE_BULLMQ_DIR SLUICE_LOG=warn "$sluice" --config "$sim_dir/sluice.toml" sim --listen "127.0.0.1:$sim_port" \
    > "$sim_dir/sim.log" 2>&1 &
  sim=$!
  cleanups+=("kill $sim 2>/dev/null; wait $sim 2>/dev/null")
  for _ in $(seq 100); do
    grep -q 'listening' "$sim_dir/sim.log" 2>/dev/null && break
    kill -0 "$sim" 2>/dev/null || break
    sleep 0.1
  done
  grep -q 'listening' "$sim_dir/sim.log" || { echo "bench-bullmq: the simulator did not start:" >&2; cat "$sim_dir/sim.log" >&2; exit 1; }
  echo "bench-bullmq: sluice sim on port $sim_port, no rate limit" >&2
  args+=(--provider "http://127.0.0.1:$sim_port/v1")
fi

if [ -z "$appendfsync" ]; then
  NODE_PATH="$dir/node_modules" node "$src/bench.cjs" "${args[@]}"
  exit
fi

refuse --redis "--appendfsync starts a Redis of its own"
command -v redis-server >/dev/null || { echo "bench-bullmq: --appendfsync needs redis-server on PATH" >&2; exit 1; }
data="$(mktemp -d)"
port="$(free_port)"
redis-server --port "$port" --bind 127.0.0.1 --dir "$data" --save "" --appendonly yes \
  --appendfsync "$appendfsync" --daemonize no --logfile "$data/redis.log" &
redis=$!
cleanups+=("kill $redis 2>/dev/null; wait $redis 2>/dev/null; rm -rf '$data'")
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null || { echo "bench-bullmq: the private Redis did not start:" >&2; cat "$data/redis.log" >&2; exit 1; }
echo "bench-bullmq: a Redis of its own on port $port, appendonly yes, appendfsync $appendfsync" >&2
NODE_PATH="$dir/node_modules" node "$src/bench.cjs" "${args[@]}" --redis "redis://127.0.0.1:$port"
