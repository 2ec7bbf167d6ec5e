"""The XDP offload provider: loads bpf/ct_offload.c with bcc and feeds its maps.

Contract (see ``ctxdp.providers.base`` for the hook semantics):

- ``XdpProvider(ports, mode=, max_conns=, pin_dir=, keep=, on_start=)`` does
  nothing in the kernel until ``start()`` (raises ``ProviderError``) or
  ``init()`` (same, but returns the errno). ``start()`` compiles and loads the
  program ONCE, adopts or flushes what an earlier run left pinned in
  ``pin_dir``, attaches the one program to every port and fills ``ct_tx_ports``
  with every port's ifindex. If any step fails, everything this start did is
  undone (ports detached, pins it created removed) and ``ProviderError`` is
  raised.
- Modes: ``"native"`` (driver mode; failure is fatal), ``"generic"`` (skb
  mode, forced), ``"auto"`` (native, else generic with a logged warning).
  ``attached`` maps port name -> mode actually used.
- Maps: IPv4 connections live in ``ct_flows4`` (20-byte keys), IPv6 ones in
  ``ct_flows6`` (44-byte keys); see ``ctxdp.providers.xdp_layout``. Each holds
  up to ``2 * max_conns`` entries. The program is compiled with
  ``xdp_layout.cflags()`` (per-CPU counter slots sized for this machine).
- Slots: every held connection owns one slot in ``[0, max_conns)``, shared by
  its two direction entries (``val.slot``) and indexing ``ct_last_used``.
  The key index (``ctxdp.providers.keyindex``: key -> slot, and each slot's
  keys) guarantees that no two connections own one key; it takes its memory
  for ``max_conns`` slots at start.
- ``conn_add``: EAGAIN unless both directions are resolved; EEXIST if another
  connection owns one of its keys; ENOSPC when no slot is free or the kernel
  says the map is full (counted; a half-written pair is rolled back); EINVAL
  when the two directions are of different families. Both entries go to the
  kernel in ONE BPF_MAP_UPDATE_BATCH (two single updates on kernels without
  it). Re-adding a held connection rewrites it in place
  (same slot, last-used kept). On any failure the connection is NOT held and
  no entry of it is left in the map.
- ``batch_submit``: ops run in order; each run of consecutive ADDs is one
  update-batch syscall per family (per chunk when long: a writer thread
  writes a chunk while the caller packs the next, and the caller writes the
  last one; with the extension built that thread is native, see
  ``_fastadd.Writer``), each run of DELs one delete-batch syscall per
  family; UPD reads the mmap; EST is a no-op; POLICY rewrites; FLUSH
  flushes.
- Aging: ``conn_update`` / ``conn_update_many`` / UPD read ``ct_last_used``
  through a shared mmap (no syscall), ns of CLOCK_MONOTONIC -> seconds, the
  clock of ``time.monotonic()``; None if the fast path never hit the flow.
  A connection this provider does not hold raises ``ProviderError(ENOENT)``
  (UPD: ``op.err = ENOENT``).
- Lazy aging: the offload manager calls ``conn_update_many`` only for the
  connections whose conntrack deadline came (one mmap load each);
  ``stat(name)`` reads one program counter (``punt_fin_rst`` tells whether
  the teardown flag scan is worth running).
- Counters: ``fold_counters(ctxs | None)`` adds what each held connection's
  two entries counted since the previous fold to ``ctx.conn.pkts`` /
  ``.bytes`` (the last folded value per slot is kept; an entry whose counter
  went backwards was rewritten and counts from zero). Small sets are read
  one lookup per entry; all of them, or a set of at least 1/4 of the
  entries, in one lookup-batch walk. DEL takes its entries out with
  BPF_MAP_LOOKUP_AND_DELETE_ELEM as it reads them (final counts) where it
  would look them up, else it walks and then deletes in one batch. POLICY
  takes its entries out the same way (packets in the gap miss and take the
  slow path) before it writes them anew, counting from zero (and so does
  the folded base). FLUSH empties the maps with
  BPF_MAP_LOOKUP_AND_DELETE_BATCH and folds what it took out (lookup walk +
  delete batch on kernels without it). Where DEL walks, and on kernels
  before 5.14 (no lookup-and-delete of one element: DEL and POLICY read,
  then delete or overwrite), packets forwarded between the read and the
  delete or overwrite (microseconds) are not counted.
- Lifecycle: ``close()`` detaches every port and removes ``pin_dir`` unless
  ``keep=True``: then the program stays attached (XDP attachments made over
  netlink outlive the process) and the maps stay pinned, so traffic keeps
  flowing across a daemon restart. The next start with ``on_start="adopt"``
  reuses the pinned maps, atomically replaces the attached program and
  rebuilds the slot allocator and key index from the flow maps; adopted
  entries are *orphans* until a ``conn_add`` with the same keys claims them
  (slot and last-used kept). ``reap_orphans()`` deletes the unclaimed ones.
  ``on_start="flush"`` starts from empty maps instead. Pinned maps whose
  layout or size does not match this build are never adopted (warning, fresh
  maps).
- Kernel errors never escape as stray exceptions: hooks return errnos, and
  the other methods raise ``ProviderError``.
- Deployment note: a veth that receives redirected frames needs an XDP
  program on its peer or GRO enabled, else the kernel drops them silently.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxdp import bpfsys
from ctxdp.providers import xdp_layout as L
from ctxdp.providers.base import (
    PRIV_XDP,
    Batch,
    FlowDir,
    OffloadCtx,
    Op,
    OpKind,
    Provider,
    ProviderError,
)
from ctxdp.providers.keyindex import KeyIndex

try:  # the compiled common case of _add_run (ctxdp/providers/_fastadd.c)
    from ctxdp.providers import _fastadd as _FASTADD
except ImportError:  # not built (no compiler at install time): Python does it all
    _FASTADD = None

__all__ = ["BPF_DIR", "FlowRow", "XdpProvider"]

log = logging.getLogger(__name__)

#: Where bpf/ct_offload.c lives (the repository's bpf/ directory); override
#: with the CTXDP_BPF_DIR environment variable or the ``src`` argument.
BPF_DIR = Path(os.environ.get("CTXDP_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))

_PRIV = PRIV_XDP
_VS = L.VAL_SIZE
#: Key size of each family's flow map; a key's length tells its family.
_KS = {4: L.KEY4_SIZE, 6: L.KEY_SIZE}
_FAM_OF_KS = {L.KEY4_SIZE: 4, L.KEY_SIZE: 6}
# Flags of bpf_attach_xdp (include/uapi/linux/if_link.h XDP_FLAGS_*).
_XDP_FLAGS_SKB_MODE = 1 << 1
_XDP_FLAGS_DRV_MODE = 1 << 2
_MODE_FLAGS = {"native": _XDP_FLAGS_DRV_MODE, "generic": _XDP_FLAGS_SKB_MODE}
_BPF_FS_MAGIC = "bpf"

# Field positions inside a packed ct_flow_val seen as u32 / u64 arrays (used
# to pull one field out of a whole lookup-batch buffer with a strided slice).
_V32 = _VS // 4
_V64 = _VS // 8
_FLAGS_I = L.VAL_OFF["flags"] // 4
_SLOT_I = L.VAL_OFF["slot"] // 4
_CNT_Q = L.CNT_OFF // 8  # slot c: packets at _CNT_Q + 2c, bytes at _CNT_Q + 2c + 1


def _val_fields(vals, n: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(flags, slots, packets, bytes) of the first ``n`` ct_flow_vals of a
    buffer, packets / bytes summed over the per-CPU counter slots; strided
    slices, so no Python work per value."""
    mv = memoryview(vals)[: n * _VS]
    w, q = mv.cast("I"), mv.cast("Q")
    pk = q[_CNT_Q::_V64].tolist()
    by = q[_CNT_Q + 1 :: _V64].tolist()
    for c in range(1, L.CNT_SLOTS):
        o = _CNT_Q + 2 * c
        pk = list(map(int.__add__, pk, q[o::_V64].tolist()))
        by = list(map(int.__add__, by, q[o + 1 :: _V64].tolist()))
    return w[_FLAGS_I::_V32].tolist(), w[_SLOT_I::_V32].tolist(), pk, by


#: A map key as the indexes hold it: the packed key bytes of its family's map
#: (hashing 20 or 44 bytes is several times cheaper than hashing an
#: (ifindex, FlowTuple)); IPv4 and IPv6 keys differ in length, so never clash.
Key = bytes
_DUP = object()  # _prepare_special: the connection is already in this run


class _Held:
    """One connection's footprint in the map: its slot (whose keys the key
    index holds), its ctx (None for an orphan adopted from a previous run)
    and the ADD run (``gen``) that last wrote it. ``_fastadd`` makes them
    without calling ``__init__`` (it sets the three slots): keep
    ``__init__`` to that."""

    __slots__ = ("slot", "ctx", "gen")

    def __init__(self, slot: int, ctx: OffloadCtx | None, gen: int = 0) -> None:
        self.slot = slot
        self.ctx = ctx
        self.gen = gen


if _FASTADD is not None:
    _FASTADD.bind(Op, OffloadCtx, FlowDir, _Held)


class _Job:
    """A chunk [lo, hi) of a _Pending handed to the native writer; ``result()``
    is what ``XdpProvider._push`` returns for it (waited for once, kept)."""

    __slots__ = ("prov", "p", "lo", "hi", "job", "res")

    def __init__(self, prov: XdpProvider, p: _Pending, lo: int, hi: int, job: int) -> None:
        self.prov, self.p, self.lo, self.hi, self.job = prov, p, lo, hi, job
        self.res: list[tuple[int, int, bool]] | None = None

    def result(self) -> list[tuple[int, int, bool]]:
        if self.res is None:
            done, err = self.prov._writer.wait(self.job)
            # A shortfall is redone by the Python path from the entry that
            # failed: it meets the same error and handles it as always (an
            # unsupported batch command included).
            self.res = self.prov._push(self.p, self.lo, self.hi, done) if err else []
        return self.res


class _Pending:
    """One family's share of an ADD run: ops in buffer order (op i owns the
    keys at ``kbuf[i * 2 * key size:]`` and the values at
    ``vbuf[i * 2 * VAL_SIZE:]``), keys a rewrite or claim replaces (by op
    index), and the writes under way (futures or failure lists)."""

    __slots__ = ("fam", "written", "kbuf", "vbuf", "olds", "pushes", "pushed")

    def __init__(self, fam: int, kbuf: bytearray, vbuf: bytearray) -> None:
        self.fam = fam
        self.written: list[Op] = []
        self.kbuf = kbuf
        self.vbuf = vbuf
        self.olds: dict[int, tuple] = {}
        self.pushes: list[Any] = []
        self.pushed = 0  # ops [0, pushed) are handed to the kernel already


@dataclass(slots=True, frozen=True)
class FlowRow:
    """One flow-map entry as ``flows()`` reports it (``dir``: 0 orig, 1 reply,
    -1 orphan)."""

    ifindex: int
    match: Any  # FlowTuple
    val: L.FlowVal
    ctx: OffloadCtx | None
    dir: int


def _batch_unsupported(exc: bpfsys.BatchError, count: int) -> bool:
    """Whether a batch command failed because the kernel lacks it (pre-5.6).

    An unknown bpf(2) command is EINVAL before the kernel touches
    attr.batch.count, which bpfsys reports as ``done == 0`` (``count`` is
    still accepted, as a test double may report it); a real failure part way
    reports how many entries went in.
    """
    return exc.errno == errno.EINVAL and exc.done in (0, count)


def _errno_of(exc: BaseException) -> int:
    return getattr(exc, "errno", None) or errno.EIO


def _bpffs_mount_of(path: str) -> str | None:
    """The fstype of the mount holding ``path`` (longest mount-point prefix)."""
    best, fstype = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return None
    return fstype


class XdpProvider(Provider):
    """bcc-backed XDP fast path; see the module contract."""

    name = "xdp"

    def __init__(
        self,
        ports: Iterable[str | int],
        *,
        mode: str = "auto",
        max_conns: int = 65536,
        pin_dir: str = "/sys/fs/bpf/ctxdp",
        keep: bool = False,
        on_start: str = "adopt",
        src: str | os.PathLike[str] | None = None,
        cflags: Iterable[str] = (),
    ) -> None:
        if mode not in ("auto", "native", "generic"):
            raise ValueError(f"mode must be auto, native or generic, not {mode!r}")
        if on_start not in ("adopt", "flush"):
            raise ValueError(f"on_start must be adopt or flush, not {on_start!r}")
        if max_conns < 1:
            raise ValueError("max_conns must be positive")
        self.ports = list(ports)
        self.mode = mode
        self.max_conns = max_conns
        self.pin_dir = os.path.abspath(pin_dir)
        self.keep = keep
        self.on_start = on_start
        self.src = Path(src) if src is not None else BPF_DIR / "ct_offload.c"
        self.cflags = list(cflags)
        self.attached: dict[str, str] = {}  # port name -> "native" / "generic"
        self.ifindexes: dict[str, int] = {}
        self.init_error: ProviderError | None = None
        self._bpf: Any = None
        self._fn: Any = None
        self._flows: dict[int, int] = {}  # family -> flow map fd
        self._stats_fd = -1
        self._tx_fd = -1
        self._lu_mmap: Any = None
        self._lu: memoryview | None = None  # ct_last_used as u64[max_conns]
        # Per slot: the (orig pkts, reply pkts, orig bytes, reply bytes) of
        # its entries already added to the conn (fold_counters); dropped when
        # the slot is freed, so absent = nothing folded yet.
        self._folded: dict[int, tuple[int, int, int, int]] = {}
        self._idx: Any = None  # KeyIndex for max_conns slots, made at start
        # ADD runs' key and value buffers, per family (grown, never shrunk)
        self._kbufs = {4: bytearray(), 6: bytearray()}
        self._vbufs = {4: bytearray(), 6: bytearray()}
        self._by_slot: list[_Held | None] = []
        # Free slots, as int objects made once at start and handed back on
        # release: a connection's slot then costs no allocation on install.
        self._free: list[int] = []
        self._n_held = 0
        self._n_orphans = 0
        self._has_batch = True
        self._has_del_batch = True
        self._has_lookup_del_batch = True
        self._has_lookup_del_elem = True
        self._gen = 0
        self._pool: ThreadPoolExecutor | None = None
        self._writer: Any = None  # _fastadd.Writer, made on first use
        self._inflight: list[_Job] = []  # its jobs of the current ADD run
        self._pins_before: set[str] = set()
        self._c = dict.fromkeys(
            (
                "adds",
                "add_errors",
                "rewrites",
                "dels",
                "del_unknown",
                "policies",
                "enospc",
                "eexist",
                "eagain",
                "rollbacks",
                "adopted",
                "claimed",
                "orphans_reaped",
                "flushes",
                "teardowns_flagged",
            ),
            0,
        )

    # --- lifecycle ---------------------------------------------------------

    def init(self) -> int:
        """``start()`` for the offload manager: 0 or the errno (logged)."""
        try:
            self.start()
        except ProviderError as exc:
            self.init_error = exc
            log.error("xdp provider: %s", exc)
            return exc.errno or errno.EIO
        return 0

    @property
    def started(self) -> bool:
        return self._bpf is not None

    def start(self) -> None:
        """Load, adopt/flush, attach; undo everything on failure (see contract)."""
        if self._bpf is not None:
            return
        try:
            self._check_bpffs()
            self._prepare_pins()
            self._load()
            self._open_maps()
            if self.on_start == "adopt":
                self._adopt()
            else:
                self._flush_map()
            self._attach_all()
            self._fill_tx_ports()
        except ProviderError:
            self._undo_start()
            raise
        except Exception as exc:  # bcc raises bare Exception; make it ours
            self._undo_start()
            raise ProviderError(_errno_of(exc), f"xdp start failed: {exc}") from exc

    def close(self) -> None:
        """Detach and unpin (unless ``keep``); release fds. Idempotent."""
        if self._bpf is None:
            return
        if not self.keep:
            self._detach_all()
        self._release()
        if not self.keep:
            self._unpin(only_new=False)

    def _undo_start(self) -> None:
        self._detach_all()
        self._release()
        self._unpin(only_new=True)

    def _check_bpffs(self) -> None:
        # Pinning needs a bpf filesystem; scripts/setup.sh mounts it, and
        # mounting is a host decision the provider must not make on its own.
        if _bpffs_mount_of(self.pin_dir) != _BPF_FS_MAGIC:
            raise ProviderError(
                errno.ENOENT,
                f"{self.pin_dir} is not on a bpf filesystem: run "
                "`mount -t bpf bpf /sys/fs/bpf` (scripts/setup.sh does this)",
            )
        try:
            os.makedirs(self.pin_dir, exist_ok=True)
        except OSError as exc:
            raise ProviderError(
                exc.errno or errno.EIO, f"cannot create {self.pin_dir}: {exc}"
            ) from exc

    def _pinned(self) -> set[str]:
        try:
            return set(os.listdir(self.pin_dir))
        except OSError:
            return set()

    def _expected_maps(self) -> dict[str, tuple[int, int, int, int]]:
        """name -> (map type, key size, value size, max_entries) this build needs."""
        t = bpfsys.MAP_TYPE
        return {
            L.MAP_OF[4]: (t["hash"], L.KEY4_SIZE, L.VAL_SIZE, 2 * self.max_conns),
            L.MAP_OF[6]: (t["hash"], L.KEY_SIZE, L.VAL_SIZE, 2 * self.max_conns),
            "ct_last_used": (t["array"], 4, 8, self.max_conns),
            "ct_stats": (t["percpu_array"], 4, 8, len(L.CT_STAT_NAMES)),
            "ct_tx_ports": (t["devmap_hash"], 4, 4, L.CT_MAX_PORTS),
        }

    def _prepare_pins(self) -> None:
        """Make ``pin_dir`` hold exactly what bcc should adopt, then pin ct_tx_ports.

        bcc adopts whatever is pinned at a BPF_TABLE_PINNED path without
        checking its type or sizes, so a map pinned by a build with another
        CT_MAX_CONNS or layout would silently be used with the wrong bounds:
        such pins are dropped (all of them: the maps only make sense
        together), and so is a directory holding a map this build does not
        know (e.g. the single ``ct_flows`` of builds before the per-family
        maps). ``flush`` drops every pin, so bcc creates fresh maps; an
        earlier program still attached keeps its own maps until replaced.
        bcc 0.26 cannot declare a DEVMAP_HASH, so ct_tx_ports is created
        here with bpf(2) and pinned for the program to adopt (ct_offload.c).
        """
        names = self._pinned()
        expected = self._expected_maps()
        stale = self.on_start == "flush" and bool(names)
        unknown = sorted(names - set(expected))
        if unknown and not stale:
            log.warning(
                "xdp: %s pins %s this build does not use: starting from fresh maps",
                self.pin_dir,
                unknown,
            )
            stale = True
        if not stale:
            for name, want in expected.items():
                if name not in names:
                    continue
                try:
                    fd = bpfsys.obj_get(os.path.join(self.pin_dir, name))
                    try:
                        info = bpfsys.map_info(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("xdp: pinned %s unreadable (%s): not adopting", name, exc)
                    stale = True
                    continue
                have = (info.type, info.key_size, info.value_size, info.max_entries)
                if have != want:
                    log.warning(
                        "xdp: pinned %s is (type, key, value, max) %s, this build needs %s: "
                        "starting from fresh maps",
                        name,
                        have,
                        want,
                    )
                    stale = True
        if stale:
            for n in names:
                try:
                    os.unlink(os.path.join(self.pin_dir, n))
                except OSError:
                    pass
        self._pins_before = self._pinned()
        if "ct_tx_ports" not in self._pins_before:
            _t, ks, vs, n = expected["ct_tx_ports"]
            try:
                fd = bpfsys.map_create("devmap_hash", ks, vs, n, name="ct_tx_ports")
                try:
                    bpfsys.obj_pin(fd, os.path.join(self.pin_dir, "ct_tx_ports"))
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ProviderError(_errno_of(exc), f"creating ct_tx_ports: {exc}") from exc

    def _unpin(self, *, only_new: bool) -> None:
        for n in self._pinned():
            if only_new and n in self._pins_before:
                continue
            try:
                os.unlink(os.path.join(self.pin_dir, n))
            except OSError:
                pass
        try:
            os.rmdir(self.pin_dir)
        except OSError:
            pass  # not empty (kept pins) or already gone

    def _load(self) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - bcc is only needed once started
        except ImportError as exc:
            raise ProviderError(errno.ENOSYS, f"bcc is not importable: {exc}") from exc
        cflags = [
            f"-DCT_MAX_CONNS={self.max_conns}",
            f'-DCT_PIN_DIR="{self.pin_dir}"',
            f"-I{self.src.parent}",
            *L.cflags(),  # per-CPU counter slots: the value size xdp_layout packs
            *self.cflags,
        ]
        try:
            self._bpf = BPF(src_file=os.fsencode(self.src), cflags=cflags)
            self._fn = self._bpf.load_func(b"ct_offload_xdp", BPF.XDP)
        except Exception as exc:
            raise ProviderError(errno.EINVAL, f"loading {self.src} failed: {exc}") from exc

    def _open_maps(self) -> None:
        b = self._bpf
        self._flows = {fam: b[name.encode()].map_fd for fam, name in L.MAP_OF.items()}
        self._stats_fd = b[b"ct_stats"].map_fd
        self._tx_fd = b[b"ct_tx_ports"].map_fd
        lu_fd = b[b"ct_last_used"].map_fd
        info = bpfsys.map_info(lu_fd)
        if info.max_entries != self.max_conns or not info.flags & bpfsys.BPF_F_MMAPABLE:
            raise ProviderError(
                errno.EINVAL, f"ct_last_used is not what this build expects: {info}"
            )
        # The mmap shares the array's pages with the program: reading a
        # stamp is a memory load, which is what makes aging 1M flows cheap.
        self._lu_mmap = bpfsys.mmap_array(lu_fd, 8, self.max_conns)
        self._lu = memoryview(self._lu_mmap).cast("Q")
        self._folded = {}
        self._by_slot = [None] * self.max_conns
        self._free = list(range(self.max_conns - 1, -1, -1))
        try:
            self._idx = KeyIndex(self.max_conns)
        except OSError as exc:
            msg = f"key index for {self.max_conns} slots: {exc}"
            raise ProviderError(_errno_of(exc), msg) from exc

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lu is not None:
            self._lu.release()
            self._lu = None
        if self._lu_mmap is not None:
            self._lu_mmap.close()
            self._lu_mmap = None
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            except Exception as exc:  # closing fds must not hide the real error
                log.warning("xdp: bcc cleanup: %s", exc)
        self._bpf = self._fn = None
        self._flows = {}
        self._stats_fd = self._tx_fd = -1
        for h in self._by_slot:
            if h is not None and h.ctx is not None:
                h.ctx.priv[_PRIV] = None
        self._idx = None
        self._by_slot = []
        self._folded = {}
        self._free = []
        self._n_held = self._n_orphans = 0

    # --- attaching -----------------------------------------------------------

    def _port(self, p: str | int) -> tuple[str, int]:
        try:
            if isinstance(p, int):
                return socket.if_indextoname(p), p
            return p, socket.if_nametoindex(p)
        except OSError as exc:
            raise ProviderError(errno.ENODEV, f"no such port {p!r}") from exc

    def _xdp_set(self, name: str, fd: int, flags: int) -> int:
        """bpf_attach_xdp over netlink; returns 0 or errno (never raises)."""
        from bcc.libbcc import lib  # noqa: PLC0415

        ctypes.set_errno(0)
        res = lib.bpf_attach_xdp(name.encode(), fd, flags)
        if res < 0:
            return ctypes.get_errno() or errno.EIO
        return 0

    def _attach_one(self, name: str, mode: str) -> int:
        flags = _MODE_FLAGS[mode]
        err = self._xdp_set(name, self._fn.fd, flags)
        if err == errno.EEXIST:
            # A program left attached in the OTHER mode by an earlier run
            # (keep=True): native and generic cannot coexist, so drop it.
            other = _MODE_FLAGS["generic" if mode == "native" else "native"]
            self._xdp_set(name, -1, other)
            err = self._xdp_set(name, self._fn.fd, flags)
        return err

    def _attach_all(self) -> None:
        for p in self.ports:
            name, ifindex = self._port(p)
            modes = ["native", "generic"] if self.mode == "auto" else [self.mode]
            err = 0
            for m in modes:
                err = self._attach_one(name, m)
                if not err:
                    if m == "generic" and self.mode == "auto":
                        log.warning("xdp: native attach to %s refused, using generic mode", name)
                    self.attached[name] = m
                    self.ifindexes[name] = ifindex
                    break
                last = m
            else:
                raise ProviderError(
                    err, f"attaching XDP ({last}) to {name} failed: {os.strerror(err)}"
                )

    def _detach_all(self) -> None:
        for name, m in list(self.attached.items()):
            err = self._xdp_set(name, -1, _MODE_FLAGS[m])
            if err and err != errno.ENODEV:
                log.warning("xdp: detaching from %s: %s", name, os.strerror(err))
            del self.attached[name]

    def _fill_tx_ports(self) -> None:
        # ct_tx_ports is the devmap the program redirects through, keyed by
        # egress ifindex: only ports listed here can be redirected to. A
        # pinned map may still list ports of an earlier run: drop those.
        want = {struct.pack("=I", i) for i in self.ifindexes.values()}
        try:
            k = bpfsys.map_get_next_key(self._tx_fd, None, 4)
            while k is not None:
                nxt = bpfsys.map_get_next_key(self._tx_fd, k, 4)
                if k not in want:
                    bpfsys.map_delete(self._tx_fd, k)
                k = nxt
            for k in want:
                bpfsys.map_update(self._tx_fd, k, k)
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"filling ct_tx_ports: {exc}") from exc

    # --- adopt / flush ---------------------------------------------------------

    def _scan(self, fam: int):
        """Yield (keys, vals, n) chunks of the whole flow map of ``fam``."""
        return bpfsys.map_lookup_batch(self._flows[fam], _KS[fam], _VS, chunk=8192)

    def _adopt(self) -> None:
        """Rebuild the slot allocator and key index from what is pinned."""
        by_slot: dict[int, list[Key]] = {}
        bad: list[Key] = []
        for fam in self._flows:
            ks = _KS[fam]
            for keys, vals, n in self._scan(fam):
                slots = memoryview(vals)[: n * _VS].cast("I")[_SLOT_I::_V32].tolist()
                for i, s in enumerate(slots):
                    k = bytes(keys[i * ks : (i + 1) * ks])
                    if s >= self.max_conns:
                        bad.append(k)
                    else:
                        by_slot.setdefault(s, []).append(k)
        used: set[int] = set()
        for s, ks in by_slot.items():
            if len(ks) > 2 or len({len(k) for k in ks}) > 1:
                bad.extend(ks)  # never written by us: not one connection's pair
                continue
            # Distinct (a map's keys are) and of one length (checked above).
            self._idx.put(s, ks)
            self._by_slot[s] = _Held(s, None)
            used.add(s)
        self._n_orphans = len(used)
        if bad:
            self._delete(bad)
        self._free = [s for s in range(self.max_conns - 1, -1, -1) if s not in used]
        self._c["adopted"] += self._n_orphans
        if self._n_orphans:
            log.info("xdp: adopted %d offloaded connections from %s", self._n_orphans, self.pin_dir)

    def _flush_map(self) -> int:
        """Delete every entry of both flow maps (ours or not), folding the
        counters of held connections first; returns how many entries went."""
        done = 0
        for fam in self._flows:
            ks, fd = _KS[fam], self._flows[fam]
            if self._has_lookup_del_batch:
                try:
                    cur: dict[int, list[int]] = {}
                    for keys, vals, n in bpfsys.map_lookup_and_delete_batch(
                            fd, ks, _VS, chunk=8192):
                        self._collect(cur, keys, ks, vals, n)
                        done += n
                    self._fold_into(cur)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                        raise
                    self._has_lookup_del_batch = False
                    log.info("xdp: no BPF_MAP_LOOKUP_AND_DELETE_BATCH, walking then deleting")
            cur = {}
            chunks = []
            for kb, vb, n in self._scan(fam):
                self._collect(cur, kb, ks, vb, n)
                chunks.append(bytes(kb[: n * ks]))
            self._fold_into(cur)
            done += self._delete_raw(fam, b"".join(chunks))
        return done

    def _delete(self, keys: list[Key]) -> int:
        """Delete the entries of ``keys`` (either family); absent ones are skipped."""
        if not keys:
            return 0
        k4 = [k for k in keys if len(k) == L.KEY4_SIZE]
        if len(k4) == len(keys):
            return self._delete_raw(4, b"".join(keys))
        k6 = [k for k in keys if len(k) != L.KEY4_SIZE]
        return self._delete_raw(4, b"".join(k4)) + self._delete_raw(6, b"".join(k6))

    def _delete_raw(self, fam: int, buf) -> int:
        ks, fd = _KS[fam], self._flows[fam]
        n = len(buf) // ks
        if not n:
            return 0
        if self._has_del_batch:
            try:
                return bpfsys.map_delete_batch(fd, buf, n, key_size=ks, ignore_missing=True)
            except bpfsys.BatchError as exc:
                if not _batch_unsupported(exc, n):
                    raise
                self._has_del_batch = False
                log.info("xdp: no BPF_MAP_DELETE_BATCH, using single deletes")
        mv = memoryview(buf)
        return sum(bpfsys.map_delete(fd, mv[i * ks : (i + 1) * ks]) for i in range(n))

    def reap_orphans(self) -> int:
        """Delete adopted entries no conn_add claimed; returns connections reaped."""
        orphans = [h for h in self._by_slot if h is not None and h.ctx is None]
        try:
            self._delete([k for h in orphans for k in self._idx.keys(h.slot)])
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"reaping orphans: {exc}") from exc
        for h in orphans:
            self._forget(h)
        self._c["orphans_reaped"] += len(orphans)
        return len(orphans)

    # --- slot / index bookkeeping ----------------------------------------------------

    def _owner_of(self, k: Key) -> _Held | None:
        """The holder of map key ``k``, or None."""
        ref = self._idx.find(k)
        return None if ref < 0 else self._by_slot[ref >> 1]

    def _keys(self, h: _Held) -> tuple[Key, ...]:
        """The map keys ``h`` holds (dir order)."""
        return self._idx.keys(h.slot)

    def _forget(self, h: _Held) -> None:
        """Drop ``h`` from every index and free its slot (no kernel call)."""
        if self._by_slot and self._by_slot[h.slot] is h:
            self._idx.drop(h.slot)
            self._by_slot[h.slot] = None
            self._free.append(h.slot)
            self._folded.pop(h.slot, None)
        if h.ctx is None:
            self._n_orphans -= 1
        else:
            self._n_held -= 1
            if h.ctx.priv[_PRIV] is h:
                h.ctx.priv[_PRIV] = None

    def _reap(self, o: _Held) -> None:
        """Remove an orphan now (its keys collide with a new connection's)."""
        self._delete(list(self._keys(o)))
        self._forget(o)
        self._c["orphans_reaped"] += 1

    def _prepare_special(
        self, ctx: OffloadCtx, held: _Held | None, k0: Key, k1: Key, o0: Any, o1: Any
    ) -> Any:
        """The uncommon ADD cases: rewrite of a held connection, claim of an
        adopted orphan, key owned by someone else, same connection twice in
        one run. Returns an errno, ``_DUP``, or (holder, undo info)."""
        if held is not None and held.gen == self._gen:
            return _DUP
        if k0 == k1:
            return errno.EINVAL
        claim = None
        for o in (o0, o1):
            if o is None or o is held:
                continue
            if o.ctx is not None:
                self._c["eexist"] += 1
                return errno.EEXIST
            if claim is None and held is None:
                claim = o
            elif o is not claim:
                self._reap(o)
        idx = self._idx
        if held is not None:  # rewrite in place: same slot, last-used kept
            old = idx.keys(held.slot)
            idx.put(held.slot, (k0, k1))
            # The value written counts from zero: what was folded before is
            # no base for it (a base read after the write would drop what
            # the entry forwarded in between).
            self._folded.pop(held.slot, None)
            held.gen = self._gen
            self._c["rewrites"] += 1
            return held, old
        if claim is not None:  # an orphan of the previous run becomes ctx
            self._n_orphans -= 1
            self._c["claimed"] += 1
            old = idx.keys(claim.slot)
            slot = claim.slot
        else:
            if not self._free:
                self._c["enospc"] += 1
                return errno.ENOSPC
            old = ()
            slot = self._free.pop()
            self._lu[slot] = 0  # type: ignore[index]
        h = _Held(slot, ctx, self._gen)
        idx.put(slot, (k0, k1))  # the claimed orphan's keys are released here
        self._by_slot[slot] = h
        ctx.priv[_PRIV] = h
        self._n_held += 1
        self._c["adds"] += 1
        return h, old

    # --- the hooks ---------------------------------------------------------------------

    def _not_started(self) -> int:
        return errno.ENODEV

    def conn_add(self, ctx: OffloadCtx) -> int:
        if self._bpf is None:
            return self._not_started()
        op = Op(OpKind.ADD, ctx)
        self._add_run([op])
        return op.err

    def conn_policy(self, ctx: OffloadCtx) -> int:
        """Rewrite both entries from ``ctx.dirs`` (MAC or route changed)."""
        if self._bpf is None:
            return self._not_started()
        if ctx.priv[_PRIV] is None:
            return errno.ENOENT
        self._c["policies"] += 1
        op = Op(OpKind.ADD, ctx)
        self._rewrite([op])
        return op.err

    def conn_del(self, ctx: OffloadCtx) -> int:
        if self._bpf is None:
            return self._not_started()
        op = Op(OpKind.DEL, ctx)
        self._del_run([op])
        return op.err

    def conn_established(self, ctx: OffloadCtx) -> int:
        return 0

    def conn_update(self, ctx: OffloadCtx) -> float | None:
        h = ctx.priv[_PRIV]
        if h is None or self._lu is None:
            raise ProviderError(errno.ENOENT, "connection not offloaded to xdp")
        ns = self._lu[h.slot]
        return ns / 1e9 if ns else None

    def conn_update_many(self, ctxs: Iterable[OffloadCtx]) -> list[float | None]:
        lu = self._lu
        if lu is None:
            raise ProviderError(errno.ENODEV, "xdp provider not started")
        try:
            return [v / 1e9 if (v := lu[c.priv[_PRIV].slot]) else None for c in ctxs]
        except KeyError:
            raise ProviderError(errno.ENOENT, "connection not offloaded to xdp") from None

    #: fold_counters / DEL read a set of connections with one lookup-batch
    #: walk of the maps instead of one lookup per entry once the set has at
    #: least this share of the map's entries. Measured here: a lookup through
    #: map_lookup_many 1.55 us per key, a walk 0.32 us per entry in the
    #: kernel plus the slot match in Python (``_read``); a quarter keeps
    #: the walk to the sets it clearly wins for.
    WALK_SHARE = 0.25

    def fold_counters(self, ctxs: Iterable[OffloadCtx] | None = None) -> int:
        """Fold the counters of ``ctxs`` (None: every held connection) into
        their conns; see the module contract. Returns connections folded."""
        if self._bpf is None:
            return 0
        if ctxs is None:
            hs = [h for h in self._by_slot if h is not None and h.ctx is not None]
        else:
            hs = []
            for ctx in ctxs:
                h = ctx.priv[_PRIV]
                if h is not None and h.ctx is ctx:
                    hs.append(h)
        try:
            return self._fold(hs, walk=ctxs is None)
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"reading flow counters: {exc}") from exc

    def _fold(self, hs: list[_Held], *, walk: bool = False) -> int:
        """Add what the entries of ``hs`` counted since the last fold to their
        conns."""
        return self._fold_into(self._read(hs, walk=walk))

    def _take_fold(self, hs: list[_Held]) -> bool:
        """Take the entries of ``hs`` out of the maps and fold their final
        counts; False, having done nothing, on a kernel without
        BPF_MAP_LOOKUP_AND_DELETE_ELEM for hash maps (< 5.14: EINVAL or
        ENOTSUPP on the first key), which is remembered."""
        if not self._has_lookup_del_elem:
            return False
        try:
            cur = self._read(hs, take=True)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                raise
            self._has_lookup_del_elem = False
            log.info("xdp: no BPF_MAP_LOOKUP_AND_DELETE_ELEM: counters are read, then "
                     "the entries deleted or overwritten")
            return False
        self._fold_into(cur)
        return True

    def _walks(self, hs: list[_Held]) -> bool:
        """Whether reading the entries of ``hs`` takes one walk of the maps
        (see WALK_SHARE) rather than a lookup per entry."""
        return 2 * len(hs) >= self.WALK_SHARE * 2 * (self._n_held + self._n_orphans)

    def _read(self, hs: list[_Held], *, walk: bool = False,
              take: bool = False) -> dict[int, list[int]]:
        """slot -> [orig pkts, reply pkts, orig bytes, reply bytes] of the
        entries of ``hs``: lookups, or one walk when they are many (a missing
        entry counts zero). ``take``: lookups that delete each entry as they
        read it (never a walk)."""
        cur: dict[int, list[int]] = {}
        if not hs:
            return cur
        if not take and (walk or self._walks(hs)):
            want = {h.slot for h in hs}
            for keys, ks, _f, slots, pk, by, _n in self._scan_fields():
                for i, slot in enumerate(slots):
                    if slot in want:
                        self._count_entry(cur, keys, ks, i, slot, pk[i], by[i])
            return cur
        for h in hs:
            cur[h.slot] = [0, 0, 0, 0]
        keys_of = self._idx.keys
        for fam, fd in self._flows.items():
            ks = _KS[fam]
            sel = [(h.slot, d, k) for h in hs for d, k in enumerate(keys_of(h.slot))
                   if len(k) == ks]
            if not sel:
                continue
            vals, found = bpfsys.map_lookup_many(
                fd, b"".join(k for _s, _d, k in sel), len(sel), ks, _VS, delete=take)
            _f, _s, pk, by = _val_fields(vals, len(sel))
            for j, (slot, d, _k) in enumerate(sel):
                if found[j]:
                    row = cur[slot]
                    row[d], row[2 + d] = pk[j], by[j]
        return cur

    def _collect(self, cur: dict[int, list[int]], keys, ks: int, vals, n: int) -> None:
        """Counters of the held connections in one chunk of entries taken out
        of a flow map into ``cur`` (slot -> [pk0, pk1, by0, by1])."""
        _f, slots, pk, by = _val_fields(vals, n)
        for i, slot in enumerate(slots):
            self._count_entry(cur, keys, ks, i, slot, pk[i], by[i])

    def _count_entry(self, cur: dict[int, list[int]], keys, ks: int, i: int, slot: int,
                     pk: int, by: int) -> None:
        """Put entry ``i`` of a chunk into its held connection's row of ``cur``."""
        h, d = self._holder_dir(keys, ks, i, slot)
        if h is not None and h.ctx is not None:
            row = cur.setdefault(slot, [0, 0, 0, 0])
            row[d], row[2 + d] = pk, by

    def _fold_into(self, cur: dict[int, list[int]]) -> int:
        """Add ``cur`` (slot -> counters now) minus what was folded before to
        each slot's conn; remember ``cur`` as folded."""
        folded, by_slot = self._folded, self._by_slot
        n = 0
        for s, row in cur.items():
            h = by_slot[s]
            if h is None or h.ctx is None:
                continue
            conn = h.ctx.conn
            old = folded.get(s)
            folded[s] = (row[0], row[1], row[2], row[3])
            n += 1
            if conn is None:  # a bare ctx (tests): remembered, nothing to add to
                continue
            for d in (0, 1):
                pk, by = row[d], row[2 + d]
                if old is not None and pk >= old[d] and by >= old[2 + d]:
                    pk -= old[d]
                    by -= old[2 + d]
                # else: never folded, or the entry was rewritten (counts restarted)
                conn.pkts[d] += pk
                conn.bytes[d] += by
        return n

    def stat(self, name: str) -> int:
        """One program counter of ``ct_stats`` summed over CPUs (0 if not started)."""
        if self._bpf is None:
            return 0
        ncpu = bpfsys.num_possible_cpus()
        try:
            raw = bpfsys.map_lookup(self._stats_fd, struct.pack("=I", L.STAT[name]), 8 * ncpu)
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"reading ct_stats: {exc}") from exc
        return sum(struct.unpack(f"={ncpu}Q", raw)) if raw else 0

    def flush(self) -> int:
        """Delete every entry of both flow maps and forget every connection."""
        if self._bpf is None:
            return self._not_started()
        try:
            self._flush_map()
        except OSError as exc:
            return _errno_of(exc)
        for h in [h for h in self._by_slot if h is not None]:
            self._forget(h)
        self._c["flushes"] += 1
        return 0

    def batch_submit(self, batch: Batch) -> None:
        """Run ``batch`` in order; consecutive ADDs / DELs share one syscall."""
        ops = batch.ops
        i, n = 0, len(ops)
        while i < n:
            kind = ops[i].kind
            j = i + 1
            while j < n and ops[j].kind is kind:
                j += 1
            run = ops[i:j] if i or j < n else ops
            if self._bpf is None:
                for op in run:
                    op.err = self._not_started()
            elif kind is OpKind.ADD:
                self._add_run(run)
            elif kind is OpKind.DEL:
                self._del_run(run)
            elif kind is OpKind.UPD:
                self._upd_run(run)
            elif kind is OpKind.POLICY:  # rewrites of held connections, one syscall
                held = []
                for op in run:
                    if op.ctx.priv[_PRIV] is None:  # type: ignore[union-attr]
                        op.err = errno.ENOENT
                    else:
                        held.append(op)
                self._c["policies"] += len(held)
                if held:
                    self._rewrite(held)
            elif kind is OpKind.EST:
                for op in run:
                    op.err = 0
            elif kind is OpKind.FLUSH:
                for op in run:
                    op.err = self.flush()
            else:  # pragma: no cover - OpKind is closed
                for op in run:
                    op.err = errno.EOPNOTSUPP
            i = j

    def _rewrite(self, run: list[Op]) -> None:
        """POLICY: rewrite held connections (an ADD run). The value written
        counts from zero, so the entries' counters are folded first, and
        taken out of the map as they are read (``_read(take=True)``): the
        counts folded are final, and a packet that arrives before the new
        entries are in misses and goes to the slow path, which forwards it
        and counts it. Read-then-overwrite loses what the fast path forwards
        in between: microseconds, but tens of packets of a full-speed
        transfer if the daemon is descheduled there. Kernels before 5.14 have no
        lookup-and-delete: there the counters are read and then overwritten.
        The rewrite drops the folded base (the next fold adds all since)."""
        hs = [op.ctx.priv[_PRIV] for op in run]  # type: ignore[union-attr]
        try:
            if not self._take_fold(hs):
                self._fold(hs)
        except OSError as exc:
            log.warning("xdp: folding counters before a rewrite: %s", exc)
        self._add_run(run)

    def _upd_run(self, run: list[Op]) -> None:
        lu = self._lu
        for op in run:
            h = op.ctx.priv[_PRIV]  # type: ignore[union-attr]
            if h is None:
                op.err = errno.ENOENT
                op.result = None
            else:
                v = lu[h.slot]  # type: ignore[index]
                op.err = 0
                op.result = v / 1e9 if v else None

    #: ADD runs at least twice this long are written in chunks of this size
    #: by a helper thread while the caller packs the next chunk, so kernel
    #: inserts (about half a microsecond per entry) overlap the packing.
    PIPELINE_CHUNK = 8192
    #: With the native writer (``_fastadd.Writer``: no GIL hand-over per
    #: chunk) runs of at least twice this many connections are pipelined
    #: too, in chunks of a fifth of the run (at least this many); the caller
    #: writes the last one itself while the writer finishes the others.
    PIPELINE_MIN = 32
    #: Use the compiled common case of ADD runs when it is built (tests and
    #: bench/xdp_cost.py turn it off to compare with the Python path).
    compiled_add = True

    def _add_run(self, run: list[Op]) -> None:
        """``_add_run_`` and, whatever happens in it, no native-writer job left
        holding a buffer of this run."""
        try:
            self._add_run_(run)
        finally:
            for job in self._inflight:
                if job.res is None:  # only if the run raised: settle already waited
                    self._writer.wait(job.job)
            self._inflight.clear()

    def _add_run_(self, run: list[Op]) -> None:
        """Index, pack and write a run of ADDs (one update-batch per family and
        chunk).

        The common case (a new connection whose keys nobody owns) is what
        the batched install rate rests on: ``_fastadd.add_new`` (compiled)
        does it for as many consecutive ops as it can, and every op it stops
        at goes through ``one`` below, the Python definition of every case
        (and the whole loop when the extension is not built). Keys serve as
        index keys as they are and are joined into the kernel's buffer per
        chunk; values are packed straight into a per-family buffer kept
        across runs. Index changes are made optimistically and undone for the
        connections the kernel refused, so every op ends either fully
        installed or absent.
        """
        self._gen += 1
        gen = self._gen
        idx, free, lu, by_slot = self._idx, self._free, self._lu, self._by_slot
        find, put, owner_of = idx.find, idx.put, self._owner_of
        entries = L.conn_entries_into
        special = self._prepare_special
        fast = _FASTADD.add_new if _FASTADD is not None and self.compiled_add else None
        n = len(run)
        if fast is not None and self._has_batch and n >= 2 * self.PIPELINE_MIN:
            chunk = min(self.PIPELINE_CHUNK, max(self.PIPELINE_MIN, -(-n // 5)))
            if self._writer is None:
                self._writer = _FASTADD.Writer()
            self._writer.wake()  # its wake-up passes while the first chunk is packed
        else:
            chunk = self.PIPELINE_CHUNK if n >= 2 * self.PIPELINE_CHUNK else 0
        vs2 = 2 * _VS
        for fam, buf in self._vbufs.items():  # grown, never shrunk: no refill per run
            if len(buf) < vs2 * len(run):
                self._vbufs[fam] = bytearray(vs2 * len(run))
            if len(self._kbufs[fam]) < 2 * _KS[fam] * len(run):
                self._kbufs[fam] = bytearray(2 * _KS[fam] * len(run))
        p4 = _Pending(4, self._kbufs[4], self._vbufs[4])
        p6 = _Pending(6, self._kbufs[6], self._vbufs[6])
        dups: list[tuple[Op, Op]] = []
        counts = [0, 0]  # new connections, EAGAIN
        EAGAIN, PRIV, KS4 = errno.EAGAIN, _PRIV, L.KEY4_SIZE  # noqa: N806 - hoisted constants

        def one(op: Op) -> _Pending | None:
            """Install one op the Python way; the family's _Pending if it was
            written, None when its errno is set (or it is a duplicate)."""
            ctx = op.ctx
            d0, d1 = ctx.dirs  # type: ignore[union-attr]
            if (
                d0 is None
                or d1 is None
                or d0.dst_mac is None
                or d1.dst_mac is None
                or d0.src_mac is None
                or d1.src_mac is None
                or d0.out_ifindex <= 0
                or d1.out_ifindex <= 0
            ):
                op.err = EAGAIN
                counts[1] += 1
                return None
            # Pack first, with the slot a new connection would get, into the
            # IPv4 buffer (moved to the IPv6 one below if that is the family).
            slot = free[-1] if free else 0
            voff = len(p4.written) * vs2
            try:
                k0, k1 = entries(p4.vbuf, voff, d0, d1, slot)
            except (struct.error, TypeError, ValueError, OverflowError):
                # A field the map cannot hold (bad MAC, MTU...), or directions
                # of two families / protocols.
                op.err = errno.EINVAL
                self._c["add_errors"] += 1
                return None
            if len(k0) == KS4:
                p = p4
            else:
                p = p6
                voff = len(p6.written) * vs2
                entries(p6.vbuf, voff, d0, d1, slot)
            held = ctx.priv[PRIV]  # type: ignore[union-attr]
            h = None
            if held is None and free:
                r0, r1 = find(k0), find(k1)
                if r0 < 0 and r1 < 0 and k0 != k1:  # the common case
                    h = _Held(slot, ctx, gen)
                    put(slot, (k0, k1))
                else:
                    o0 = by_slot[r0 >> 1] if r0 >= 0 else None
                    o1 = by_slot[r1 >> 1] if r1 >= 0 else None
            else:
                o0 = owner_of(k0)
                o1 = owner_of(k1)
            if h is not None:
                free.pop()
                lu[slot] = 0  # type: ignore[index]  # a new connection was never seen
                by_slot[slot] = h
                ctx.priv[PRIV] = h  # type: ignore[union-attr]
                counts[0] += 1
            else:
                try:
                    r = special(ctx, held, k0, k1, o0, o1)  # type: ignore[arg-type]
                except OSError as exc:
                    r = _errno_of(exc)
                if r is _DUP:
                    dups.append((op, next(w for w in p.written if w.ctx is ctx)))
                    return None
                if type(r) is int:
                    op.err = r
                    return None
                h, old = r
                if old:
                    p.olds[len(p.written)] = old
                if h.slot != slot:  # rewrite or claim: repack with the real slot
                    entries(p.vbuf, voff, d0, d1, h.slot)
            op.err = 0
            koff = len(p.written) * 2 * len(k0)
            p.kbuf[koff : koff + 2 * len(k0)] = k0 + k1
            p.written.append(op)
            return p

        def pipeline(p: _Pending) -> None:
            """Hand every full chunk of ``p`` to the writer thread."""
            while len(p.written) - p.pushed >= chunk:
                p.pushes.append(self._push_async(p, p.pushed, p.pushed + chunk))
                p.pushed += chunk

        i = 0
        while i < n:
            if fast is not None:
                stop = min(n, i + chunk) if chunk else n
                j, k = fast(run, i, stop, p4, p6, idx, free, 0, lu, by_slot, gen, PRIV, _VS)
                if k:
                    del free[len(free) - k :]
                    counts[0] += k
                if chunk and j < n:  # the caller writes the last chunk itself
                    pipeline(p4)
                    pipeline(p6)
                i = j
                if i == stop:  # got through: the next call starts the next chunk
                    continue
            p = one(run[i])
            if chunk and p is not None and i + 1 < n:
                pipeline(p)
            i += 1
        new, eagain = counts
        self._n_held += new
        self._c["adds"] += new
        self._c["eagain"] += eagain
        for p in (p4, p6):
            n = len(p.written)
            if p.pushed < n:
                p.pushes.append(self._push(p, p.pushed, n))
            if not p.written:
                continue
            failed = [f for q in p.pushes for f in (q if isinstance(q, list) else q.result())]
            self._settle(p.written, p.olds, failed)
        for op, f in dups:
            op.err = f.err

    def _push_async(self, p: _Pending, lo: int, hi: int):
        """Start writing connections [lo, hi) of ``p``; ``.result()`` is what
        ``_push`` returns. With the extension built, the compiled path hands
        the chunk to the native writer (see ``_fastadd.Writer``); else to a
        Python thread (the syscall releases the GIL, but the thread has to
        win it back from the packing loop before each one)."""
        if _FASTADD is not None and self.compiled_add:
            if self._writer is None:
                self._writer = _FASTADD.Writer()
            if len(self._inflight) >= 200:  # the writer keeps at most 256 jobs
                self._inflight.pop(0).result()
            ks = _KS[p.fam]
            kbuf = memoryview(p.kbuf)[2 * ks * lo : 2 * ks * hi]
            vbuf = memoryview(p.vbuf)[2 * _VS * lo : 2 * _VS * hi]
            job = _Job(self, p, lo, hi, self._writer.submit(self._flows[p.fam], kbuf, vbuf,
                                                            2 * (hi - lo)))
            self._inflight.append(job)
            return job
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxdp-xdp")
        return self._pool.submit(self._push, p, lo, hi)

    def _push(self, p: _Pending, lo: int, hi: int, done: int = 0) -> list[tuple[int, int, bool]]:
        """Write the entries of connections [lo, hi) of ``p`` to its family's
        map, from entry ``done`` of the range on (the ones before went in).

        Returns the refused ones as (connection index, errno, entry 0 went
        in). Touches only the kernel and ``p``'s [lo, hi) range (which the
        caller no longer changes), so it may run in the helper thread.
        """
        ks = _KS[p.fam]
        kbuf = memoryview(p.kbuf)[2 * ks * lo : 2 * ks * hi]
        vbuf = memoryview(p.vbuf)[2 * _VS * lo : 2 * _VS * hi]
        need = 2 * (hi - lo)  # entries of the joined buffers
        failed: list[tuple[int, int, bool]] = []
        while done < need:
            try:
                done += self._update(p.fam, kbuf, vbuf, need - done, done)
            except bpfsys.BatchError as exc:
                done += exc.done
                bad = done // 2
                err = errno.ENOSPC if exc.errno in (errno.E2BIG, errno.ENOMEM) else exc.errno
                failed.append((lo + bad, err or errno.EIO, bool(done % 2)))
                # Resume after the refused connection: rewrites of existing
                # keys still succeed in a full map, and nothing else is lost.
                done = 2 * (bad + 1)
            except Exception as exc:  # noqa: BLE001 - must become per-op errnos
                # Unknown state for the rest of the range: report every
                # connection left as failed, with its keys to be deleted.
                log.error("xdp: writing entries failed: %r", exc)
                failed.extend((i, _errno_of(exc), True) for i in range(lo + done // 2, hi))
                break
        return failed

    def _settle(
        self, written: list[Op], olds: dict[int, tuple], failed: list[tuple[int, int, bool]]
    ) -> None:
        """Undo exactly the connections the kernel refused; drop superseded keys."""
        for idx, err, wrote_first in failed:
            op = written[idx]
            h = op.ctx.priv[_PRIV]  # type: ignore[union-attr]
            self._undo(h, olds.pop(idx, ()), wrote_first)
            op.err = err
            self._c["enospc" if err == errno.ENOSPC else "add_errors"] += 1
            self._c["rollbacks"] += wrote_first
        stale: list[Key] = []
        for idx, old in olds.items():
            keys = self._keys(written[idx].ctx.priv[_PRIV])  # type: ignore[union-attr]
            stale.extend(k for k in old if k not in keys)
        if stale:  # keys a rewrite or claim no longer uses
            try:
                self._delete(stale)
            except OSError as exc:
                log.error("xdp: deleting %d superseded entries failed: %s", len(stale), exc)

    def _undo(self, h: _Held, old: tuple, wrote_first: bool) -> None:
        """Take a connection the kernel refused out of the map and the indexes."""
        if old or wrote_first:
            # A new entry 0 may be in, or an old pair half rewritten: remove
            # every key of the connection rather than leave a mix.
            keys = set(self._keys(h)) | set(old)
            try:
                self._delete(list(keys))
            except OSError as exc:
                log.error("xdp: rollback of a half-written connection failed: %s", exc)
        self._forget(h)

    def _update(self, fam: int, kbuf: bytes, vbuf, count: int, start: int) -> int:
        """Write ``count`` entries from index ``start`` of the buffers to the
        flow map of ``fam``; BatchError on a partial write."""
        ks, fd = _KS[fam], self._flows[fam]
        if self._has_batch:
            try:
                return bpfsys.map_update_batch(
                    fd, kbuf, vbuf, count, key_size=ks, value_size=_VS, start=start
                )
            except bpfsys.BatchError as exc:
                if not _batch_unsupported(exc, count):
                    raise
                self._has_batch = False
                log.info("xdp: no BPF_MAP_UPDATE_BATCH, using single updates")
        mk, mv = memoryview(kbuf), memoryview(vbuf)
        for i in range(count):
            e = start + i
            try:
                bpfsys.map_update(fd, mk[e * ks : (e + 1) * ks], mv[e * _VS : (e + 1) * _VS])
            except OSError as exc:
                raise bpfsys.BatchError(exc.errno or errno.EIO, i, "MAP_UPDATE_ELEM") from None
        return count

    def _del_run(self, run: list[Op]) -> None:
        hs: list[_Held] = []
        for op in run:
            h = op.ctx.priv[_PRIV]  # type: ignore[union-attr]
            if h is None or h.ctx is not op.ctx:
                op.err = errno.ENOENT
                self._c["del_unknown"] += 1
                continue
            op.err = 0
            hs.append(h)
        if not hs:
            return
        # Few connections: take each entry out as it is read (final counts);
        # many: one walk, then one delete batch.
        taken = False
        try:
            taken = not self._walks(hs) and self._take_fold(hs)
            if not taken:
                self._fold(hs)
        except OSError as exc:  # the delete decides the op; the counts are lost
            log.warning("xdp: folding counters of %d deleted connections: %s", len(hs), exc)
        try:
            if not taken:  # the take deleted what it read
                self._delete([k for h in hs for k in self._keys(h)])
        except OSError as exc:
            # Which keys went is unknown: keep them all held so the manager
            # retries the DEL (keys already gone are skipped then).
            for op in run:
                if op.err == 0:
                    op.err = _errno_of(exc)
            return
        for h in hs:
            self._forget(h)
        self._c["dels"] += len(hs)

    # --- read-back -------------------------------------------------------------------

    def _scan_fields(self):
        """Yield (keys, key size, flags, slots, packets, bytes, n) per
        lookup-batch chunk of both flow maps; packets / bytes are summed over
        the per-CPU counter slots."""
        try:
            for fam in self._flows:
                for keys, vals, n in self._scan(fam):
                    yield (keys, _KS[fam], *_val_fields(vals, n), n)
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"reading the flow maps: {exc}") from exc

    def _holder_dir(self, keys, ks: int, i: int, slot: int) -> tuple[_Held | None, int]:
        """(holder, direction) of entry ``i`` (keys of ``ks`` bytes) of a scan
        chunk whose val.slot is ``slot``."""
        h = self._by_slot[slot] if slot < self.max_conns else None
        if h is None:
            return None, -1
        d = self._idx.dir_of(slot, keys, i * ks, ks)
        return (h, d) if d >= 0 else (None, -1)

    def teardown_flagged(self) -> list[OffloadCtx]:
        """Held connections whose entry the program flagged CT_F_TEARDOWN
        (it punted a FIN/RST). Flagged orphans are deleted here."""
        if self._bpf is None:
            return []
        out: dict[int, OffloadCtx] = {}
        orphans: dict[int, _Held] = {}
        for keys, ks, flags, slots, _p, _b, _n in self._scan_fields():
            for i, f in enumerate(flags):
                if not f & L.CT_F_TEARDOWN:
                    continue
                h, _d = self._holder_dir(keys, ks, i, slots[i])
                if h is None:
                    continue
                if h.ctx is None:
                    orphans[id(h)] = h
                else:
                    out[id(h.ctx)] = h.ctx
        for h in orphans.values():
            try:
                self._delete(list(self._keys(h)))
            except OSError:
                continue
            self._forget(h)
        self._c["teardowns_flagged"] += len(out)
        return list(out.values())

    def counters(self) -> list[tuple[OffloadCtx, tuple[int, int], tuple[int, int]]]:
        """Per held connection: (ctx, (orig, reply) packets, (orig, reply) bytes)
        forwarded by the fast path, from one lookup-batch walk of the flow maps."""
        if self._bpf is None:
            return []
        acc: dict[int, list[Any]] = {}
        for keys, ks, _f, slots, pk, by, n in self._scan_fields():
            for i in range(n):
                h, d = self._holder_dir(keys, ks, i, slots[i])
                if h is None or h.ctx is None:
                    continue
                row = acc.get(id(h))
                if row is None:
                    row = acc[id(h)] = [h.ctx, [0, 0], [0, 0]]
                row[1][d] = pk[i]
                row[2][d] = by[i]
        return [(c, (p[0], p[1]), (b[0], b[1])) for c, p, b in acc.values()]

    def flows(self) -> list[FlowRow]:
        """Every entry of both flow maps decoded (for ``ctxdp flows``)."""
        if self._bpf is None:
            return []
        rows: list[FlowRow] = []
        try:
            for fam in self._flows:
                ks = _KS[fam]
                for keys, vals, n in self._scan(fam):
                    for i in range(n):
                        k = bytes(keys[i * ks : (i + 1) * ks])
                        ifindex, t = L.unpack_flow_key(k)
                        v = L.unpack_val(vals, i * _VS)
                        ref = self._idx.find(k)
                        h = self._by_slot[ref >> 1] if ref >= 0 else None
                        ctx = h.ctx if h is not None else None
                        d = -1 if h is None or ctx is None else ref & 1
                        rows.append(FlowRow(ifindex, t, v, ctx, d))
        except OSError as exc:
            raise ProviderError(_errno_of(exc), f"reading the flow maps: {exc}") from exc
        return rows

    def last_used_ns(self, ctx: OffloadCtx) -> int:
        """Raw ct_last_used stamp (ns) of a held connection; 0 = never."""
        h = ctx.priv[_PRIV]
        if h is None or self._lu is None:
            raise ProviderError(errno.ENOENT, "connection not offloaded to xdp")
        return self._lu[h.slot]

    def slot_of(self, ctx: OffloadCtx) -> int | None:
        h = ctx.priv[_PRIV]
        return None if h is None else h.slot

    def stats(self) -> dict[str, int]:
        """Program counters (summed over CPUs), provider counters, occupancy."""
        out: dict[str, int] = {}
        if self._bpf is not None:
            ncpu = bpfsys.num_possible_cpus()
            for i, name in enumerate(L.CT_STAT_NAMES):
                try:
                    raw = bpfsys.map_lookup(self._stats_fd, struct.pack("=I", i), 8 * ncpu)
                except OSError:
                    raw = None
                out[name] = sum(struct.unpack(f"={ncpu}Q", raw)) if raw else 0
        out.update(self._c)
        out["conns"] = self._n_held
        out["orphans"] = self._n_orphans
        out["entries"] = 2 * (self._n_held + self._n_orphans)
        out["capacity_conns"] = self.max_conns
        out["free_slots"] = len(self._free)
        out["index_bytes"] = self._idx.nbytes if self._idx is not None else 0
        out["ports_native"] = sum(1 for m in self.attached.values() if m == "native")
        out["ports_generic"] = sum(1 for m in self.attached.values() if m == "generic")
        return out

    # --- introspection for tests/benchmarks ------------------------------------------

    @property
    def prog_fd(self) -> int:
        """fd of the loaded XDP program (for BPF_PROG_RUN), -1 if not started."""
        return self._fn.fd if self._fn is not None else -1

    @property
    def flows_fd(self) -> int:
        """fd of ct_flows4 (the IPv4 flow map), -1 if not started."""
        return self._flows.get(4, -1)

    @property
    def flows_fds(self) -> dict[int, int]:
        """family (4, 6) -> fd of its flow map; empty if not started."""
        return dict(self._flows)

    @property
    def table(self) -> Any:
        """The bcc BPF object (its tables give bcc's own view of the maps)."""
        return self._bpf
