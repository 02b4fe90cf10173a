#!/usr/bin/env bash
# Set up, then run every test, the slow ones on the real default model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -ra "$@"
