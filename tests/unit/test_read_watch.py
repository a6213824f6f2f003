"""Guest reads watched (vmthunder/cache/read_watch.py): the latency
histogram, hits and misses, reads in progress, through a real
SnapshotLayer over a real CacheLayer over a file."""

from __future__ import annotations

import asyncio
import os

from tests.waiting import until
from vmthunder.cache.cache_layer import HELD, CacheLayer
from vmthunder.cache.read_watch import LATENCY_BUCKETS, ImageReads, VmReads
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.volume.file_source import FileSource

CS = 64 * 1024


def test_histogram_buckets_are_cumulative_and_inclusive():
    reads = ImageReads()
    for seconds in (0.0, 0.0001, 0.00011, 0.003, 7.0, 100.0):
        reads.observe(seconds)
    hist = reads.histogram()
    buckets = dict(hist["buckets"])
    assert list(buckets) == list(LATENCY_BUCKETS) + [float("inf")]
    assert buckets[0.0001] == 2          # at most the bound: inclusive
    assert buckets[0.00025] == 3
    assert buckets[0.005] == 4
    assert buckets[10.0] == 5
    assert buckets[30.0] == 5
    assert buckets[float("inf")] == hist["count"] == 6
    assert abs(hist["sum"] - 107.00321) < 1e-9


def _stack(tmp_path, size=8 * CS):
    image = tmp_path / "image.raw"
    data = os.urandom(size)
    image.write_bytes(data)
    cache = CacheLayer(FileSource(str(image)), str(tmp_path / "cache"),
                       chunk_size=CS)
    snap = SnapshotLayer(cache, str(tmp_path / "snaps"), "vm1",
                         block_size=4096, size=size + CS)
    reads = ImageReads()
    snap.watch = VmReads("vm1", reads, snap)
    return data, cache, snap, reads


def test_hits_misses_and_latency_through_the_stack(tmp_path):
    async def main():
        data, cache, snap, reads = _stack(tmp_path)
        try:
            # Cold: a miss (it fetches).
            assert await snap.read(0, 4096) == data[:4096]
            assert (reads.hits, reads.misses) == (0, 1)
            # Written to the cache file (FETCHING until then: a miss).
            await until(lambda: cache.chunk_states(0, 1) == [HELD],
                        "chunk 0 stored")
            # Held now (written; marked or not yet): a hit.
            assert await snap.read(100, 4000) == data[100:4100]
            assert (reads.hits, reads.misses) == (1, 1)
            # Straddling a held and a missing chunk: a miss.
            await snap.read(CS - 4096, 8192)
            assert (reads.hits, reads.misses) == (1, 2)
            # Blocks the VM wrote, over chunks the cache never fetched:
            # a hit (its overlay holds them).
            await snap.write(5 * CS, b"\xaa" * 8192)
            assert await snap.read(5 * CS, 8192) == b"\xaa" * 8192
            assert (reads.hits, reads.misses) == (2, 2)
            # Past the image (zeros): nothing to fetch, a hit.
            await asyncio.sleep(0.05)
            assert await snap.read(8 * CS + 4096, 4096) == bytes(4096)
            assert (reads.hits, reads.misses) == (3, 2)
            # Writes are not reads.
            assert reads.histogram()["count"] == 5
            assert reads.pending == {}
            # A read served from a resident file (sendfile) waits for
            # nothing: counted as a hit in the first bucket.
            await asyncio.sleep(0.05)
            first = reads.counts[0]
            extent = snap.local_extent(0, 4096)
            if extent is not None:
                assert reads.counts[0] == first + 1
                assert reads.hits == 4
        finally:
            await snap.close()
            await cache.close()
    asyncio.run(main())


class _SlowSource:
    """A source whose reads wait for ``go``."""

    def __init__(self, inner):
        self.inner = inner
        self.size = inner.size
        self.go = asyncio.Event()
        self.capabilities = inner.capabilities
        self.manifest = None

    def identity(self):
        return self.inner.identity()

    def describe(self):
        return "a slow test source"

    async def read_into(self, offset, buffer):
        await self.go.wait()
        await self.inner.read_into(offset, buffer)

    def stats(self):
        return {}

    async def close(self):
        await self.inner.close()


def test_reads_in_progress_and_stalled_ones(tmp_path, caplog):
    async def main():
        image = tmp_path / "image.raw"
        image.write_bytes(os.urandom(4 * CS))
        slow = _SlowSource(FileSource(str(image)))
        cache = CacheLayer(slow, str(tmp_path / "cache"), chunk_size=CS)
        snap = SnapshotLayer(cache, str(tmp_path / "snaps"), "vm1")
        reads = ImageReads()
        snap.watch = VmReads("vm1", reads, snap)
        try:
            task = asyncio.ensure_future(snap.read(2 * CS + 512, 1024))
            await asyncio.sleep(0.05)
            assert len(reads.pending) == 1
            assert reads.stalled_now(10.0) == []
            [stalled] = reads.stalled_now(0.01)
            assert (stalled.vm, stalled.offset, stalled.length) == \
                ("vm1", 2 * CS + 512, 1024)
            assert not stalled.reported
            reads.report(stalled)
            reads.report(stalled)               # counted once
            assert reads.stalled == 1
            assert reads.stalled_now(0.01)[0].reported
            slow.go.set()
            await task
            assert reads.pending == {} and reads.reported == set()
            assert reads.stats() == {"read_hits": 0, "read_misses": 1,
                                     "stalled_reads": 1,
                                     "reads_in_progress": 0}
        finally:
            await snap.close()
            await cache.close()
    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert "VM vm1: the stalled read of 1024 bytes at offset 131584 " \
        "ended after" in caplog.text
