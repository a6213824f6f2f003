"""Parsing tgtadm's answers, on output captured from a real tgtd 1.0.85.

tests/unit/data/tgtadm-1.0.85-target-show-connected.txt: two exports made
by `vmthunder export` (one with CHAP), while three qemu-io processes held
sessions (two on the first target, one with its own initiator name).
tgtadm-1.0.85-target-show-acl.txt: a bare target with an incoming and an
outgoing account and an ACL of an address range and an initiator name.
Both are byte for byte as tgtadm printed them (trailing spaces included).
"""

import pathlib

import pytest

from vmthunder.volume import tgt

DATA = pathlib.Path(__file__).parent / "data"


def read(name):
    return (DATA / name).read_text()


def test_connected_targets():
    targets = tgt.parse_targets(
        read("tgtadm-1.0.85-target-show-connected.txt"))
    assert [(t.tid, t.name) for t in targets] == [
        (1, "iqn.2026-11.org.vmthunder:demo"),
        (2, "iqn.2026-11.org.vmthunder:demo-q")]
    demo, demo_q = targets
    assert demo.driver == "iscsi" and demo.state == "ready"
    assert demo.nexuses == (
        tgt.Nexus(1, "iqn.2008-11.org.linux-kvm", None, ("127.0.0.1",)),
        tgt.Nexus(3, "iqn.2026-11.org.example:host-b", None,
                  ("127.0.0.1",)))
    assert demo.initiators == [
        "iqn.2008-11.org.linux-kvm (127.0.0.1)",
        "iqn.2026-11.org.example:host-b (127.0.0.1)"]
    assert [lun.lun for lun in demo.luns] == [0, 1, 2]
    controller = demo.lun(0)
    assert controller.type == "controller"
    assert controller.backing_path is None
    assert controller.backing_type == "null"
    assert not controller.readonly
    volume = demo.lun(1)
    assert volume == tgt.Lun(
        lun=1, type="disk", size_mb=5, block_size=512, readonly=True,
        online=True, backing_type="rdwr",
        backing_path="/tmp/vx/store/demo/volume.raw")
    assert demo.lun(2).backing_path == "/tmp/vx/store/demo/manifest.lun"
    assert demo.lun(2).readonly
    assert demo.lun(3) is None
    assert demo.accounts == () and demo.outgoing_accounts == ()
    assert demo.acl == ("ALL",)
    assert demo_q.accounts == ("vmthunder-31b6b297",)
    assert demo_q.initiators == ["iqn.2008-11.org.linux-kvm (127.0.0.1)"]


def test_acl_and_outgoing_account():
    [bare] = tgt.parse_targets(read("tgtadm-1.0.85-target-show-acl.txt"))
    assert (bare.tid, bare.name) == (9, "iqn.2026-11.org.example:bare")
    assert bare.nexuses == ()
    assert [lun.lun for lun in bare.luns] == [0]
    assert bare.accounts == ("in1",)
    assert bare.outgoing_accounts == ("out1",)
    assert bare.acl == ("192.168.0.0/24", "iqn.2026-11.org.example:host-b")


def test_no_targets():
    assert tgt.parse_targets("") == []


def test_unknown_fields_are_skipped():
    text = read("tgtadm-1.0.85-target-show-acl.txt").replace(
        "        State: ready\n",
        "        State: ready\n        Future field: 42\n"
        "    Future section:\n        something\n")
    [bare] = tgt.parse_targets(text)
    assert bare.state == "ready" and bare.acl[0] == "192.168.0.0/24"


def test_not_tgtadm_output():
    with pytest.raises(tgt.TgtError, match="unexpected tgtadm output"):
        tgt.parse_targets("tgtadm: can't find the target\n")
    with pytest.raises(tgt.TgtError, match="line 1"):
        tgt.parse_targets("    LUN information:\n")


def test_portals_and_accounts():
    # tgtd's own fallback when it cannot bind the portal it was given.
    assert tgt.parse_portals("Portal: [::]:3260,1\n"
                             "Portal: 0.0.0.0:3260,1\n") == [
        "[::]:3260", "0.0.0.0:3260"]
    assert tgt.parse_portals("Portal: 127.0.0.1:13270,1\n") == [
        "127.0.0.1:13270"]
    assert tgt.parse_accounts("Account list:\n    in1\n    out1\n"
                              "    vmthunder-31b6b297\n") == [
        "in1", "out1", "vmthunder-31b6b297"]
    assert tgt.parse_accounts("Account list:\n") == []


@pytest.mark.parametrize("portal, expected", [
    ("127.0.0.1:3260", ("127.0.0.1", 3260)),
    ("[::1]:3261", ("::1", 3261)),
    ("[::]:3260", ("::", 3260)),
    ("storage.example:3260", ("storage.example", 3260)),
])
def test_split_portal(portal, expected):
    assert tgt.split_portal(portal) == expected


@pytest.mark.parametrize("portal", [
    "127.0.0.1", ":3260", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000",
    "127.0.0.1:0"])
def test_split_portal_bad(portal):
    with pytest.raises(ValueError, match="HOST:PORT"):
        tgt.split_portal(portal)


def test_portal_covers():
    assert tgt.portal_covers("127.0.0.1:3260", "127.0.0.1:3260")
    assert tgt.portal_covers("0.0.0.0:3260", "127.0.0.1:3260")
    assert tgt.portal_covers("[::]:3260", "[::1]:3260")
    assert not tgt.portal_covers("127.0.0.1:3260", "127.0.0.1:3261")
    assert not tgt.portal_covers("127.0.0.1:3260", "10.0.0.1:3260")
