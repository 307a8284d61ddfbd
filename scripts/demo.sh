#!/usr/bin/env bash
# Install pimg with the demo's extra into the active Python environment and start the web demo.
# Options go to app.py, e.g.: bash scripts/demo.sh --base /models/sd15 --auth me:secret
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[app]" >/dev/null
exec python app.py "$@"
