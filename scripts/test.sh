#!/usr/bin/env bash
# One command: install duo with its test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${DUO_VENV:-.venv}/bin/python" -m pytest "$@"
