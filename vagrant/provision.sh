#!/usr/bin/env bash
# vagrant/provision.sh — provision one VM of the ctxdp Vagrant lab.
#
# Usage: provision.sh setup
#        provision.sh net   [--spec FILE] [--no-persist] ROLE
#        provision.sh check [--spec FILE] ROLE
# ROLE is a host of the lab spec (client, router or server). The spec
# defaults to lab.json beside this script: the file the Vagrantfile and
# ctxdp.lab.hosts.lab_from_spec read too, so the three always agree.
#
# Contract (run as root):
#   setup  scripts/setup.sh of the tree this script lives in: Debian packages,
#          kernel headers for bcc, bpffs, .venv with ctxdp. Idempotent.
#   net    configures the ROLE's data NICs from the spec, then runs check:
#          - each NIC is found by its MAC (the Vagrantfile sets the MACs) and
#            renamed to the spec's name; unless --no-persist, a systemd .link
#            file keeps that name across reboots;
#          - exactly the spec's IPv4 and IPv6 addresses (no DAD, no SLAAC), up;
#          - hosts: routes to the other links' prefixes via the router port
#            (the default route stays on Vagrant's management NIC);
#          - hosts: GRO on (virtio's default; stated so that veth stand-ins,
#            which XDP_REDIRECT into only with GRO or XDP on, behave alike);
#            TX checksum offload off, so every frame carries a complete
#            checksum. A virtio NIC may otherwise hand the router frames whose
#            L4 checksum is still to be filled in (CHECKSUM_PARTIAL); the
#            slow path re-sends the bytes over AF_PACKET, which would put the
#            unfinished checksum on the wire. (With native XDP the router's
#            virtio driver turns the host's checksum/GSO offloads off itself;
#            in generic mode it does not.)
#          - router: GRO, LRO and hardware GRO off (a merged super-frame cannot
#            be re-sent by the slow path); on virtio-net, the stack's queue
#            pairs pinned so native XDP gets one TX queue per CPU (see the
#            Vagrantfile); bpffs mounted.
#          It touches only interfaces whose MAC is in the spec, nothing else of
#          the machine's network, so it is safe in a network namespace holding
#          such interfaces (tests/unit/test_vagrant.py runs it that way). It
#          reads no sysfs network state: `nsenter --net` is enough to aim it.
#   check  verifies what net sets, changing nothing: one line per item
#          ("ok", "warn" or "FAIL"), exit 1 if any FAIL.
# Exit status: 0 done / all ok, 1 failure or mismatch, 2 usage.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SPEC="$HERE/lab.json"
PERSIST=1
LINK_DIR="/etc/systemd/network"

log() { echo "provision: $*"; }
die() { echo "provision: $*" >&2; exit 1; }
usage() {
  echo "usage: provision.sh setup | net [--spec FILE] [--no-persist] ROLE | check [--spec FILE] ROLE" >&2
  exit 2
}

# --- the plan: what the spec says about ROLE, one record per line ----------
#   role router|host
#   nic NAME MAC V4/PLEN V6/PLEN
#   route NET VIA DEV          (IPv4 or IPv6)
# Python because the spec is JSON; python3 is there after `setup` (and on
# every machine that runs the tests).
plan_for() {
  python3 - "$SPEC" "$1" <<'PY'
import ipaddress
import json
import sys

spec_path, role = sys.argv[1], sys.argv[2]
with open(spec_path) as f:
    spec = json.load(f)
if role not in spec.get("hosts", {}):
    sys.exit(f"role {role!r} is not a host of {spec_path}: {sorted(spec.get('hosts', {}))}")
links = spec["links"]


def nic(name, mac, v4, plen4, v6, plen6):
    ipaddress.ip_interface(f"{v4}/{plen4}")  # fail here on a malformed spec
    ipaddress.ip_interface(f"{v6}/{plen6}")
    print("nic", name, mac.lower(), f"{v4}/{plen4}", f"{v6}/{plen6}")


if role == "router":
    print("role router")
    for ln in links:
        nic(ln["port"], ln["port_mac"], ln["port_v4"], ln["plen4"], ln["port_v6"], ln["plen6"])
else:
    mine = [ln for ln in links if ln["role"] == role]
    if len(mine) != 1:
        sys.exit(f"{spec_path}: expected one link for {role!r}, found {len(mine)}")
    me = mine[0]
    print("role host")
    nic(me["host_if"], me["host_mac"], me["host_v4"], me["plen4"], me["host_v6"], me["plen6"])
    for ln in links:
        if ln is me:
            continue
        for fam, via in ((4, me["port_v4"]), (6, me["port_v6"])):
            net = ipaddress.ip_interface(f"{ln[f'host_v{fam}']}/{ln[f'plen{fam}']}").network
            print("route", net, via, me["host_if"])
PY
}

# --- interface helpers (netlink/ioctl only: correct inside `nsenter --net`) --
ifname_of_mac() {
  ip -o link show | awk -v mac="$1" '
    tolower($0) ~ ("link/ether " mac " ") { name = $2; sub(/:$/, "", name); sub(/@.*/, "", name); print name; exit }'
}

# "on", "off" or "" (absent) for an ethtool -k feature; "fixed" appended when
# the driver does not let it change.
feature() {
  ethtool -k "$1" 2>/dev/null | awk -v f="$2" '
    $1 == f ":" { v = $2; if ($0 ~ /\[fixed\]/) v = v " fixed"; print v; exit }'
}

set_feature_off() {
  local dev="$1" feat="$2" cur
  cur="$(feature "$dev" "$feat")"
  case "$cur" in
    ""|off|"off fixed") ;;
    "on fixed") log "warn: $dev: $feat is on and fixed by the driver" ;;
    *) ethtool -K "$dev" "$feat" off >/dev/null ;;
  esac
}

# "-4" or "-6" for an address or prefix.
fam() { case "$1" in *:*) echo -6 ;; *) echo -4 ;; esac; }

# The global addresses of a device, sorted, space-separated (with a trailing space).
global_addrs() { ip -o addr show dev "$1" scope global | awk '{ print $4 }' | sort | tr '\n' ' '; }

# An XDP program is attached (`ip -o link` says "mtu N xdp..." then).
xdp_attached() { ip -o link show dev "$1" | grep -q ' mtu [0-9]* xdp'; }

driver_of() { ethtool -i "$1" 2>/dev/null | awk '$1 == "driver:" { print $2 }'; }

# "MAX CURRENT" combined channels, from ethtool -l.
channels() {
  ethtool -l "$1" 2>/dev/null | awk '
    /^Pre-set maximums/ { s = "max" } /^Current hardware settings/ { s = "cur" }
    $1 == "Combined:" { v[s] = $2 } END { print (v["max"] == "" ? 0 : v["max"]), (v["cur"] == "" ? 0 : v["cur"]) }'
}

# nr_cpu_ids as the kernel sees it: the highest possible CPU + 1.
possible_cpus() {
  local last
  last="$(tr ',' '\n' < /sys/devices/system/cpu/possible | tail -1)"
  echo $(( ${last##*-} + 1 ))
}

# virtio-net: queue pairs for the stack so that XDP gets nr_cpu_ids more.
virtio_queues() {
  local dev="$1" max cur cpus online want
  if xdp_attached "$dev"; then
    log "$dev: XDP attached (ctxdp running?): queues left as they are"
    return 0
  fi
  read -r max cur <<<"$(channels "$dev")"
  cpus="$(possible_cpus)"
  online="$(getconf _NPROCESSORS_ONLN)"
  want=$(( max - cpus ))
  [ "$want" -le "$online" ] || want="$online"
  if [ "$want" -lt 1 ]; then
    log "warn: $dev: $max queue pair(s) for $cpus CPUs: native XDP will share TX queues" \
        "(locked mode); give the NIC >= $(( 2 * cpus )) queues (libvirt driver_queues)"
  elif [ "$cur" != "$want" ]; then
    ethtool -L "$dev" combined "$want" || log "warn: $dev: ethtool -L combined $want failed (XDP attached?)"
  fi
}

# --- net --------------------------------------------------------------------
do_net() {
  local role plan kind a b c d cur
  plan="$(plan_for "$1")" || die "cannot read the plan for $1 from $SPEC"
  role="$(awk '$1 == "role" { print $2 }' <<<"$plan")"
  while read -r kind a b c d <&3; do
    [ "$kind" = nic ] || continue
    # a=name b=mac c=v4 d=v6
    cur="$(ifname_of_mac "$b")"
    [ -n "$cur" ] || die "no interface with MAC $b (for $a): is this the $1 VM? $(ip -br link | tr '\n' ';')"
    if [ "$cur" != "$a" ]; then
      if ip link show dev "$a" >/dev/null 2>&1; then
        die "$a exists but has another MAC; $b is on $cur"
      fi
      ip link set dev "$cur" down
      ip link set dev "$cur" name "$a"
      log "renamed $cur -> $a ($b)"
    fi
    if [ "$PERSIST" = 1 ]; then persist_name "$a" "$b"; fi
    sysctl -qw "net.ipv6.conf.$a.disable_ipv6=0" "net.ipv6.conf.$a.accept_ra=0" \
      "net.ipv6.conf.$a.autoconf=0" "net.ipv6.conf.$a.accept_dad=0"
    # Up before the offload settings: veth (the CI's stand-in for the VMs'
    # NICs) starts the NAPI instance that XDP_REDIRECT into it needs only
    # when GRO is switched on while the device is up.
    ip link set dev "$a" up
    if [ "$role" = router ]; then
      for f in generic-receive-offload large-receive-offload rx-gro-hw; do set_feature_off "$a" "$f"; done
      if [ "$(driver_of "$a")" = virtio_net ]; then virtio_queues "$a"; fi
    else
      [ "$(feature "$a" generic-receive-offload)" = on ] || ethtool -K "$a" gro on >/dev/null
      set_feature_off "$a" tx-checksumming
    fi
    # Exactly the spec's addresses, so a changed lab.json leaves nothing
    # stale; untouched when already right (net runs on every `vagrant up`).
    if [ "$(global_addrs "$a")" != "$(printf '%s\n' "$c" "$d" | sort | tr '\n' ' ')" ]; then
      ip -4 addr flush dev "$a" scope global
      ip -6 addr flush dev "$a" scope global
      ip -4 addr add "$c" dev "$a"
      ip -6 addr add "$d" dev "$a" nodad
    fi
    log "$a ($b): $c $d"
  done 3<<<"$plan"
  while read -r kind a b c _ <&3; do
    [ "$kind" = route ] || continue
    ip "$(fam "$a")" route replace "$a" via "$b" dev "$c"
    log "route $a via $b dev $c"
  done 3<<<"$plan"
  if [ "$role" = router ] && ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
    log "mounted bpffs"
  fi
  do_check "$1"
}

persist_name() {
  local name="$1" mac="$2" file text
  file="$LINK_DIR/10-ctxdp-$name.link"
  text="# Written by ctxdp vagrant/provision.sh: the lab NIC $mac is $name.
[Match]
MACAddress=$mac

[Link]
Name=$name"
  if [ ! -f "$file" ] || [ "$(cat "$file")" != "$text" ]; then
    mkdir -p "$LINK_DIR"
    printf '%s\n' "$text" > "$file"
    log "wrote $file"
  fi
}

# --- check ------------------------------------------------------------------
count_paths() { local n=0 p; for p in "$@"; do [ -e "$p" ] && n=$(( n + 1 )); done; echo "$n"; }

FAILS=0
ok()   { echo "ok    $*"; }
warn() { echo "warn  $*"; }
fail() { echo "FAIL  $*"; FAILS=$(( FAILS + 1 )); }

expect_feature_off() {
  local dev="$1" feat="$2" cur
  cur="$(feature "$dev" "$feat")"
  case "$cur" in
    "") ok "$dev: $feat not offered by the driver" ;;
    off*) ok "$dev: $feat off" ;;
    *) fail "$dev: $feat is $cur, want off" ;;
  esac
}

do_check() {
  local role plan kind a b c d cur have want max chq cpus
  FAILS=0
  plan="$(plan_for "$1")" || die "cannot read the plan for $1 from $SPEC"
  role="$(awk '$1 == "role" { print $2 }' <<<"$plan")"
  while read -r kind a b c d <&3; do
    [ "$kind" = nic ] || continue
    cur="$(ifname_of_mac "$b")"
    if [ "$cur" != "$a" ]; then
      fail "$a: MAC $b is on '${cur:-no interface}'"
      continue
    fi
    ok "$a: named by MAC $b"
    if ip -o link show dev "$a" | grep -q '[<,]UP[,>]'; then ok "$a: up"; else fail "$a: down"; fi
    have="$(global_addrs "$a")"
    want="$(printf '%s\n' "$c" "$d" | sort | tr '\n' ' ')"
    if [ "$have" = "$want" ]; then ok "$a: addresses ${want% }"; else fail "$a: addresses '${have% }', want '${want% }'"; fi
    if [ "$(sysctl -n "net.ipv6.conf.$a.accept_ra")" = 0 ]; then ok "$a: accept_ra 0"; else fail "$a: accept_ra on"; fi
    if [ "$role" = router ]; then
      for f in generic-receive-offload large-receive-offload rx-gro-hw; do expect_feature_off "$a" "$f"; done
      if [ "$(driver_of "$a")" = virtio_net ]; then
        read -r max chq <<<"$(channels "$a")"
        cpus="$(possible_cpus)"
        if xdp_attached "$a"; then
          # With XDP attached, ethtool's "current" counts the XDP queue
          # pairs too (seen on Debian 12's 6.1). The stack's share is the
          # TX queue count the stack sees; the RX count includes XDP's.
          # (sysfs: fine here, a virtio NIC lives in a VM's own netns.)
          local txq rxq
          txq="$(count_paths "/sys/class/net/$a/queues/tx-"*)"
          rxq="$(count_paths "/sys/class/net/$a/queues/rx-"*)"
          if [ $(( rxq - txq )) -ge "$cpus" ]; then
            ok "$a: virtio-net XDP attached with $(( rxq - txq )) own TX queue pairs ($txq for the stack, max $max)"
          else
            warn "$a: virtio-net XDP attached without own TX queues ($txq for the stack, max $max): locked mode"
          fi
        elif [ $(( chq + cpus )) -le "$max" ]; then
          ok "$a: virtio-net $chq + $cpus XDP queue pairs <= $max: native XDP gets its own TX queues"
        else
          warn "$a: virtio-net $chq + $cpus XDP queue pairs > $max: native XDP TX shares queues (locked mode)"
        fi
      else
        ok "$a: driver $(driver_of "$a"), no virtio-net queue tuning"
      fi
    else
      if [ "$(feature "$a" generic-receive-offload)" = on ]; then
        ok "$a: generic-receive-offload on"
      else
        fail "$a: generic-receive-offload is $(feature "$a" generic-receive-offload), want on"
      fi
      expect_feature_off "$a" tx-checksumming
    fi
  done 3<<<"$plan"
  while read -r kind a b c _ <&3; do
    [ "$kind" = route ] || continue
    have="$(ip "$(fam "$a")" route show "$a" | tr '\n' ' ')"
    if grep -q "via $b dev $c " <<<"$have"; then
      ok "route $a via $b dev $c"
    else
      fail "route $a: '$have', want via $b dev $c"
    fi
  done 3<<<"$plan"
  if [ "$role" = router ]; then
    if mountpoint -q /sys/fs/bpf; then ok "bpffs on /sys/fs/bpf"; else fail "bpffs not mounted on /sys/fs/bpf"; fi
  fi
  if [ "$FAILS" -gt 0 ]; then
    echo "provision: check $1: $FAILS item(s) wrong" >&2
    return 1
  fi
  log "check $1: all ok"
}

# --- main -------------------------------------------------------------------
[ $# -ge 1 ] || usage
cmd="$1"; shift
while [ $# -gt 0 ]; do
  case "$1" in
    --spec) [ $# -ge 2 ] || usage; SPEC="$2"; shift 2 ;;
    --no-persist) PERSIST=0; shift ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ "$(id -u)" = 0 ] || die "must run as root"
case "$cmd" in
  setup) [ $# -eq 0 ] || usage; exec "$ROOT/scripts/setup.sh" ;;
  net) [ $# -eq 1 ] || usage; do_net "$1" ;;
  check) [ $# -eq 1 ] || usage; do_check "$1" ;;
  *) usage ;;
esac
