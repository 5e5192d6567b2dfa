#!/usr/bin/env bash
# Install the official OpenAI SDKs the OpenAI front door's tests drive (tests/e2e/openai.rs):
# the `openai` Python package at its last 1.x, last 2.x and the current 3.x, each in a venv of its
# own, and the `openai` npm package. Prints one line per SDK: `<name> <path>`, where the path is a
# venv (python: <path>/bin/python) or a node_modules parent (node: NODE_PATH=<path>/node_modules).
# Idempotent, and quick when everything is already installed.
set -euo pipefail

root="${SLUICE_SDK_DIR:-$HOME/.cache/sluice/openai-sdks}"
mkdir -p "$root"
# Tests running in parallel may all get here: one installs, the others wait for it.
exec 9>"$root/.lock"
flock 9

# Pinned, so a new SDK release cannot change what the suite means between two runs.
declare -A python_versions=([py1]=1.109.1 [py2]=2.54.0 [py3]=3.63.0)
node_version=7.60.0

for name in py1 py2 py3; do
  venv="$root/$name"
  want="${python_versions[$name]}"
  have="$("$venv/bin/python" -c 'import openai, jsonschema; print(openai.__version__)' 2>/dev/null || true)"
  if [ "$have" != "$want" ]; then
    echo "openai-sdks: installing openai==$want into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "openai==$want" 'jsonschema>=4.18,<5' >&2
  fi
  echo "$name $venv"
done

node_dir="$root/node"
have="$(cd "$node_dir" 2>/dev/null && node -p 'require("openai/package.json").version' 2>/dev/null || true)"
if [ "$have" != "$node_version" ]; then
  echo "openai-sdks: installing openai@$node_version (npm) into $node_dir" >&2
  mkdir -p "$node_dir"
  (cd "$node_dir" && [ -f package.json ] || echo '{"name":"sluice-sdk-tests","private":true}' > "$node_dir/package.json")
  (cd "$node_dir" && npm install --silent --no-audit --no-fund "openai@$node_version" >&2)
fi
echo "node $node_dir"
