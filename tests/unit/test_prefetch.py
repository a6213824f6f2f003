"""Trace prefetch (vmthunder/agent/prefetch.py) and demand-first lanes
(vmthunder/p2p/priority.py), in process: a real CacheLayer over a real
ImageVolume (every chunk checked against a real manifest) and a VM's real
SnapshotLayer with its read watch.

The origin is :class:`SlowLink`, a stand-in for a shaped network link
(one read on the wire at a time, FIFO, a latency plus bytes over a rate):
a tc-shaped link needs network namespaces and root, and what is tested
here is the order the agent puts its reads on such a link, which happens
in the agent's own process.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from tests.waiting import until
from vmthunder import blockdev
from vmthunder import stack
from vmthunder import trace as trace_mod
from vmthunder.agent.prefetch import Prefetch, PrefetchOptions, Prefetches
from vmthunder.cache.cache_layer import HELD, CacheLayer
from vmthunder.cache.read_watch import ImageReads, VmReads
from vmthunder.p2p import priority
from vmthunder.p2p.volume import ImageVolume, StaticPeers
from vmthunder.volume import manifest as mf
# The image fixture of the mesh test (test_peer_volume's hosts).
from tests.unit.test_peer_volume import image  # noqa: F401

pytestmark = pytest.mark.timeout(60)

KiB = 1024
CS = 8 * KiB
SIZE = 4 * 1024 * KiB               # 512 chunks


class SlowLink(blockdev.BlockDevice):
    """Stand-in for a shaped link to the origin (see the module doc):
    reads go on the wire one at a time, in arrival order, each taking
    ``latency`` plus its bytes at ``rate``."""

    def __init__(self, data: bytes, latency: float, rate: float):
        self.data = data
        self.size = len(data)
        self.latency = latency
        self.rate = rate
        self.wire = asyncio.Lock()
        self.reads: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, buf)
        return bytes(buf)

    async def read_into(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        async with self.wire:
            self.reads.append((offset, view.nbytes))
            await asyncio.sleep(self.latency + view.nbytes / self.rate)
        view[:] = self.data[offset:offset + view.nbytes]

    def identity(self) -> str:
        return f"slow-link:{id(self)}"


def make_stack(tmp_path, name: str, *, latency=0.0005, rate=400e6,
               lanes=True):
    """A VM's snapshot over a cache over an ImageVolume (with its
    lanes) over the link; ``lanes`` False: the cache right over the link
    (an agent with peers off)."""
    data = random.Random(5).randbytes(SIZE)
    path = tmp_path / f"{name}.raw"
    path.write_bytes(data)
    manifest = mf.build_manifest(str(path), name, CS)
    link = SlowLink(data, latency, rate)
    volume = ImageVolume(link, manifest, name, StaticPeers([])) \
        if lanes else None
    cache = CacheLayer(volume or link, str(tmp_path / f"cache-{name}"),
                       chunk_size=CS)
    reads = ImageReads()
    snap = stack.open_snapshot(cache, "vm1")
    snap.watch = VmReads("vm1", reads, snap)
    return data, link, volume, cache, snap, reads


async def close(cache, snap, run=None):
    if run is not None:
        await run.stop("test over")
    await snap.close()
    await cache.close()


def test_prefetch_reads_the_trace_ahead_and_the_guest_hits(tmp_path):
    """The trace's chunks, in trace order, fetched ahead of a guest that
    has not read yet; the guest's reads then hit the cache (nothing more
    from the origin) and count as used."""
    async def main():
        data, link, volume, cache, snap, reads = make_stack(tmp_path, "a")
        runs = [(100, 116), (300, 316), (50, 66), (400, 416)]
        order = [i for a, b in runs for i in range(a, b)]
        run = Prefetch("a", cache, volume, order, PrefetchOptions(
            window_bytes=1024 * KiB, run_bytes=64 * KiB, idle_s=5))
        snap.watch = run.watch(snap.watch)
        run.start()
        await until(lambda: run.state == "done" or
                    run.counters["chunks_prefetched"] == len(order),
                    "the trace's 64 chunks prefetched")
        assert run.counters["chunks_prefetched"] == 64
        # A chunk handed to the prefetch is stored just after (FETCHING
        # until its write lands); a guest read before then counts a miss.
        await until(lambda: all(cache.chunk_states(a, b) == [HELD] * (b - a)
                                for a, b in runs),
                    "the trace's chunks stored")
        # In trace order, in pieces of at most 64 KiB.
        firsts = [off // CS for off, _ in link.reads]
        assert firsts == [100, 108, 300, 308, 50, 58, 400, 408], firsts
        assert all(n <= 64 * KiB for _, n in link.reads)
        from_origin = volume.counters["chunks_from_origin"]
        for a, b in runs:
            got = await snap.read(a * CS, (b - a) * CS)
            assert got == data[a * CS:b * CS]
        assert reads.hits == 4 and reads.misses == 0
        assert volume.counters["chunks_from_origin"] == from_origin == 64
        progress = run.progress()
        assert progress["chunks_used"] == 64
        assert progress["chunks_unused"] == 0
        await close(cache, snap, run)
    asyncio.run(main())


async def guest_latencies(snap, chunks) -> list[float]:
    """A guest reading ``chunks`` one after the other (each read waits for
    the last): each read's seconds."""
    took = []
    for i in chunks:
        t = time.monotonic()
        await snap.read(i * CS, CS)
        took.append(time.monotonic() - t)
    return took


@pytest.mark.parametrize("lanes", [True, False],
                         ids=["image-volume", "plain-origin"])
def test_wrong_trace_never_goes_before_demand_and_stops_at_its_window(
        tmp_path, lanes):
    """A trace of chunks the guest never reads, with a deep prefetch
    queue (16 reads of 64 KiB, 128 ms of this link's time): the guest's
    reads wait about as long as with no prefetch at all (each finds at
    most one prefetch read on the wire, none queued ahead), and the
    prefetch fetches its window and no more. With peers (the cache over
    an ImageVolume) the lanes hold prefetch reads back; over a plain
    origin the prefetch itself waits for the guest's reads."""
    latency, rate = 0.002, 8e6          # 8 KiB: ~3 ms; 64 KiB: ~10 ms
    guest = list(range(0, 24))

    async def baseline():
        _, _, _, cache, snap, _ = make_stack(tmp_path, "base", latency=latency,
                                             rate=rate)
        took = await guest_latencies(snap, guest)
        await close(cache, snap)
        return took

    async def with_prefetch():
        _, link, volume, cache, snap, _ = make_stack(
            tmp_path, "pf", latency=latency, rate=rate, lanes=lanes)
        wrong = list(range(256, 512))       # the guest reads none of them
        window = 128
        run = Prefetch("pf", cache, volume, wrong, PrefetchOptions(
            window_bytes=window * CS, run_bytes=64 * KiB, parallel=16,
            idle_s=30))
        snap.watch = run.watch(snap.watch)
        run.start()
        # The guest starts once the prefetch is on the wire, its other
        # reads queued (in the lane, or without lanes on the link).
        await until(lambda: link.reads, "a prefetch read on the wire")
        await asyncio.sleep(0.005)
        took = await guest_latencies(snap, guest)
        await until(lambda: run.counters["chunks_prefetched"] >= window,
                    "the window prefetched", timeout=20)
        # ... and nothing past it, however long it waits for the guest.
        await asyncio.sleep(0.2)
        assert run.counters["chunks_prefetched"] == window
        assert run.state == "running"
        assert run.progress()["chunks_unused"] == window
        if lanes:
            lane = volume.lanes.lane("origin").stats()
            assert lane["prefetch_waited"] > 0
            assert lane["demand_reads"] >= len(guest)
        fetched = sorted({off // CS for off, _ in link.reads})
        assert max(fetched) < 256 + window
        await close(cache, snap, run)
        return took

    base = asyncio.run(baseline())
    pf = asyncio.run(with_prefetch())
    piece = latency + 64 * KiB / rate           # one prefetch read: 10 ms
    # Without lanes, the first read would wait behind 16 queued prefetch
    # reads (~160 ms) and later ones behind new ones.
    assert max(pf) < max(base) + 2 * piece + 0.02, (base, pf)
    assert statistics.mean(pf) < statistics.mean(base) * 1.5 + 0.003, (
        base, pf)


def test_lane_demand_first_promotion_and_cancel():
    """A lane: prefetch reads wait while demand runs (and its grace),
    one at a time; a waiting one a guest asks for is promoted; a
    cancelled waiter leaves no count behind."""
    async def main():
        lane = priority.Lane("origin", prefetch_limit=1, grace=0.0)
        assert await lane.enter(0, 1) == priority.DEMAND
        token = priority.priority.set(priority.PREFETCH)
        try:
            waits = [asyncio.ensure_future(lane.enter(i, i + 1))
                     for i in (10, 20, 30)]
        finally:
            priority.priority.reset(token)
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waits)
        assert lane.promote(20, 21) == 1
        assert await waits[1] == priority.DEMAND
        waits[2].cancel()
        await asyncio.gather(waits[2], return_exceptions=True)
        lane.leave(priority.DEMAND)          # the first demand read
        assert not waits[0].done()           # the promoted one runs
        lane.leave(priority.DEMAND)
        assert await waits[0] == priority.PREFETCH
        assert lane.stats()["prefetch_queued"] == 0
        lane.leave(priority.PREFETCH)
        assert (lane.demand, lane.prefetch) == (0, 0)
        assert lane.counters["promoted"] == 1
    asyncio.run(main())


def test_prefetches_without_a_published_trace_do_nothing(tmp_path):
    """An image whose origin publishes no trace: no prefetch, a note in
    the status; VMs and detach go on as before."""
    async def main():
        _, _, volume, cache, snap, _ = make_stack(tmp_path, "n")

        class Image:
            name = "n"
        img = Image()
        img.cache, img.volume, img.source = cache, volume, volume
        prefetches = Prefetches(PrefetchOptions())
        prefetches.vm_created(img, "vm1", snap)
        await asyncio.gather(*prefetches._starting.values())
        assert prefetches.status("n") == {
            "state": "none",
            "note": "no boot trace published with the image"}
        await prefetches.vm_deleted("n", "vm1")
        await prefetches.image_detached("n")
        assert prefetches.status("n") is None
        await close(cache, snap)
    asyncio.run(main())


def test_manifest_names_a_published_trace_and_refuses_a_bad_entry():
    m = mf.Manifest("img", 3 * CS, CS, table=bytes(3 * mf.DIGEST_SIZE))
    digest = mf.HASHES[m.algorithm](b"trace").hexdigest()
    m.trace = {"lun": 3, "bytes": 5, "digest": digest, "compressed": True}
    raw = m.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    assert head["trace"] == m.trace
    again = mf.Manifest.from_bytes(raw)
    assert again.trace == m.trace and again.identity() == m.identity()
    for bad in ({"lun": 3, "bytes": 0, "digest": digest},
                {"lun": 3, "bytes": 5, "digest": digest[:-2]},
                {"lun": "3", "bytes": 5, "digest": digest},
                {"lun": 3, "bytes": mf.MAX_TRACE_BYTES + 1,
                 "digest": digest}, "trace"):
        m.trace = bad
        with pytest.raises(mf.ManifestError, match="trace entry"):
            mf.parse_header(m.to_bytes()[:mf.HEADER_BYTES])


def test_trace_loads_and_until_boot(tmp_path):
    header = {"format": trace_mod.FORMAT, "version": trace_mod.VERSION,
              "image_size": SIZE, "boot_s": 0.5}
    trace = trace_mod.Trace(header, [
        trace_mod.Request(0.1, 0.2, "R", 0, CS),
        trace_mod.Request(0.9, 1.0, "R", 5 * CS, CS)])
    path = tmp_path / "t.trace.gz"
    trace_mod.save(trace, str(path))
    got = trace_mod.loads(path.read_bytes(), "t", compressed=True)
    assert got.requests == trace.requests
    assert [r.offset for r in got.until_boot().requests] == [0]
    with pytest.raises(trace_mod.TraceError):
        trace_mod.loads(path.read_bytes()[:-8], "t", compressed=True)


def test_a_guest_read_of_a_queued_prefetch_chunk_promotes_it(tmp_path):
    """Prefetch reads queued behind a guest's read; the guest then asks
    for a chunk one of them brings (it joins that fetch in the cache):
    that read goes at once, not after the queue."""
    latency, rate = 0.002, 8e6                 # 64 KiB: ~10 ms

    async def main():
        data, link, volume, cache, snap, _ = make_stack(
            tmp_path, "pr", latency=latency, rate=rate)
        run = Prefetch("pr", cache, volume, list(range(256, 384)),
                       PrefetchOptions(window_bytes=128 * CS,
                                       run_bytes=64 * KiB, parallel=16))
        snap.watch = run.watch(snap.watch)
        lane = volume.lanes.lane("origin")
        # A guest read holds the lane while the prefetch queues.
        first = asyncio.ensure_future(snap.read(0, 64 * KiB))
        await until(lambda: lane.demand, "the guest's read in the lane")
        run.start()
        await until(lambda: len(lane.waiting) >= 15, "prefetch queued")
        await first
        on_wire = len(link.reads)
        # Chunk 380: in the last prefetch read of the queue.
        got = await snap.read(380 * CS, CS)
        assert got == data[380 * CS:381 * CS]
        assert run.counters["promoted"] >= 1
        # Checked by wire order, not time: the read bringing chunk 380
        # went on the link next (or after the one already there), not
        # after the queue's 15.
        which = next(k for k, (off, n) in enumerate(link.reads)
                     if off <= 380 * CS < off + n)
        assert which <= on_wire + 1, (which, on_wire, link.reads)
        await close(cache, snap, run)
    asyncio.run(main())


def test_three_hosts_prefetch_through_owners_each_chunk_from_the_origin_once(
        tmp_path, image):  # noqa: F811 (the fixture)
    """Three hosts (test_peer_volume's MeshHost: ImageVolume with owners,
    CacheLayer, PeerExport over NBD) prefetch the same trace (the whole
    image) at once: each fetches the chunks it owns from the origin and
    leaves the others' to their owners, then reads them from those; each
    chunk leaves the origin about once and every host ends holding all."""
    from tests.unit.test_peer_volume import mesh

    async def main():
        counts = {}
        hosts = await mesh(tmp_path, image, ["h0", "h1", "h2"], counts)
        try:
            runs = [Prefetch("img", h.cache, h.volume, list(range(256)),
                             PrefetchOptions(window_bytes=256 * 4096,
                                             settle_s=0, idle_s=5))
                    for h in hosts]
            for r in runs:
                r.start()
            await until(lambda: all(r.state != "running" for r in runs),
                        "the three prefetches done", timeout=20)
            # A chunk handed to its reader is stored just after.
            await until(lambda: all(h.cache.chunk_states(0, 256)
                                    == [HELD] * 256 for h in hosts),
                        "every host holding the whole trace", timeout=10)
            for r, h in zip(runs, hosts):
                assert r.state == "done", r.progress()
                assert r.counters["chunks_deferred"] > 0
                assert h.volume.stats()["chunks_from_peers"] > 0
            assert sorted(counts) == list(range(256))
            assert sum(counts.values()) <= 1.1 * 256, counts
        finally:
            for h in hosts:
                await h.stop()
    asyncio.run(main())
