"""Raw bpf(2) through ctypes: test runs, batched map operations, pinning, mmap.

Contract:
- Every function takes and returns plain ints and buffers (``bytes``,
  ``bytearray``, ``memoryview``, ctypes arrays). Callers pack many entries into
  one buffer with ``struct.Struct.pack_into``; nothing here builds a Python
  object per map entry, so a batch of N entries costs one syscall plus O(1)
  Python work.
- A failing syscall raises ``OSError(errno, message)``. Batch operations that
  stop part way raise ``BatchError`` (an ``OSError``) whose ``done`` says
  exactly how many entries the kernel applied before the failure.
- Buffers handed to the kernel are only borrowed for the duration of the call.
- No bcc import: this module works on any map or program fd (bcc's
  ``table.map_fd`` / ``fn.fd``, or fds from ``obj_get``).

Why raw syscalls: bcc 0.26 exposes neither BPF_MAP_*_BATCH nor
BPF_PROG_TEST_RUN with a ctx or live frames, and per-entry ctypes calls through
bcc's table API are far too slow for installing or aging a million flows.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import platform
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_MMAPABLE",
    "BPF_F_NO_PREALLOC",
    "BPF_F_TEST_XDP_LIVE_FRAMES",
    "BPF_NOEXIST",
    "BatchError",
    "MAP_TYPE",
    "MapInfo",
    "TestRun",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_REDIRECT",
    "XDP_TX",
    "XDP_MD_SIZE",
    "buffer_address",
    "map_create",
    "map_delete",
    "map_delete_batch",
    "map_get_next_key",
    "map_info",
    "map_lookup",
    "map_lookup_batch",
    "map_update",
    "map_update_batch",
    "mmap_array",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
    "prog_test_run",
    "xdp_md",
]

# --- constants from include/uapi/linux/bpf.h -------------------------------

_BPF_MAP_CREATE = 0
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_TEST_RUN = 10
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
_BPF_MAP_LOOKUP_BATCH = 24
_BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
_BPF_MAP_UPDATE_BATCH = 26
_BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_F_NO_PREALLOC = 1 << 0
BPF_F_MMAPABLE = 1 << 10

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

#: enum bpf_map_type values this project uses (name -> number).
MAP_TYPE = {
    "hash": 1,
    "array": 2,
    "percpu_hash": 5,
    "percpu_array": 6,
    "lru_hash": 9,
    "devmap": 14,
    "devmap_hash": 25,
}

# struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
# egress_ifindex (all u32).
XDP_MD_SIZE = 24

# --- the syscall ----------------------------------------------------------

# bpf(2) has no libc wrapper, so go through syscall(2) with the arch number.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """One bpf(2) call; the kernel reads (and for some commands writes) attr."""
    if _SYS_BPF is None:  # pragma: no cover - depends on the machine
        raise OSError(_errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    ret = _syscall(_SYS_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({what}): {os.strerror(err)}")
    return ret


# --- bpf_attr variants (one ctypes struct per command family) --------------
# Passing exactly the variant's size is fine: the kernel zero-extends a short
# attr, and rejects non-zero bytes beyond what it knows.


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key for GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _TestAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfoRaw(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


# --- buffers ----------------------------------------------------------------


def buffer_address(buf) -> tuple[int, object]:
    """(address, keepalive) of a buffer's first byte, without copying.

    ``bytes`` are read-only: the kernel only reads through such pointers (keys
    and values given to updates). Writable buffers (bytearray, memoryview,
    mmap, ctypes arrays) are shared in place. Keep ``keepalive`` referenced
    until the syscall has returned.
    """
    if isinstance(buf, bytes):
        p = ctypes.c_char_p(buf)  # points into the bytes object itself
        return ctypes.cast(p, ctypes.c_void_p).value or 0, (p, buf)
    if isinstance(buf, ctypes.Array | ctypes.Structure):
        return ctypes.addressof(buf), buf
    mv = memoryview(buf)
    if mv.readonly:
        b = bytes(mv)
        return buffer_address(b)
    arr = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(arr), (arr, mv)


def _addr_or_zero(buf) -> tuple[int, object]:
    if buf is None:
        return 0, None
    return buffer_address(buf)


def _nbytes(buf) -> int:
    return memoryview(buf).nbytes


# --- BPF_PROG_TEST_RUN ---------------------------------------------------------


class TestRun(NamedTuple):
    """Result of one BPF_PROG_TEST_RUN."""

    retval: int  # the program's return value (last run)
    data: bytes  # packet after the program ran (b"" for live frames)
    duration_ns: int  # kernel-measured average ns per run


def xdp_md(ingress_ifindex: int, data_len: int, rx_queue_index: int = 0) -> bytes:
    """A struct xdp_md ctx for test runs.

    The kernel insists on data=0, data_meta=0, data_end=len(data) and
    egress_ifindex=0; ingress_ifindex must name a device in the caller's netns
    (it becomes the frame's rxq device, and the program reads it).
    """
    return (
        (0).to_bytes(4, "little")
        + data_len.to_bytes(4, "little")
        + (0).to_bytes(4, "little")
        + ingress_ifindex.to_bytes(4, "little")
        + rx_queue_index.to_bytes(4, "little")
        + (0).to_bytes(4, "little")
    )


def prog_test_run(
    prog_fd: int,
    data: bytes | bytearray,
    *,
    repeat: int = 1,
    ctx: bytes | None = None,
    ingress_ifindex: int | None = None,
    flags: int = 0,
    batch_size: int = 0,
    data_size_out: int | None = None,
) -> TestRun:
    """Run ``prog_fd`` on ``data`` in the kernel (BPF_PROG_TEST_RUN).

    ``ingress_ifindex`` builds the xdp_md ctx for you (``ctx`` gives raw bytes
    instead). Non-live runs do NOT reset the packet between ``repeat``
    iterations: every iteration sees the previous one's rewrite. With
    ``flags=BPF_F_TEST_XDP_LIVE_FRAMES`` the kernel turns into a packet
    generator: ``repeat`` frames are built from ``data`` and XDP_TX/REDIRECT
    really transmit; no data comes back. XDP data must be at least 14 bytes
    (EINVAL otherwise).
    """
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    if ctx is None and ingress_ifindex is not None:
        ctx = xdp_md(ingress_ifindex, len(data))
    din, keep_in = buffer_address(bytes(data))
    attr = _TestAttr()
    attr.prog_fd = prog_fd
    attr.data_in = din
    attr.data_size_in = len(data)
    attr.repeat = repeat
    attr.flags = flags
    attr.batch_size = batch_size
    out = None
    if not live:  # live mode refuses data_out / ctx_out
        size = data_size_out if data_size_out is not None else len(data) + 256
        out = ctypes.create_string_buffer(size)
        attr.data_out = ctypes.addressof(out)
        attr.data_size_out = size
    keep_ctx = None
    if ctx is not None:
        attr.ctx_in, keep_ctx = buffer_address(bytes(ctx))
        attr.ctx_size_in = len(ctx)
    _bpf(_BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    del keep_in, keep_ctx
    data_out = out.raw[: attr.data_size_out] if out is not None else b""
    return TestRun(attr.retval, data_out, attr.duration)


# --- single-element map operations ------------------------------------------


def map_create(
    map_type: int | str,
    key_size: int,
    value_size: int,
    max_entries: int,
    *,
    flags: int = 0,
    name: str = "",
) -> int:
    """Create a map and return its fd (the caller closes it).

    Used for maps bcc 0.26 cannot declare itself (it has no devmap_hash
    section), which are then pinned and adopted by a BPF_TABLE_PINNED.
    """
    attr = _MapCreateAttr()
    attr.map_type = MAP_TYPE[map_type] if isinstance(map_type, str) else map_type
    attr.key_size = key_size
    attr.value_size = value_size
    attr.max_entries = max_entries
    attr.map_flags = flags
    attr.map_name = name.encode()[:15]
    return _bpf(_BPF_MAP_CREATE, attr, "MAP_CREATE")


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Insert or replace one element (BPF_ANY / BPF_NOEXIST / BPF_EXIST)."""
    attr = _ElemAttr()
    attr.map_fd = fd
    attr.key, k = buffer_address(key)
    attr.value, v = buffer_address(value)
    attr.flags = flags
    _bpf(_BPF_MAP_UPDATE_ELEM, attr, "MAP_UPDATE_ELEM")
    del k, v


def map_lookup(fd: int, key, value_size: int) -> bytes | None:
    """One element's value, or None when the key is absent.

    For per-CPU maps ``value_size`` must be round_up(value_size, 8) times
    ``num_possible_cpus()``: the kernel copies every CPU's copy.
    """
    attr = _ElemAttr()
    attr.map_fd = fd
    attr.key, k = buffer_address(key)
    out = ctypes.create_string_buffer(value_size)
    attr.value = ctypes.addressof(out)
    try:
        _bpf(_BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM")
    except OSError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise
    del k
    return out.raw


def map_lookup_many(fd: int, keys, n: int, key_size: int, value_size: int, *,
                    delete: bool = False) -> tuple[bytearray, list[bool]]:
    """Look up ``n`` packed keys: (their values packed in one buffer, found
    flags). The kernel has no batch lookup by key, so this is one
    BPF_MAP_LOOKUP_ELEM per key, but with one attr and one value buffer for
    all of them: the per-key cost is the syscall, not ctypes set-up.

    ``delete``: BPF_MAP_LOOKUP_AND_DELETE_ELEM instead (hash maps, Linux >=
    5.14): each element is taken out as it is read, so the value returned is
    its last (nothing can count into it afterwards). A kernel without it
    refuses the first key with EINVAL or ENOTSUPP, before touching the map;
    that is raised as OSError."""
    if _SYS_BPF is None:  # pragma: no cover - depends on the machine
        raise OSError(_errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    kaddr, kk = buffer_address(keys)
    vals = bytearray(n * value_size)
    vaddr, vk = buffer_address(vals)
    attr = _ElemAttr()
    attr.map_fd = fd
    found = [True] * n
    cmd = _BPF_MAP_LOOKUP_AND_DELETE_ELEM if delete else _BPF_MAP_LOOKUP_ELEM
    what = "MAP_LOOKUP_AND_DELETE_ELEM" if delete else "MAP_LOOKUP_ELEM"
    call, nr = _syscall, _SYS_BPF
    aaddr, asize = ctypes.addressof(attr), ctypes.sizeof(attr)
    for i in range(n):
        attr.key = kaddr + i * key_size
        attr.value = vaddr + i * value_size
        if call(nr, cmd, aaddr, asize) < 0:
            err = ctypes.get_errno()
            if err != _errno.ENOENT:
                raise OSError(err, f"bpf({what}): {os.strerror(err)}")
            found[i] = False
    del kk, vk
    return vals, found


def map_delete(fd: int, key) -> bool:
    """Delete one element; False if it was not there."""
    attr = _ElemAttr()
    attr.map_fd = fd
    attr.key, k = buffer_address(key)
    try:
        _bpf(_BPF_MAP_DELETE_ELEM, attr, "MAP_DELETE_ELEM")
    except OSError as exc:
        if exc.errno == _errno.ENOENT:
            return False
        raise
    del k
    return True


def map_get_next_key(fd: int, key, key_size: int) -> bytes | None:
    """The key after ``key`` (None: the first key); None at the end."""
    attr = _ElemAttr()
    attr.map_fd = fd
    attr.key, k = _addr_or_zero(key)
    out = ctypes.create_string_buffer(key_size)
    attr.value = ctypes.addressof(out)
    try:
        _bpf(_BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY")
    except OSError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise
    del k
    return out.raw


# --- batched map operations ----------------------------------------------------


class BatchError(OSError):
    """A batch operation stopped part way: ``done`` entries were applied.

    For updates and deletes the first ``done`` entries of the buffers took
    effect, entry ``done`` failed with ``errno``, and nothing after it ran.
    A full hash map fails with E2BIG. A command refused before any entry
    (bad flags, a command or map type without batch support) has
    ``done == 0``.
    """

    def __init__(self, err: int, done: int, what: str) -> None:
        super().__init__(err, f"bpf({what}): {os.strerror(err)} after {done} entries")
        self.done = done


def _done(written: int, asked: int) -> int:
    """Entries a failed batch command processed. The kernel writes the count
    back only once it has started on the entries (it stops at the failing
    one, so fewer than asked); a refusal up front (flags, no batch support)
    leaves the count as the caller set it, which means none."""
    return 0 if written >= asked else written


def map_update_batch(
    fd: int,
    keys,
    values,
    count: int,
    flags: int = BPF_ANY,
    *,
    key_size: int | None = None,
    value_size: int | None = None,
    start: int = 0,
) -> int:
    """Write ``count`` entries packed back to back in ``keys`` / ``values``.

    ``flags`` is the batch's elem_flags: the kernel's generic update batch
    accepts only 0 (BPF_ANY: insert or replace) or BPF_F_LOCK, and refuses
    BPF_NOEXIST / BPF_EXIST with EINVAL before touching any entry (so an
    insert-only batch is not possible; detect clashes in userspace).
    ``start`` skips that many entries of the buffers (needs key_size /
    value_size), so a caller can resume after a BatchError without copying.
    Returns ``count``; raises BatchError with the exact number applied.
    """
    if count <= 0:
        return 0
    kaddr, kk = buffer_address(keys)
    vaddr, vk = buffer_address(values)
    if start:
        if key_size is None or value_size is None:
            raise ValueError("start needs key_size and value_size")
        kaddr += start * key_size
        vaddr += start * value_size
    attr = _BatchAttr()
    attr.keys = kaddr
    attr.values = vaddr
    attr.count = count
    attr.map_fd = fd
    attr.elem_flags = flags
    try:
        _bpf(_BPF_MAP_UPDATE_BATCH, attr, "MAP_UPDATE_BATCH")
    except OSError as exc:
        # The kernel writes back how many elements it processed before the
        # failing one; those stay applied (there is no rollback).
        raise BatchError(exc.errno, _done(attr.count, count), "MAP_UPDATE_BATCH") from None
    finally:
        del kk, vk
    return attr.count


def map_delete_batch(
    fd: int,
    keys,
    count: int,
    *,
    key_size: int | None = None,
    ignore_missing: bool = False,
) -> int:
    """Delete ``count`` keys packed back to back; returns how many were deleted.

    The kernel stops at the first key that is absent (ENOENT). With
    ``ignore_missing`` (needs ``key_size``) the missing key is skipped and the
    rest of the batch continues, so the result counts only real deletions.
    Other failures raise BatchError with the number deleted so far.
    """
    if count <= 0:
        return 0
    if ignore_missing and key_size is None:
        raise ValueError("ignore_missing needs key_size")
    kaddr, kk = buffer_address(keys)
    deleted = 0
    pos = 0
    try:
        while pos < count:
            attr = _BatchAttr()
            attr.keys = kaddr + pos * (key_size or 0)
            attr.count = count - pos
            attr.map_fd = fd
            try:
                _bpf(_BPF_MAP_DELETE_BATCH, attr, "MAP_DELETE_BATCH")
            except OSError as exc:
                deleted += _done(attr.count, count - pos)
                if exc.errno == _errno.ENOENT and ignore_missing:
                    pos += attr.count + 1  # skip the absent key
                    continue
                raise BatchError(exc.errno, deleted, "MAP_DELETE_BATCH") from None
            deleted += attr.count
            break
    finally:
        del kk
    return deleted


def map_lookup_batch(
    fd: int,
    key_size: int,
    value_size: int,
    *,
    chunk: int = 4096,
):
    """Iterate over a whole map in chunks: yields ``(keys, values, n)``.

    ``keys`` / ``values`` are bytearrays holding ``n`` packed entries (reused
    between yields: copy what you keep). ``value_size`` is the per-element
    size the kernel copies (per-CPU maps: round_up(size, 8) * possible CPUs).
    Hash maps walk bucket by bucket; a bucket larger than ``chunk`` makes the
    kernel answer ENOSPC, and the chunk is doubled and retried.
    """
    return _walk_batch(fd, key_size, value_size, chunk, _BPF_MAP_LOOKUP_BATCH,
                       "MAP_LOOKUP_BATCH")


def map_lookup_and_delete_batch(
    fd: int,
    key_size: int,
    value_size: int,
    *,
    chunk: int = 4096,
):
    """``map_lookup_batch`` that deletes every element it returns
    (BPF_MAP_LOOKUP_AND_DELETE_BATCH, hash maps, Linux 5.6+): empties the map
    and hands back what each element held when it went."""
    return _walk_batch(fd, key_size, value_size, chunk, _BPF_MAP_LOOKUP_AND_DELETE_BATCH,
                       "MAP_LOOKUP_AND_DELETE_BATCH")


def _walk_batch(fd: int, key_size: int, value_size: int, chunk: int, cmd: int, what: str):
    token_size = max(key_size, 8)  # hash maps use a u32 bucket index as token
    in_tok = ctypes.create_string_buffer(token_size)
    out_tok = ctypes.create_string_buffer(token_size)
    first = True
    while True:
        keys = bytearray(chunk * key_size)
        vals = bytearray(chunk * value_size)
        kaddr, kk = buffer_address(keys)
        vaddr, vk = buffer_address(vals)
        attr = _BatchAttr()
        attr.in_batch = 0 if first else ctypes.addressof(in_tok)
        attr.out_batch = ctypes.addressof(out_tok)
        attr.keys = kaddr
        attr.values = vaddr
        attr.count = chunk
        attr.map_fd = fd
        done = False
        try:
            _bpf(cmd, attr, what)
        except OSError as exc:
            if exc.errno == _errno.ENOENT:  # walked past the last element
                done = True
            elif exc.errno == _errno.ENOSPC and attr.count == 0:
                chunk *= 2
                continue
            else:
                raise
        del kk, vk
        n = attr.count
        if n:
            yield keys, vals, n
        if done:
            return
        ctypes.memmove(in_tok, out_tok, token_size)
        first = False


# --- pinning and info ----------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program at ``path`` on a bpffs (EEXIST if taken)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr()
    attr.pathname = ctypes.addressof(p)
    attr.bpf_fd = fd
    _bpf(_BPF_OBJ_PIN, attr, f"OBJ_PIN {path}")


def obj_get(path: str, file_flags: int = 0) -> int:
    """Open the object pinned at ``path``; returns a new fd (caller closes)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr()
    attr.pathname = ctypes.addressof(p)
    attr.file_flags = file_flags
    return _bpf(_BPF_OBJ_GET, attr, f"OBJ_GET {path}")


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel says about a map (BPF_OBJ_GET_INFO_BY_FD)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    """Type, sizes, max_entries and flags of the map behind ``fd``.

    Lets a restarted daemon check that a pinned map it is about to adopt has
    the layout this build expects.
    """
    raw = _MapInfoRaw()
    attr = _InfoAttr()
    attr.bpf_fd = fd
    attr.info_len = ctypes.sizeof(raw)
    attr.info = ctypes.addressof(raw)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr, "OBJ_GET_INFO_BY_FD")
    return MapInfo(
        raw.type,
        raw.id,
        raw.key_size,
        raw.value_size,
        raw.max_entries,
        raw.map_flags,
        raw.name.decode(errors="replace"),
    )


def mmap_array(fd: int, value_size: int, max_entries: int) -> mmap.mmap:
    """Map a BPF_F_MMAPABLE array into memory, shared and writable.

    Element i lives at offset ``i * round_up(value_size, 8)`` (the kernel's
    array element stride); the mapping length is rounded up to whole pages,
    which is what the kernel requires. Reads see the program's writes with no
    syscall, which is what makes aging a million flows cheap.
    """
    stride = (value_size + 7) & ~7
    page = mmap.PAGESIZE
    size = (stride * max_entries + page - 1) // page * page
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def num_possible_cpus() -> int:
    """Possible CPUs: the number of copies a per-CPU map value holds."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
