#!/usr/bin/env bash
# CI: the workspace's `rust-version` must be at least every locked dependency's own, so a user
# with an older toolchain gets cargo's clear "requires rustc X" message instead of a build error
# deep in a dependency. (Clippy's `incompatible_msrv` lint checks our own code against it.)
set -euo pipefail
cd "$(dirname "$0")/.."

metadata="$(mktemp)"
trap 'rm -f "$metadata"' EXIT
cargo metadata --format-version 1 --locked >"$metadata"
python3 - "$metadata" <<'PY'
import json
import sys


def version(v):
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


with open(sys.argv[1]) as f:
    meta = json.load(f)
ours = set(meta["workspace_members"])
declared = {p["rust_version"] for p in meta["packages"] if p["id"] in ours}
if len(declared) != 1 or None in declared:
    sys.exit("check-rust-version: workspace crates declare %s; each should inherit "
             "rust-version.workspace = true" % sorted(map(str, declared)))
declared = declared.pop()
needs = [(version(p["rust_version"]), p["rust_version"], "%s %s" % (p["name"], p["version"]))
         for p in meta["packages"] if p["id"] not in ours and p.get("rust_version")]
if needs:
    highest = max(needs)
    if highest[0] > version(declared):
        sys.exit('check-rust-version: rust-version = "%s" in Cargo.toml, but %s needs Rust %s: '
                 "raise it" % (declared, highest[2], highest[1]))
    print("check-rust-version: rust-version %s covers every locked dependency (the highest: "
          "%s needs %s)" % (declared, highest[2], highest[1]))
PY
