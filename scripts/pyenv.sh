#!/usr/bin/env bash
# Create or update the Python virtualenv the tests' helper servers run in (the SMTP sink
# scripts/smtp_sink.py on aiosmtpd, and moto's SQS-compatible server), and print its path.
# Idempotent, and quick when everything is already installed.
set -euo pipefail

venv="${SLUICE_VENV:-$HOME/.cache/sluice/venv}"
mkdir -p "$(dirname "$venv")"

ready() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import aiosmtpd, moto.server, flask_cors' 2>/dev/null
}

if ! ready; then
  # Tests running in parallel may all get here: one builds the venv, the others wait for it.
  exec 9>"$venv.lock"
  flock 9
  if ! ready; then
    echo "pyenv: creating $venv with aiosmtpd and moto[server]" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      'aiosmtpd>=1.4,<2' 'moto[server]>=5,<6' >&2
  fi
fi
echo "$venv"
