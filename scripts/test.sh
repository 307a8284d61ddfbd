#!/usr/bin/env bash
# Install pimg with its test extras into the active Python environment and run the test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
python -m pip install -e ".[test]" || exit 1
# The demo's browser test drives Debian's Chromium through Playwright. Install it where we may
# (root with apt-get, as on CI); elsewhere that one test skips and says what to install.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test" >&2
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium: the browser test will skip" >&2
fi
python -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
