#!/usr/bin/env bash
# One command: install duo and answer a prompt with the embedded default pair (both services start as
# child processes on loopback). Usage: scripts/quickstart.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${DUO_VENV:-.venv}/bin/duo-client" generate --stats "${1:-Give me three tips for writing clear code.}"
