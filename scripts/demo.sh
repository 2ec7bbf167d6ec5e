#!/usr/bin/env bash
# scripts/demo.sh — set up the machine, then run `ctxdp demo`: it builds a
# client/router/server namespace topology, runs real traffic through the
# ctxdp router and shows connections being offloaded to XDP and aged out.
# Extra arguments go to `ctxdp demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/ctxdp" demo "$@"
