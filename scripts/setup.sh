#!/usr/bin/env bash
# scripts/setup.sh — idempotent machine + venv setup for ctxdp.
#
# Contract: run as root on Debian 12 or Ubuntu 22.04+. Afterwards
#   * the Debian packages ctxdp needs are installed (bcc bindings, iproute2,
#     ethtool, nftables, conntrack, kernel headers for bcc's runtime compile),
#   * bpffs is mounted on /sys/fs/bpf,
#   * ./.venv exists, can `import bcc`, and has ctxdp installed (editable)
#     with its test extras.
# Running it again is cheap: every step checks before it acts.
# On any other system it exits non-zero with a one-line reason.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CTXDP_VENV:-$ROOT/.venv}"
EXTRAS="${CTXDP_EXTRAS:-test}"

die() { echo "setup: $*" >&2; exit 1; }
log() { echo "setup: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and mounts bpffs)"
[ -r /etc/os-release ] || die "no /etc/os-release: only Debian 12 and Ubuntu 22.04+ are supported"
# shellcheck source=/dev/null
. /etc/os-release
case "${ID:-}:${VERSION_ID:-}" in
  debian:12|debian:13) ;;
  ubuntu:2[2-9].*) ;;
  *) die "unsupported system '${PRETTY_NAME:-unknown}': need Debian 12 or Ubuntu 22.04+ (apt, python3-bpfcc)";;
esac
command -v apt-get >/dev/null || die "apt-get not found"

KVER="$(uname -r)"
# gcc + python3-dev build ctxdp's one C extension (the batch-install packer,
# ctxdp/providers/_fastadd.c) when the venv installs ctxdp.
PKGS=(python3-bpfcc python3-venv python3-pip python3-dev gcc iproute2 ethtool nftables
      conntrack libbpf1 iputils-ping procps kmod)
[ "${ID}" = ubuntu ] && PKGS=("${PKGS[@]/libbpf1/libbpf0}")
# The test extras also check the Vagrant lab files: ruby -c parses the
# Vagrantfile, vagrant validate checks it, shellcheck lints the provisioning
# scripts. vagrant comes without recommends: those pull libvirt and qemu
# (~400 packages) that only a machine running the VMs needs.
NORECS=()
case ",$EXTRAS," in *,test,*) PKGS+=(ruby shellcheck); NORECS+=(vagrant vagrant-libvirt);; esac

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { log "apt-get update"; apt-get update -qq; apt_updated=1; }; }

if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

missing=()
for p in "${NORECS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "installing (no recommends): ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for bcc ------------------------------------------------
# bcc compiles the XDP program at run time against kernel headers. Prefer the
# running kernel's own headers package; a custom kernel has none, and then the
# distribution's generic headers work because ct_offload.c only uses UAPI
# headers. bcc looks in /lib/modules/$KVER/{build,source}; Debian splits the
# headers into -amd64 and -common trees, so both links are needed
# (BCC_KERNEL_SOURCE alone does not cope with that split).
if [ ! -e "/lib/modules/$KVER/build/include" ]; then
  apt_update
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$KVER" >/dev/null 2>&1; then
    log "installed linux-headers-$KVER"
  else
    case "$ID" in
      debian) generic=linux-headers-amd64; [ "$(dpkg --print-architecture)" = arm64 ] && generic=linux-headers-arm64;;
      *) generic=linux-headers-generic;;
    esac
    log "no headers package for kernel $KVER; falling back to $generic"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$generic" >/dev/null
    build="$(find /usr/src -maxdepth 1 -type d \( -name 'linux-headers-*-amd64' -o -name 'linux-headers-*-arm64' -o -name 'linux-headers-*-generic' \) | sort -V | tail -1)"
    [ -n "$build" ] || die "fallback headers installed but no /usr/src/linux-headers-* tree found"
    common="${build%-*}-common"
    [ -d "$common" ] || common="$build"
    mkdir -p "/lib/modules/$KVER"
    ln -sfn "$build" "/lib/modules/$KVER/build"
    ln -sfn "$common" "/lib/modules/$KVER/source"
    log "linked /lib/modules/$KVER/{build,source} -> $build, $common"
  fi
fi

# --- bpffs ------------------------------------------------------------------
# Pinned maps live under /sys/fs/bpf/ctxdp; bpffs is not mounted by default.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf"
  log "mounted bpffs"
fi

# --- venv -----------------------------------------------------------------
# Debian's interpreter + system site packages: that is where python3-bpfcc
# puts the bcc bindings. pyenv or other interpreters on PATH cannot see them.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$VENV"
  log "creating venv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "Debian's python3 is older than 3.11"

stamp="$VENV/.ctxdp-installed"
# Reinstall when the project or the C extension's sources change (the
# editable install compiles ctxdp/providers/_fastadd.c with _keyindex.h and
# bpf/ct_offload.h).
want="$(cat "$ROOT/pyproject.toml" "$ROOT/ctxdp/providers/_fastadd.c" \
        "$ROOT/ctxdp/providers/_keyindex.h" "$ROOT/bpf/ct_offload.h" \
        | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing ctxdp[$EXTRAS] into the venv"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${ROOT}[${EXTRAS}]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import bcc, pyroute2, psutil' || die "venv cannot import bcc/pyroute2/psutil"
"$VENV/bin/python" -c 'import ctxdp.providers._fastadd' \
  || die "the C extension ctxdp.providers._fastadd was not built (gcc/python3-dev?)"
log "ready: $VENV"
