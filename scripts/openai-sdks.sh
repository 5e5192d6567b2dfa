#!/usr/bin/env bash
# Install the official OpenAI SDKs the OpenAI front door's tests drive (tests/e2e/openai.rs):
# the `openai` Python package at its last 1.x, last 2.x and the current 3.x, each in a venv of its
# own, and the `openai` npm package. Prints one line per SDK: `<name> <path>`, where the path is a
# venv (python: <path>/bin/python) or a node_modules parent (node: NODE_PATH=<path>/node_modules).
# Idempotent, and quick when everything is already installed: every test that drives an SDK runs
# it, so an installed SDK is told by a stamp file written after its install, not by starting it.
set -euo pipefail

root="${SLUICE_SDK_DIR:-$HOME/.cache/sluice/openai-sdks}"

# Pinned, so a new SDK release cannot change what the suite means between two runs.
declare -A python_versions=([py1]=1.109.1 [py2]=2.54.0 [py3]=3.63.0)
node_version=7.60.0
jsonschema='jsonschema>=4.18,<5'

# What each SDK's stamp must say: the exact packages it was installed with.
spec() {
  case "$1" in
    node) echo "openai@$node_version" ;;
    *) echo "openai==${python_versions[$1]} $jsonschema" ;;
  esac
}

installed() {
  local dir="$root/$1"
  [ -f "$dir/.sluice-sdk" ] && [ "$(cat "$dir/.sluice-sdk")" = "$(spec "$1")" ] || return 1
  case "$1" in
    node) [ -f "$dir/node_modules/openai/package.json" ] ;;
    *) [ -x "$dir/bin/python" ] ;;
  esac
}

all_installed() {
  for name in py1 py2 py3 node; do
    installed "$name" || return 1
  done
}

if ! all_installed; then
  mkdir -p "$root"
  # Tests running in parallel may all get here: one installs, the others wait for it.
  exec 9>"$root/.lock"
  flock 9
  for name in py1 py2 py3; do
    installed "$name" && continue
    venv="$root/$name"
    echo "openai-sdks: installing openai==${python_versions[$name]} into $venv" >&2
    rm -f "$venv/.sluice-sdk"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "openai==${python_versions[$name]}" "$jsonschema" >&2
    "$venv/bin/python" -c 'import openai, jsonschema' >&2
    spec "$name" > "$venv/.sluice-sdk"
  done
  if ! installed node; then
    node_dir="$root/node"
    echo "openai-sdks: installing openai@$node_version (npm) into $node_dir" >&2
    mkdir -p "$node_dir"
    rm -f "$node_dir/.sluice-sdk"
    [ -f "$node_dir/package.json" ] || echo '{"name":"sluice-sdk-tests","private":true}' > "$node_dir/package.json"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund "openai@$node_version" >&2)
    spec node > "$node_dir/.sluice-sdk"
  fi
fi

for name in py1 py2 py3 node; do
  echo "$name $root/$name"
done
