#!/usr/bin/env bash
# scripts/test.sh — the one test command: set up the machine, then run pytest.
# Extra arguments go to pytest. CI runs exactly this (see .ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check ctxdp tests bench
exec .venv/bin/python -m pytest "$@"
