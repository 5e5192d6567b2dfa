#!/usr/bin/env bash
# Create or update the Python virtualenv the tests' helper servers run in (the SMTP sink
# scripts/smtp_sink.py on aiosmtpd, and moto's SQS-compatible server) and the deployment checks
# use (scripts/check-deploy.sh: checkov, jsonschema, python-hcl2, dockerfile-parse), schemathesis
# for the OpenAPI test (tests/e2e/openapi.rs), and print its path.
# Idempotent, and quick when everything is already installed.
set -euo pipefail

venv="${SLUICE_VENV:-$HOME/.cache/sluice/venv}"
mkdir -p "$(dirname "$venv")"

# The packages, pinned to ranges; the stamp file written after an install names them, so a
# change here installs again. Every test that starts a helper server runs this script: an
# installed venv is told by its stamp, not by importing it all (seconds of CPU each time).
packages=('aiosmtpd>=1.4,<2' 'moto[server]>=5,<6'
  'checkov>=3.2,<4' 'jsonschema>=4.18,<5' 'PyYAML>=6,<7' 'python-hcl2>=4,<9' 'dockerfile-parse>=2,<3'
  'schemathesis==4.32.5' 'pytest>=8,<9' 'packaging>=23,<24')
stamp="$venv/.sluice-venv"

ready() {
  [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${packages[*]}" ]
}

if ! ready; then
  # Tests running in parallel may all get here: one builds the venv, the others wait for it.
  exec 9>"$venv.lock"
  flock 9
  if ! ready; then
    echo "pyenv: creating $venv with aiosmtpd, moto[server], checkov and the deploy checkers" >&2
    rm -f "$stamp"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # pytest 9 (schemathesis's) wants packaging>=24 and checkov wants <24: pytest 8 fits both.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
    "$venv/bin/python" -c 'import aiosmtpd, moto.server, flask_cors, checkov, jsonschema, yaml, hcl2, dockerfile_parse, schemathesis' >&2
    echo "${packages[*]}" > "$stamp"
  fi
fi
echo "$venv"
