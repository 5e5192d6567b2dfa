#!/usr/bin/env bash
# Make sure headless Chromium (Debian's `chromium` package) is installed, for the dashboard's
# browser test; a fresh CI machine gets it here. Idempotent: does nothing once it is there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "chromium: installing Debian's chromium package" >&2
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
sudo_if_needed apt-get -o DPkg::Lock::Timeout=300 update -qq
sudo_if_needed apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >&2
test -x /usr/bin/chromium
