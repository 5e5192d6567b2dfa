#!/usr/bin/env bash
# Create or update the Python virtualenv the tests' SMTP sink (scripts/smtp_sink.py) runs in,
# and print its path. Idempotent, and quick when aiosmtpd is already installed.
set -euo pipefail

venv="${SLUICE_VENV:-$HOME/.cache/sluice/venv}"
mkdir -p "$(dirname "$venv")"

ready() { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; }

if ! ready; then
  # Tests running in parallel may all get here: one builds the venv, the others wait for it.
  exec 9>"$venv.lock"
  flock 9
  if ! ready; then
    echo "pyenv: creating $venv with aiosmtpd" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'aiosmtpd>=1.4,<2' >&2
  fi
fi
echo "$venv"
