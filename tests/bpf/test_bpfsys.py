"""ctxdp.bpfsys drives the raw bpf(2) commands correctly: single and batched
map operations (including exact partial counts), pinning, map info, mmap of
an mmapable array and BPF_PROG_TEST_RUN with an xdp_md ctx."""

from __future__ import annotations

import errno
import os
import struct
import uuid

import pytest

from ctxdp import bpfsys
from tests.privileged import require_bcc, require_root

pytestmark = pytest.mark.privileged

K = struct.Struct("=Q")
V = struct.Struct("=QQ")


@pytest.fixture
def hash_fd():
    """A 64-entry hash map of u64 -> 16 bytes, closed afterwards."""
    require_root()
    fd = bpfsys.map_create("hash", 8, 16, 64, name="t_bpfsys")
    try:
        yield fd
    finally:
        os.close(fd)


def _fill(n: int, base: int = 0) -> tuple[bytearray, bytearray]:
    keys, vals = bytearray(n * 8), bytearray(n * 16)
    for i in range(n):
        K.pack_into(keys, i * 8, base + i)
        V.pack_into(vals, i * 16, base + i, (base + i) * 3)
    return keys, vals


def test_single_element_ops(hash_fd):
    """update / lookup / delete / get_next_key behave like the kernel map."""
    bpfsys.map_update(hash_fd, K.pack(7), V.pack(1, 2))
    assert V.unpack(bpfsys.map_lookup(hash_fd, K.pack(7), 16)) == (1, 2)
    assert bpfsys.map_lookup(hash_fd, K.pack(8), 16) is None
    with pytest.raises(OSError) as ei:
        bpfsys.map_update(hash_fd, K.pack(7), V.pack(3, 4), bpfsys.BPF_NOEXIST)
    assert ei.value.errno == errno.EEXIST
    assert bpfsys.map_get_next_key(hash_fd, None, 8) == K.pack(7)
    assert bpfsys.map_get_next_key(hash_fd, K.pack(7), 8) is None
    assert bpfsys.map_delete(hash_fd, K.pack(7)) is True
    assert bpfsys.map_delete(hash_fd, K.pack(7)) is False


def test_update_batch_reports_exact_partial_count_when_full(hash_fd):
    """A batch larger than the free space applies exactly what fits, then E2BIG."""
    keys, vals = _fill(100)
    with pytest.raises(bpfsys.BatchError) as ei:
        bpfsys.map_update_batch(hash_fd, keys, vals, 100)
    assert ei.value.errno == errno.E2BIG
    assert ei.value.done == 64
    assert V.unpack(bpfsys.map_lookup(hash_fd, K.pack(63), 16)) == (63, 189)
    assert bpfsys.map_lookup(hash_fd, K.pack(64), 16) is None


def test_update_batch_refuses_noexist_up_front(hash_fd):
    """The kernel refuses BPF_NOEXIST in an update batch before any entry: EINVAL
    with done == 0 (not the count it was given) and nothing written."""
    keys, vals = _fill(3)
    with pytest.raises(bpfsys.BatchError) as ei:
        bpfsys.map_update_batch(hash_fd, keys, vals, 3, bpfsys.BPF_NOEXIST)
    assert (ei.value.errno, ei.value.done) == (errno.EINVAL, 0)
    assert bpfsys.map_get_next_key(hash_fd, None, 8) is None


def test_update_batch_start_offset(hash_fd):
    """start= resumes inside the same buffers without copying."""
    keys, vals = _fill(10)
    assert bpfsys.map_update_batch(hash_fd, keys, vals, 4, start=6, key_size=8, value_size=16) == 4
    got = sorted(
        K.unpack_from(k, i * 8)[0]
        for k, _v, n in bpfsys.map_lookup_batch(hash_fd, 8, 16)
        for i in range(n)
    )
    assert got == [6, 7, 8, 9]


def test_lookup_batch_walks_everything(hash_fd):
    """lookup_batch yields every entry once, with its value, across chunks."""
    keys, vals = _fill(50)
    bpfsys.map_update_batch(hash_fd, bytes(keys), bytes(vals), 50)
    seen = {}
    for ks, vs, n in bpfsys.map_lookup_batch(hash_fd, 8, 16, chunk=1):
        for i in range(n):
            seen[K.unpack_from(ks, i * 8)[0]] = V.unpack_from(vs, i * 16)
    assert seen == {i: (i, 3 * i) for i in range(50)}


def test_lookup_and_delete_batch_empties_the_map_returning_every_value(hash_fd):
    """lookup_and_delete_batch hands back every entry once, across chunks, and
    leaves the map empty."""
    keys, vals = _fill(50)
    bpfsys.map_update_batch(hash_fd, keys, vals, 50)
    seen = {}
    for ks, vs, n in bpfsys.map_lookup_and_delete_batch(hash_fd, 8, 16, chunk=4):
        for i in range(n):
            seen[K.unpack_from(ks, i * 8)[0]] = V.unpack_from(vs, i * 16)
    assert seen == {i: (i, 3 * i) for i in range(50)}
    assert list(bpfsys.map_lookup_batch(hash_fd, 8, 16)) == []


def test_lookup_many_packs_values_and_flags_missing_keys(hash_fd):
    """lookup_many: one value slot per key, in key order; absent keys are False
    with a zero slot."""
    keys, vals = _fill(5)
    bpfsys.map_update_batch(hash_fd, keys, vals, 5)
    want = b"".join(K.pack(k) for k in (4, 9, 0))
    got, found = bpfsys.map_lookup_many(hash_fd, want, 3, 8, 16)
    assert found == [True, False, True]
    assert [V.unpack_from(got, i * 16) for i in range(3)] == [(4, 12), (0, 0), (0, 0)]


def test_lookup_many_with_delete_takes_the_elements_out(hash_fd):
    """lookup_many(delete=True): the same values and flags, and the elements are gone."""
    keys, vals = _fill(5)
    bpfsys.map_update_batch(hash_fd, keys, vals, 5)
    want = b"".join(K.pack(k) for k in (4, 9, 0))
    got, found = bpfsys.map_lookup_many(hash_fd, want, 3, 8, 16, delete=True)
    assert found == [True, False, True]
    assert [V.unpack_from(got, i * 16) for i in range(3)] == [(4, 12), (0, 0), (0, 0)]
    left = [K.unpack_from(k, i * 8)[0] for k, _v, n in bpfsys.map_lookup_batch(hash_fd, 8, 16)
            for i in range(n)]
    assert sorted(left) == [1, 2, 3]


def test_delete_batch_skips_missing_keys(hash_fd):
    """delete_batch stops at an absent key, or skips it with ignore_missing."""
    keys, vals = _fill(10)
    bpfsys.map_update_batch(hash_fd, keys, vals, 10)
    bpfsys.map_delete(hash_fd, K.pack(3))
    with pytest.raises(bpfsys.BatchError) as ei:
        bpfsys.map_delete_batch(hash_fd, keys, 10)
    assert (ei.value.errno, ei.value.done) == (errno.ENOENT, 3)
    bpfsys.map_update_batch(hash_fd, keys, vals, 3)
    assert bpfsys.map_delete_batch(hash_fd, keys, 10, key_size=8, ignore_missing=True) == 9
    assert list(bpfsys.map_lookup_batch(hash_fd, 8, 16)) == []


def test_pin_get_and_info(hash_fd):
    """A pinned map reopens by path with the same id, type and sizes."""
    require_root()
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("bpffs not mounted")
    path = f"/sys/fs/bpf/ctxdp_t_{uuid.uuid4().hex[:8]}"
    bpfsys.obj_pin(hash_fd, path)
    try:
        fd2 = bpfsys.obj_get(path)
        try:
            a, b = bpfsys.map_info(hash_fd), bpfsys.map_info(fd2)
            assert a == b
            assert (a.type, a.key_size, a.value_size, a.max_entries) == (
                bpfsys.MAP_TYPE["hash"],
                8,
                16,
                64,
            )
            assert a.name == "t_bpfsys"
        finally:
            os.close(fd2)
        with pytest.raises(OSError) as ei:
            bpfsys.obj_pin(hash_fd, path)
        assert ei.value.errno == errno.EEXIST
    finally:
        os.unlink(path)


def test_mmap_array_shares_memory_with_map():
    """Writes through the mmap are map values, and map updates show in the mmap."""
    require_root()
    fd = bpfsys.map_create("array", 4, 8, 1000, flags=bpfsys.BPF_F_MMAPABLE)
    try:
        info = bpfsys.map_info(fd)
        assert info.flags & bpfsys.BPF_F_MMAPABLE
        m = bpfsys.mmap_array(fd, 8, 1000)
        try:
            assert len(m) % os.sysconf("SC_PAGE_SIZE") == 0 and len(m) >= 8000
            struct.pack_into("=Q", m, 8 * 999, 0xDEADBEEF)
            assert bpfsys.map_lookup(fd, struct.pack("=I", 999), 8) == struct.pack("=Q", 0xDEADBEEF)
            bpfsys.map_update(fd, struct.pack("=I", 5), struct.pack("=Q", 77))
            assert struct.unpack_from("=Q", m, 40)[0] == 77
        finally:
            m.close()
    finally:
        os.close(fd)


def test_num_possible_cpus():
    """num_possible_cpus is at least the online CPU count."""
    assert bpfsys.num_possible_cpus() >= (os.cpu_count() or 1)


PROG = rb"""
#include <uapi/linux/bpf.h>
int echo_ifindex(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    unsigned char *p = data;
    if (data + 14 > end)
        return XDP_ABORTED;
    p[0] = ctx->ingress_ifindex & 0xff;   /* stamp the ifindex the ctx gave */
    return XDP_TX;
}
"""


def test_prog_test_run_with_ctx():
    """test_run returns retval, the rewritten data and a duration; ctx sets ingress_ifindex."""
    bcc = require_bcc()
    b = bcc.BPF(text=PROG)
    try:
        fn = b.load_func(b"echo_ifindex", bcc.BPF.XDP)
        pkt = bytes(range(60))
        r = bpfsys.prog_test_run(fn.fd, pkt, ingress_ifindex=1, repeat=10)
        assert r.retval == bpfsys.XDP_TX
        assert r.data == bytes([1]) + pkt[1:]
        assert r.duration_ns >= 0
        r = bpfsys.prog_test_run(fn.fd, pkt[:14])
        assert r.retval == bpfsys.XDP_TX and len(r.data) == 14
        with pytest.raises(OSError) as ei:  # the kernel wants at least an Ethernet header
            bpfsys.prog_test_run(fn.fd, pkt[:13])
        assert ei.value.errno == errno.EINVAL
        assert bpfsys.xdp_md(5, 60) == struct.pack("=6I", 0, 60, 0, 5, 0, 0)
    finally:
        b.cleanup()
