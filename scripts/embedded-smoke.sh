#!/usr/bin/env bash
# Smoke test of the embedded default: start `sluice dev` on a fresh data file, submit a job
# with curl and wait for it to succeed. Needs no PostgreSQL, RabbitMQ or Redis; says whether
# PostgreSQL was reachable at all, so a run without services can be told from one with them.
#
# Usage: scripts/embedded-smoke.sh [command that runs sluice...]
#        (default: cargo run --release --quiet --)
set -euo pipefail

if [ "$#" -gt 0 ]; then sluice=("$@"); else sluice=(cargo run --release --quiet --); fi
work="$(mktemp -d)"
log="$work/dev.log"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "postgres reachable"
else
  echo "postgres unreachable"
fi

"${sluice[@]}" dev --listen 127.0.0.1:0 --data "$work/sluice.db" >"$log" &
pid=$!

for _ in $(seq 1 600); do
  grep -q '^api key: ' "$log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "sluice dev exited" >&2; exit 1; }
  sleep 0.1
done
url="$(sed -n 's/^sluice api listening on //p' "$log")"
key="$(sed -n 's/^api key: //p' "$log")"
[ -n "$url" ] && [ -n "$key" ] || { cat "$log"; echo "sluice dev did not print its URL and key" >&2; exit 1; }
echo "sluice dev at $url"

accepted="$(curl -sS -H "Authorization: Bearer $key" -H 'content-type: application/json' \
  -d '{"model":"default","messages":[{"role":"user","content":"hello from the smoke test"}]}' \
  "$url/v1/jobs")"
id="$(printf '%s' "$accepted" | sed -n 's/.*"request_id":"\([^"]*\)".*/\1/p')"
[ -n "$id" ] || { echo "submit refused: $accepted" >&2; exit 1; }

for _ in $(seq 1 300); do
  job="$(curl -sS -H "Authorization: Bearer $key" "$url/v1/jobs/$id")"
  case "$job" in
    *'"state":"succeeded"'*) echo "$job"; exit 0 ;;
    *'"state":"failed"'* | *'"state":"dead"'* | *'"state":"cancelled"'*) echo "$job" >&2; exit 1 ;;
  esac
  sleep 0.1
done
echo "job $id did not finish: $job" >&2
exit 1
