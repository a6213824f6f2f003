"""Recorded boot traces (vmthunder/agent/recorded_trace.py,
trace_recording.py, trace_peers.py), in process: a real CacheLayer over a
real ImageVolume (test_prefetch's stack) and a VM's real SnapshotLayer
with its read watch; the peer side through a real NbdServer.

What is checked: the recording keeps the image's chunks in first-touch
order and nothing of the VM's own data, stops (idle, VM deleted, cap),
is kept on disk atomically and found again; the encoding round-trips and
every malformed, out-of-image or oversized trace is refused; a trace
served by a peer is fetched and checked against its announced digest.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from tests.unit.test_prefetch import CS, close, make_stack
from tests.waiting import until
from vmthunder.agent import recorded_trace as rt
from vmthunder.agent import trace_peers
from vmthunder.agent.prefetch import PrefetchOptions, Prefetches
from vmthunder.agent.trace_recording import BootTraces
from vmthunder import stack
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.p2p.volume import ImageVolume, StaticPeers
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdServer
from vmthunder.volume.published_trace import MAX_REQUESTS

pytestmark = pytest.mark.timeout(60)


class Image:
    """The agent's Image as the prefetch sees it (name, cache, volume,
    source)."""

    def __init__(self, name, cache, volume):
        self.name = name
        self.cache, self.volume, self.source = cache, volume, volume


# -- the encoding -----------------------------------------------------------


async def _no_announce():
    """The agent's announce (membership): nobody to tell here."""


def local_traces(directory, idle_s) -> BootTraces:
    """BootTraces of an agent with no peers, its state in ``directory``."""
    return BootTraces(str(directory), idle_s, None, _no_announce)

def test_encoding_round_trips_as_runs():
    order = [100, 101, 102, 7, 8, 300, 9]
    data = rt.encode(order, CS, 512)
    assert len(data) == rt.HEADER_BYTES + 4 * 12    # four runs
    assert rt.decode(data, CS, 512) == order
    assert rt.encoded_length(data + b"\0" * 100) == len(data)


def _raw(runs, chunk_size=CS, chunks=512, magic=rt.MAGIC):
    return struct.pack("<8sIQI", magic, chunk_size, chunks, len(runs)) \
        + b"".join(struct.pack("<QI", a, n) for a, n in runs)


@pytest.mark.parametrize("data, message", [
    (b"", "at least"),
    (_raw([(1, 2)], magic=b"NOTTRACE"), "not a recorded trace"),
    (_raw([(1, 2)])[:-3], "its header says"),
    (_raw([(1, 2)]) + b"x", "its header says"),
    (_raw([(1, 2)], chunk_size=4096), "this image has 512 chunks of 8192"),
    (_raw([(1, 2)], chunks=513), "this image has 512 chunks"),
    (_raw([(510, 3)]), "outside the image"),
    (_raw([(2 ** 63, 2)]), "outside the image"),
    (_raw([(5, 0)]), "empty"),
    (_raw([(1, 4), (3, 1)]), "a second time"),
])
def test_malformed_or_foreign_traces_are_refused(data, message):
    with pytest.raises(rt.RecordedTraceError, match=message):
        rt.decode(data, CS, 512)


def test_a_trace_of_too_many_chunks_is_refused():
    big = MAX_REQUESTS + 10
    with pytest.raises(rt.RecordedTraceError,
                       match=f"more than {MAX_REQUESTS} chunks"):
        rt.decode(_raw([(0, MAX_REQUESTS), (MAX_REQUESTS, 1)], chunks=big),
                  CS, big)
    assert len(rt.decode(_raw([(0, MAX_REQUESTS)], chunks=big), CS, big)) \
        == MAX_REQUESTS
    with pytest.raises(rt.RecordedTraceError, match="runs; at most"):
        rt.encoded_length(_raw([])[:20] + struct.pack("<I",
                                                      MAX_REQUESTS + 1))


def test_trace_files_are_written_atomically(tmp_path):
    files = rt.TraceFiles(str(tmp_path / "boot-traces"))
    assert files.load("k") is None
    files.save("k", b"one")
    files.save("k", b"two")
    assert files.load("k") == b"two"
    assert os.listdir(files.directory) == ["k.trace"]     # no temp left


# -- recording --------------------------------------------------------------

def test_recording_keeps_image_chunks_in_first_touch_order_then_stops_idle(
        tmp_path):
    """Guest reads become chunk indices in first-touch order, each once;
    a read the VM's overlay serves (its own writes) is not recorded; the
    recording stops after idle_s without reads, is written to the state
    directory and offered (a small capabilities entry)."""
    async def main():
        _, _, volume, cache, snap, _ = make_stack(tmp_path, "r")
        announced = []

        async def announce():
            announced.append(True)
        traces = BootTraces(str(tmp_path / "state"), 0.3, None, announce)
        img = Image("r", cache, volume)
        assert traces.record(img, "vm1", snap)
        assert not traces.record(img, "vm2", snap)      # one per image
        await snap.write(40 * CS, b"\1" * CS)           # the VM's data
        await snap.read(10 * CS, 3 * CS)                # chunks 10-12
        await snap.read(5 * CS + 100, 10)               # chunk 5
        await snap.read(11 * CS, 2 * CS)                # nothing new
        await snap.read(40 * CS, CS)                    # its overlay
        await snap.read(39 * CS, 2 * CS)                # 39 only
        assert traces.status("r") == {"state": "recording", "vm": "vm1",
                                      "chunks": 5}
        await until(lambda: "r" in traces.recorded, "the recording to end")
        assert traces.recordings == {} and announced == [True]
        status = traces.status("r")
        assert status["state"] == "recorded" and status["chunks"] == 5
        entry = traces.capabilities()["r"]
        key = rt.image_key(cache.identity())
        assert entry == {"key": key, "chunks": 5,
                         "digest": status["digest"]}
        data = traces.files.load(key)
        assert rt.digest(data) == entry["digest"]
        assert rt.decode(data, CS, cache.chunks) == [10, 11, 12, 5, 39]
        # Reads after the end are not recorded.
        await snap.read(200 * CS, CS)
        assert traces.recorded["r"].chunks == 5
        # An agent restarted finds it again.
        again = local_traces(tmp_path / "state", 0.3)
        await again.image_attached(img)
        assert again.capabilities() == traces.capabilities()
        await close(cache, snap)
    asyncio.run(main())


def test_recording_stops_when_its_vm_is_deleted_and_at_the_cap(tmp_path):
    async def main():
        _, _, volume, cache, snap, _ = make_stack(tmp_path, "d")

        traces = local_traces(tmp_path / "state", 30)
        img = Image("d", cache, volume)
        traces.record(img, "vm1", snap)
        await snap.read(0, 2 * CS)
        await traces.vm_deleted("d", "other-vm")
        assert traces.status("d")["state"] == "recording"
        await traces.vm_deleted("d", "vm1")
        await until(lambda: "d" in traces.recorded, "the save")
        assert traces.recorded["d"].chunks == 2
        await traces.image_detached("d")
        assert traces.status("d") is None

        # The cap: a recording of at most `cap` chunks.
        capped = local_traces(tmp_path / "state2", 30)
        capped.record(img, "vm2", snap)
        capped.recordings["d"].cap = 3
        await snap.read(100 * CS, 5 * CS)
        await until(lambda: "d" in capped.recorded, "the save")
        assert capped.recorded["d"].chunks == 3
        assert rt.decode(capped.recorded["d"].data, CS, cache.chunks) \
            == [100, 101, 102]
        await capped.stop()

        # The longest recording: a guest that never idles still ends it.
        timed = local_traces(tmp_path / "state3", 30)
        timed.record(img, "vm3", snap)
        timed.recordings["d"].max_s = 0.3
        reader_stop = asyncio.Event()

        async def busy_guest():
            i = 200
            while not reader_stop.is_set():
                await snap.read(i * CS, CS)
                i += 1
                await asyncio.sleep(0.01)
        reader = asyncio.ensure_future(busy_guest())
        await until(lambda: "d" in timed.recorded, "the save", timeout=5)
        reader_stop.set()
        await reader
        assert timed.recorded["d"].chunks >= 1
        await timed.stop()
        await close(cache, snap)
    asyncio.run(main())


def test_prefetches_record_a_boot_then_prefetch_the_next_from_it(tmp_path):
    """No published trace: the first VM's boot is recorded; the next VM
    of the image is prefetched from that recording ("recorded here"),
    and its chunks come before the guest reads them."""
    async def main():
        _, link, volume, cache, snap, _ = make_stack(tmp_path, "p")
        options = PrefetchOptions(idle_s=0.3, window_bytes=64 * CS)

        traces = local_traces(tmp_path / "state", options.idle_s)
        prefetches = Prefetches(options, traces)
        img = Image("p", cache, volume)
        prefetches.vm_created(img, "vm1", snap)
        await asyncio.gather(*prefetches._starting.values())
        assert traces.status("p")["state"] == "recording"
        for first in (300, 20, 150):
            await snap.read(first * CS, 4 * CS)
        await until(lambda: "p" in traces.recorded, "the recording")
        await prefetches.vm_deleted("p", "vm1")
        await close(cache, snap)
        # The image attached again over the same origin, in a fresh cache
        # (nothing held): the next VM is prefetched from the recording.
        volume2 = ImageVolume(link, volume.manifest, "p", StaticPeers([]))
        cache2 = CacheLayer(volume2, str(tmp_path / "cache-p2"),
                            chunk_size=CS)
        img2 = Image("p", cache2, volume2)
        snap2 = stack.open_snapshot(cache2, "vm2")
        prefetches.vm_created(img2, "vm2", snap2)
        await asyncio.gather(*prefetches._starting.values())
        status = await until(
            lambda: (s := prefetches.status("p")) and s.get("state")
            == "done" and s, "the prefetch of the recorded trace")
        assert status["trace_source"] == "recorded here"
        assert status["trace_chunks"] == 12
        assert status["chunks_prefetched"] == 12, str(status)
        assert traces.status("p")["used"] == {"source": "recorded here",
                                              "chunks": 12}
        await prefetches.stop()
        await close(cache2, snap2)
    asyncio.run(main())


# -- between peers ----------------------------------------------------------

def test_a_peer_serves_its_trace_and_a_bad_one_is_refused(tmp_path):
    """Served by a real NbdServer as IMAGE@boot-trace: fetched and used
    when it matches the announced digest; refused when it does not, when
    its peer claims another chunk count, and when it is of another
    image's geometry."""
    async def main():
        order = [7, 8, 9, 100, 3]
        trace = rt.RecordedTrace("k", rt.encode(order, CS, 512), len(order))
        forged = rt.RecordedTrace("k", rt.encode([1, 2], CS, 512), 2)
        server = NbdServer()
        server.add_export(trace_peers.export_name("img"),
                          trace_peers.RecordedTraceDevice(trace, "img"),
                          read_only=True)
        server.add_export(trace_peers.export_name("bad"),
                          trace_peers.RecordedTraceDevice(forged, "bad"),
                          read_only=True)
        address = await server.listen(Address("unix",
                                              path=str(tmp_path / "p.sock")))
        endpoint = str(address)
        entry = {"key": "k", "chunks": 5, "digest": trace.digest}
        try:
            assert await trace_peers.fetch(endpoint, "img", entry, CS, 512,
                                           5) == order
            with pytest.raises(trace_peers.PeerTraceError,
                               match="does not match the digest"):
                await trace_peers.fetch(endpoint, "bad", entry, CS, 512, 5)
            with pytest.raises(trace_peers.PeerTraceError,
                               match="its peer announced 6"):
                await trace_peers.fetch(endpoint, "img",
                                        dict(entry, chunks=6), CS, 512, 5)
            with pytest.raises(trace_peers.PeerTraceError,
                               match="this image has 64 chunks"):
                await trace_peers.fetch(endpoint, "img", entry, CS, 64, 5)
            with pytest.raises(trace_peers.PeerTraceError,
                               match="cannot read"):
                await trace_peers.fetch(endpoint, "none", entry, CS, 512, 5)
        finally:
            await server.close()
    asyncio.run(main())


def test_membership_keeps_only_well_formed_trace_entries():
    """Any member may write anything in its capabilities: only entries
    of the expected shape reach the agent; a member without any has no
    "traces" (the capabilities of agents that recorded nothing are as
    before)."""
    from vmthunder.agent.membership import _parse_members
    good = {"key": "a" * 32, "chunks": 12, "digest": "b" * 64}
    members = _parse_members({
        b"host-a": {"endpoint": "tcp:10.0.0.1:10810", "images": ["img"],
                    "traces": {"img": good,
                               "bad1": dict(good, chunks=-1),
                               "bad2": dict(good, digest="short"),
                               "bad3": dict(good, chunks=True),
                               "bad4": "not a dict"}},
        b"host-b": {"endpoint": "tcp:10.0.0.2:10810", "images": [],
                    "traces": ["not", "a", "dict"]}})
    assert members["host-a"]["traces"] == {"img": good}
    assert "traces" not in members["host-b"]


def test_a_wrong_recorded_trace_costs_at_most_the_window(tmp_path):
    """A recorded trace the guest does not follow (wrong, or hostile but
    well-formed) is prefetched through the same Prefetch as a published
    one: one window of chunks, no more, then it stops idle."""
    async def main():
        _, _, volume, cache, snap, _ = make_stack(tmp_path, "w")
        options = PrefetchOptions(idle_s=0.3, window_bytes=16 * CS)

        traces = local_traces(tmp_path / "state", options.idle_s)
        key = rt.image_key(cache.identity())
        order = list(range(200, 400))
        traces._offer("w", rt.RecordedTrace(
            key, rt.encode(order, CS, cache.chunks), len(order)))
        prefetches = Prefetches(options, traces)
        prefetches.vm_created(Image("w", cache, volume), "vm1", snap)
        await asyncio.gather(*prefetches._starting.values())
        await snap.read(0, 4 * CS)          # the guest reads elsewhere
        status = await until(
            lambda: (s := prefetches.status("w")) and s["state"] != "running"
            and s, "the prefetch to stop")
        assert status["trace_source"] == "recorded here"
        assert status["chunks_prefetched"] == 16, status
        assert status["stop_reason"].startswith("no guest read"), status
        await prefetches.stop()
        await close(cache, snap)
    asyncio.run(main())
