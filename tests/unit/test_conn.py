"""Packed keys, ct_state rendering and the Conn object layout."""

from __future__ import annotations

import pytest

from ctxdp.conntrack import CS, Conn, CtConfig, TcpConn, cs_str
from ctxdp.conntrack.conn import (
    key_of_tuple,
    pack_key,
    reverse_key,
    tuple_of_key,
    zone_of_key,
)
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.conntrack.proto import OtherHandler
from tests.unit.ctutil import ip


@pytest.mark.parametrize("a,b,size", [("10.0.0.1", "10.0.0.2", 15),
                                      ("2001:db8::1", "2001:db8::2", 39)])
def test_key_roundtrip_and_reverse(a, b, size):
    """Keys pack zone/proto/addresses/ports compactly and decode back; reverse swaps sides."""
    t = FlowTuple(4 if size == 15 else 6, 6, ip(a), ip(b), 1234, 80)
    k = key_of_tuple(300, t)
    assert len(k) == size and zone_of_key(k) == 300 and k[2] == 6
    assert tuple_of_key(k) == t
    assert tuple_of_key(reverse_key(k)) == t.reverse()
    assert reverse_key(reverse_key(k)) == k
    assert pack_key(300, 6, ip(a), ip(b), 1234, 80) == k


def test_cs_bits_match_ovs():
    """ct_state bits have OVS's values and render like ovs-ofctl."""
    assert (CS.NEW, CS.EST, CS.REL, CS.RPL, CS.INV, CS.TRK) == (1, 2, 4, 8, 0x10, 0x20)
    assert cs_str(CS.TRK | CS.EST | CS.RPL) == "+est+rpl+trk"
    assert cs_str(0) == "-trk"


def test_conn_is_slotted_and_ext_lazy():
    """Conn and TcpConn have no __dict__; ext stays None until a module asks for it."""
    c = Conn(OtherHandler(CtConfig()), 1.0)
    assert not hasattr(c, "__dict__") and not hasattr(TcpConn(OtherHandler(CtConfig()), 0.0),
                                                       "__dict__")
    with pytest.raises(AttributeError):
        c.unknown = 1  # type: ignore[attr-defined]
    assert c.ext is None
    d = c.ext_dict()
    assert c.ext is d and c.ext_dict() is d


def test_conn_views_decode_keys():
    """orig/reply/proto/family/state_name are derived from the stored keys and state."""
    c = Conn(OtherHandler(CtConfig()), 0.0)
    t = FlowTuple(4, 47, ip("1.1.1.1"), ip("2.2.2.2"), 0, 0)
    c.key = key_of_tuple(0, t)
    c.rkey = reverse_key(c.key)
    assert c.orig == t and c.reply == t.reverse() and c.proto == 47 and c.family == 4
    assert c.state_name == "FIRST" and c.timeout_name == "other_first" and c.alive
    assert "proto=47" in repr(c)


def test_alg_relations_live_in_ext():
    """helper/parent/children read as None/None/0 without ext and round-trip through it."""
    h = OtherHandler(CtConfig())
    master, child = Conn(h, 0.0), Conn(h, 0.0)
    assert (child.helper, child.parent, master.children) == (None, None, 0)
    assert child.ext is None and master.ext is None
    child.helper = "ftp"
    child.parent = master
    master.children += 1
    assert (child.helper, child.parent, master.children) == ("ftp", master, 1)


def test_deleting_related_child_decrements_parent():
    """Deleting a connection with a parent decrements the parent's children count."""
    from ctxdp.conntrack import ConnTracker
    from tests.unit.ctutil import P, udp

    ct = ConnTracker()
    m = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 21, 21)), 0, 0.0, commit=True).conn
    c = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 20, 20)), 0, 0.0, commit=True).conn
    c.parent = m
    m.children = 1
    ct.delete(c, 1.0)
    assert m.children == 0
