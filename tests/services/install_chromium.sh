#!/usr/bin/env bash
# Headless Chromium for tests/e2e/test_report_browser.py (renders `pretrain report` offline).
# Idempotent: does nothing when a Chromium/Chrome binary is already on PATH.
set -euo pipefail
for bin in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$bin" >/dev/null 2>&1; then
    echo "install_chromium: $(command -v "$bin") is already installed"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_chromium: not root and no sudo; install Debian's chromium package by hand" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_chromium: installed $(command -v chromium)"
