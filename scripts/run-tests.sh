#!/usr/bin/env bash
# Install maild with its test dependencies into .venv and run the whole
# suite on two cores.  Extra arguments are passed to trial (e.g. a module).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test
exec .venv/bin/python -m twisted.trial -j2 "${@:-tests}"
