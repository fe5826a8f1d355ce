#!/usr/bin/env bash
# Make (or update) the project's virtual environment in .venv and install
# maild into it, with the extras named as arguments (e.g. "test").
# Debian and Ubuntu refuse pip in the system Python (PEP 668), so maild
# always lives in a venv; python3-venv is installed first where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "python3-venv is missing; installing it with apt-get" >&2
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=$(IFS=,; echo "$*")
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".${extras:+[$extras]}"
