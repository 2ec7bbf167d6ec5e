#!/usr/bin/env bash
# vagrant/run-scenarios.sh — run the ctxdp lab scenarios across the three VMs.
#
# Usage (from anywhere, on the machine that ran `vagrant up`):
#   vagrant/run-scenarios.sh [NAME ...] [--family 4|6 ...]
# Arguments go to `python3 -m ctxdp.lab.scenarios`. Without a scenario name
# it runs tcp_transfer and udp_offload_and_age (IPv4 and IPv6): the
# client -> router -> server transfers; name others (snat_masquerade, ...,
# see the runner's --help) to run them too.
#
# Contract:
# - The scenarios are ctxdp.lab.scenarios, the SAME functions the netns
#   integration tests run; only the hosts differ: lab_from_spec builds them
#   from vagrant/lab.json as VagrantHosts (ssh with `vagrant ssh-config`,
#   `sudo -n`), the runner starts ctxdp on the router with XDP on lan0/wan0,
#   drives TCP and UDP traffic client -> router -> server through the lab
#   agent, and checks offload, fast-path counters, integrity and aging.
# - CTXDP_LAB_SPEC names another spec than vagrant/lab.json (e.g. a lab
#   with more hosts; tests/unit/test_vagrant.py points it at namespaces).
# - XDP mode: lab.json says native. When the VMs run on another provider
#   than libvirt (VirtualBox), the run uses "auto" (native, else generic)
#   through a copy of the spec, vagrant/.lab-run.json. CTXDP_XDP_MODE
#   overrides either choice.
# - While the runner works, the router's `ctxdp flows` is polled and shown
#   whenever the fast path holds entries, with the ports' XDP attachment
#   (`xdp` = native, `xdpgeneric` = generic) the first time.
# - Needs on this machine: vagrant, ssh, python3 >= 3.11 (standard library
#   only: the scenario runner imports no third-party package).
# Exit status: the runner's — 0 only if every scenario run passed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
POLL="${CTXDP_FLOWS_POLL:-2}"

die() { echo "run-scenarios: $*" >&2; exit 1; }

command -v vagrant >/dev/null || die "vagrant not found"
command -v ssh >/dev/null || die "ssh not found"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$PY must be Python >= 3.11 (set PYTHON=...)"

# lab_from_spec resolves the spec's "vagrant_dir" ("vagrant") from here.
cd "$ROOT"

# --- the VMs ------------------------------------------------------------------
status="$(cd "$HERE" && vagrant status --machine-readable)" || die "vagrant status failed"
for vm in client router server; do
  grep -q "^[0-9]*,$vm,state,running$" <<<"$status" \
    || die "VM $vm is not running: cd vagrant && vagrant up"
done
provider="$(awk -F, '$2 == "router" && $3 == "provider-name" { print $4; exit }' <<<"$status")"

# --- the spec -----------------------------------------------------------------
spec="${CTXDP_LAB_SPEC:-$HERE/lab.json}"
mode="${CTXDP_XDP_MODE:-}"
if [ -z "$mode" ] && [ "$provider" != libvirt ]; then mode=auto; fi
if [ -n "$mode" ]; then
  base="$spec"
  spec="$HERE/.lab-run.json"
  "$PY" - "$base" "$spec" "$mode" <<'PY'
import json
import sys

src, dst, mode = sys.argv[1:4]
with open(src) as f:
    doc = json.load(f)
doc["xdp_mode"] = mode
with open(dst, "w") as f:
    json.dump(doc, f, indent=2)
PY
fi
read -r sock ctxdp_bin ports <<<"$("$PY" - "$spec" <<'PY'
import json
import sys

with open(sys.argv[1]) as f:
    doc = json.load(f)
print(doc.get("socket_path", "/run/ctxdp/lab.sock"), doc.get("ctxdp", ["ctxdp"])[0],
      ",".join(ln["port"] for ln in doc["links"]))
PY
)"
echo "run-scenarios: provider ${provider:-?}, xdp_mode $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["xdp_mode"])' "$spec"), spec ${spec#"$ROOT"/}"

# --- the flows watcher ----------------------------------------------------------
ssh_cfg="$(mktemp)"
(cd "$HERE" && vagrant ssh-config router) > "$ssh_cfg" || die "vagrant ssh-config router failed"
on_router() { ssh -F "$ssh_cfg" -o LogLevel=ERROR -o BatchMode=yes router "$@"; }

watch_flows() {
  local out shown_xdp=0 p
  while sleep "$POLL"; do
    out="$(on_router "sudo -n $ctxdp_bin --socket $sock flows" 2>/dev/null)" || continue
    grep -q '^ctxdp: [1-9][0-9]* offloaded entries' <<<"$out" || continue
    if [ "$shown_xdp" = 0 ]; then
      shown_xdp=1
      for p in ${ports//,/ }; do
        # `ip -o link` says "mtu 1500 xdp ..." (native) or "... xdpgeneric ...".
        echo "[router] $p: XDP mode: $(on_router "ip -o link show dev $p" \
          | sed -n 's/.* mtu [0-9]* \(xdp[a-z]*\) .*/\1/p' | grep . || echo none)"
      done
    fi
    echo "[router] \$ ctxdp flows"
    while IFS= read -r p; do echo "[router]   $p"; done <<<"$out"
  done
}

watch_flows &
watcher=$!
trap 'kill "$watcher" 2>/dev/null || true; rm -f "$ssh_cfg"' EXIT

# --- the scenarios ------------------------------------------------------------
has_name=0
for a in "$@"; do
  case "$a" in -*|[0-9]*) ;; *) has_name=1 ;; esac
done
[ "$has_name" = 1 ] || set -- tcp_transfer udp_offload_and_age "$@"
rc=0
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ctxdp.lab.scenarios --spec "$spec" "$@" || rc=$?
exit "$rc"
