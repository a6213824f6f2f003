"""A boot recorded on one host prefetches the boots of the others (issue
16): real agents in network namespaces (the harness's topology: an
origin with tgtd and Redis, hosts in mesh mode, test_peer_faults.py's
Agent), an image of random bytes exported with its manifest and NO
published trace.

Host A's first VM of the image reads a few scattered ranges like a
boot: A records their chunks, keeps the trace and announces a small
entry (key, chunk count, digest) in its membership capabilities. Host B's
VM on the same image is then prefetched from A's recorded trace, read
over NBD from A's peer server. With A gone, two hostile members offer a
trace of the image: one whose bytes do not match the digest it
announces, one whose (matching) bytes name a chunk outside the image.
Both are refused: B's next VM boots without prefetch, and works.

Needs root, tgt, Redis (skips otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.functional import test_peer_faults as _pf
from tests.functional.conftest import REPO, make_image, need
from vmthunder.agent.client import format_status

pytestmark = [_pf.NEEDS_ROOT, pytest.mark.timeout(120)]

MiB = 1 << 20
CHUNK = _pf.CHUNK                       # 256 KiB
IMAGE_SIZE = 16 * MiB                   # 64 chunks
# The "boot": scattered ranges, in this order (chunks 40-41, 5, 60, 10-12).
READS = [(40 * CHUNK, 2 * CHUNK), (5 * CHUNK + 4096, 8192),
         (60 * CHUNK, CHUNK), (10 * CHUNK + 100, 3 * CHUNK - 200)]
TRACE_CHUNKS = 7
# A's recording ends this long after the guest's last read.
A_LINES = "prefetch_idle_seconds = 3.0\n"
# B counts its guest's reads of prefetched chunks (used) until this long
# after its prefetch ended: ample for the test to read them.
B_LINES = "prefetch_idle_seconds = 10\n"


@pytest.fixture(scope="module")
def net():
    """Three hosts and the origin (tgtd exporting the image with its
    manifest, Redis), all torn down after."""
    need("tgtd", "tgtadm", "redis-server", "nbdkit")
    with _pf.mesh_net(None, 3, "vmt-rt", origin_rate="1gbit",
                      make=lambda workdir: make_image(
                          os.path.join(workdir, "image.raw"), IMAGE_SIZE,
                          seed=23)) as net:
        yield net


@pytest.fixture
def agents(net, tmp_path):
    """Factory: agents(host, extra [agent] lines) started, the image
    attached; all stopped at the end; their logs must hold no internal
    error."""
    with _pf.configured_agents(net, str(tmp_path)) as start:
        yield start


def guest_reads(uri: str) -> list[bytes]:
    """READS through the VM's NBD disk, as a booting guest would."""
    async def main():
        from vmthunder.nbd.client import open_nbd
        client = await open_nbd(uri)
        try:
            return [await client.read(off, n) for off, n in READS]
        finally:
            await client.close()
    return _pf.run(main(), 30)


def image_bytes(net) -> list[bytes]:
    with open(net.image, "rb") as f:
        return [os.pread(f.fileno(), n, off) for off, n in READS]


# A hostile peer: two members offering a recorded trace of the image
# through NBD servers of their own: "forged-digest" serves bytes that do
# not match the digest it announces; "outside" serves bytes matching its
# digest that name a chunk outside the image.
HOSTILE = textwrap.dedent("""
    import asyncio, struct, sys
    from vmthunder.agent import recorded_trace as rt, trace_peers
    from vmthunder.agent.membership import Membership
    from vmthunder.nbd.address import Address
    from vmthunder.nbd.server import NbdServer

    backend, address, image, key, cs, chunks = sys.argv[1:7]
    cs, chunks = int(cs), int(chunks)
    served = rt.encode([1, 2, 3], cs, chunks)
    outside = struct.pack("<8sIQI", rt.MAGIC, cs, chunks, 1) \\
        + struct.pack("<QI", chunks + 5, 1)

    async def member(name, port, data, announced):
        server = NbdServer()
        trace = rt.RecordedTrace(key, data, 3)
        server.add_export(trace_peers.export_name(image),
                          trace_peers.RecordedTraceDevice(trace, image),
                          read_only=True)
        await server.listen(Address("tcp", host=address, port=port))
        m = Membership(backend, name, f"tcp:{address}:{port}",
                       heartbeat_s=0.25, refresh_s=0.25)
        await m.announce([image], {image: {
            "key": key, "chunks": 3, "digest": rt.digest(announced)}})
        await m.start()
        return server, m

    async def main():
        made = [await member("zz-forged-digest", 10821, served,
                             served + b"x"),
                await member("zz-outside", 10822, outside, outside)]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(
            None, sys.stdin.read)
        for server, m in made:
            await m.stop()
            await server.close()

    asyncio.run(main())
""")


def test_a_boot_recorded_on_one_host_prefetches_another(net, agents):
    host_a, host_b, host_c = net.hosts[:3]
    want = image_bytes(net)
    a = agents(host_a, A_LINES)
    b = agents(host_b, B_LINES)

    # A: no published trace, no peer offers one: its first boot is
    # recorded (chunks of the image only), then kept and announced.
    vm_a = a.create_vm("a1")
    _pf.wait_for(lambda: (a.status()["boot_trace"] or {}).get("state")
                 == "recording", "A recording its first boot")
    assert guest_reads(vm_a) == want
    rec = _pf.wait_for(
        lambda: (s := a.status()["boot_trace"] or {}).get("state")
        == "recorded" and s, "A's recording to end (idle)")
    assert rec["chunks"] == TRACE_CHUNKS, rec
    assert a.status()["prefetch"]["state"] == "none"
    entry = _pf.wait_for(
        lambda: net.members(host_c).get(host_a.name, {}).get(
            "traces", {}).get(_pf.IMAGE), "A's trace entry in the group")
    # The membership carries a small entry, never the trace.
    assert set(entry) == {"key", "chunks", "digest"}
    assert entry["chunks"] == TRACE_CHUNKS
    assert entry["digest"] == rec["digest"]
    shown = format_status(a.client.status())
    assert (f"image {_pf.IMAGE}: boot trace recorded here ({TRACE_CHUNKS} "
            f"chunks, sha256 {rec['digest'][:16]}...)") in shown, shown

    # B: prefetched from A's recorded trace, read over NBD from A.
    _pf.wait_for(lambda: (b.status()["boot_trace"] or {}).get(
        "offered_by") == [host_a.name], "B to see A's offer")
    vm_b = b.create_vm("b1")
    prefetch = _pf.wait_for(
        lambda: (p := b.status()["prefetch"] or {}).get("state") == "done"
        and p, "B's prefetch from A's recorded trace")
    assert prefetch["trace_source"] == f"recorded by peer {host_a.name}"
    assert prefetch["trace_chunks"] == TRACE_CHUNKS
    # B holds already the chunks it owns that A read (A asked their
    # owner, B, to fetch them: one fetch per chunk across hosts); the
    # others it prefetched.
    assert prefetch["chunks_prefetched"] >= 1, prefetch
    assert prefetch["chunks_prefetched"] + prefetch["chunks_held_already"] \
        == TRACE_CHUNKS, prefetch
    assert prefetch["stop_reason"] == "trace ended"
    used = b.status()["boot_trace"]["used"]
    assert used["peer"] == host_a.name and used["chunks"] == TRACE_CHUNKS
    assert guest_reads(vm_b) == want
    assert b.status()["prefetch"]["chunks_used"] \
        == prefetch["chunks_prefetched"]
    shown = format_status(b.client.status())
    assert (f"image {_pf.IMAGE}: boot trace last prefetch from the trace "
            f"recorded by peer {host_a.name} ({TRACE_CHUNKS} chunks)") \
        in shown, shown

    # A gone; two hostile members offer forged traces: both refused, B's
    # next VM boots without prefetch (it records its own boot instead).
    assert a.stop() == 0
    _pf.wait_for(lambda: host_a.name not in net.members(host_c),
                 "A to leave the group")
    hostile = host_c.popen(
        [sys.executable, "-c", HOSTILE, net.coordination, host_c.address,
         _pf.IMAGE, entry["key"], str(CHUNK), str(IMAGE_SIZE // CHUNK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert hostile.stdout.readline().strip() == "ready"
        _pf.wait_for(lambda: sorted((b.status()["boot_trace"] or {}).get(
            "offered_by", [])) == ["zz-forged-digest", "zz-outside"],
            "B to see the hostile offers")
        vm_b2 = b.create_vm("b2")
        bt = _pf.wait_for(
            lambda: (s := b.status()["boot_trace"] or {}).get("state")
            == "recording" and s, "B to refuse them and record")
        refused = " ".join(bt["used"]["refused"])
        assert "zz-forged-digest" in refused and "does not match the " \
            "digest" in refused, refused
        assert "zz-outside" in refused and "outside the image" in refused
        assert b.status()["prefetch"]["state"] == "none"
        assert guest_reads(vm_b2) == want
    finally:
        hostile.stdin.close()
        try:
            hostile.wait(15)
        except subprocess.TimeoutExpired:
            hostile.kill()
            hostile.wait(10)
