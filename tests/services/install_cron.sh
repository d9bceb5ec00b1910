#!/usr/bin/env bash
# Debian's cron for tests/e2e/test_schedule_cron.py, which installs the crontab line that
# `pretrain submit --schedule` prints and starts the daemon itself when none runs. Idempotent; root
# only (it installs a package): as another user it says so and exits 0, and the cron tests skip.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install_cron.sh: not root; skipping cron (its tests will be skipped)"
    exit 0
fi
if ! command -v cron >/dev/null && [ ! -x /usr/sbin/cron ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq cron >/dev/null
fi
echo "install_cron.sh: $(command -v cron || echo /usr/sbin/cron) is installed"
