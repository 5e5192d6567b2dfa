#!/usr/bin/env bash
# Install what the test suite needs beyond Rust, one after the other (tests running in parallel
# would otherwise race for apt's lock): the Python venv (scripts/pyenv.sh), the official OpenAI
# SDKs the front door's tests drive (scripts/openai-sdks.sh), headless Chromium for the dashboard
# test, and promtool for the alert rules. Idempotent and quick once done.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/pyenv.sh >/dev/null
scripts/openai-sdks.sh >/dev/null
scripts/chromium.sh
if ! command -v promtool >/dev/null 2>&1; then
  echo "test-deps: installing promtool (Debian's prometheus package)" >&2
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends prometheus >&2
fi
