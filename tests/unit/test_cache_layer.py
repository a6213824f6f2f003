"""vmthunder.cache.cache_layer: copy-on-read over a real file source."""

import asyncio
import errno
import json
import os
import random

import pytest

from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.cache import cache_layer
from vmthunder.cache.cache_layer import CacheInUse, CacheLayer
from vmthunder.volume.file_source import FileSource

from tests.waiting import until

CS = 4096                       # chunk size used by most tests
SIZE = 37 * CS + 1234           # the last chunk is short


def run(coro):
    return asyncio.run(coro)


def make_image(path, size=SIZE, seed=1, hole_at=None):
    rng = random.Random(seed)
    data_end = size if hole_at is None else hole_at
    data = rng.randbytes(data_end)
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path), data + bytes(size - data_end)


class CountingSource(blockdev.BlockDevice):
    """A FileSource wrapper that counts reads, can be slow and can fail."""

    capabilities = blockdev.Capabilities(block_status=True)

    def __init__(self, path, delay=0.0):
        self.inner = FileSource(path)
        self.size = self.inner.size
        self.delay = delay
        self.reads = []             # per chunk: (offset, length)
        self.calls = []             # per read() call: (offset, length)
        self.fail = None            # an exception to raise, or None
        self.closed = False

    def identity(self):
        return self.inner.identity()

    async def read(self, offset, length):
        self.calls.append((offset, length))
        # One entry per chunk covered: a fetch of consecutive chunks is
        # one call, but each chunk still came from the source once.
        for pos in range(offset, offset + length, CS):
            self.reads.append((pos, min(CS, offset + length - pos)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return await self.inner.read(offset, length)

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        return await self.inner.block_status(offset, length, context)

    async def close(self):
        self.closed = True
        await self.inner.close()


async def drain(layer):
    """Wait until every background fetch/store/sync of ``layer`` finished."""
    while layer._store_tasks or (layer._syncer and not layer._syncer.done()):
        await asyncio.gather(*list(layer._store_tasks),
                             *([layer._syncer] if layer._syncer else []),
                             return_exceptions=True)


def read_map(layer):
    with open(os.path.join(layer.directory, "map"), "rb") as f:
        return f.read()


def read_data_file(layer, offset, length):
    with open(os.path.join(layer.directory, "data"), "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_chunk_size_must_be_a_power_of_two(tmp_path):
    path, _ = make_image(tmp_path / "img")
    for bad in (0, -4096, 3000, 4097):
        with pytest.raises(ValueError, match="power of two"):
            CacheLayer(FileSource(path), str(tmp_path / "c"),
                       chunk_size=bad)


def test_reads_match_source_at_random_ranges(tmp_path):
    path, image = make_image(tmp_path / "img")
    rng = random.Random(3)

    async def main():
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        assert layer.size == SIZE
        assert layer.chunks == 38
        cases = [
            (0, 1), (CS - 1, 2),            # straddles chunk 0/1
            (CS - 100, 3 * CS),             # straddles several
            (5 * CS, CS),                   # exactly one chunk
            (37 * CS, 1234),                # the whole short last chunk
            (37 * CS + 1000, 234),          # the tail of the last chunk
            (SIZE - 1, 1),
            (36 * CS + 17, CS + 1000),      # into the short chunk
        ]
        for _ in range(300):
            offset = rng.randrange(SIZE)
            length = rng.randint(1, min(SIZE - offset, 5 * CS))
            cases.append((offset, length))
        for offset, length in cases:
            got = await layer.read(offset, length)
            assert len(got) == length
            assert bytes(got) == image[offset:offset + length], \
                (offset, length)
        # Concurrent reads of mixed cached and uncached ranges.
        batch = []
        for _ in range(100):
            offset = rng.randrange(SIZE)
            batch.append((offset, rng.randint(1, min(SIZE - offset,
                                                     3 * CS))))
        results = await asyncio.gather(*(layer.read(o, n)
                                         for o, n in batch))
        for (offset, length), got in zip(batch, results):
            assert bytes(got) == image[offset:offset + length]
        assert bytes(await layer.read(0, SIZE)) == image
        await drain(layer)
        # Each chunk came from the source once and no read was past EOF.
        fetched = sorted(src.reads)
        assert len(fetched) == len(set(fetched)) == layer.chunks
        assert fetched[-1] == (37 * CS, 1234)
        assert all(o % CS == 0 for o, _ in fetched)
        assert layer.stats()["chunks_present"] == layer.chunks
        assert layer.stats()["bytes_fetched"] == SIZE
        await layer.close()
        assert src.closed

    run(main())


def test_read_out_of_range_is_einval(tmp_path):
    path, _ = make_image(tmp_path / "img")

    async def main():
        layer = CacheLayer(FileSource(path), str(tmp_path / "c"),
                           chunk_size=CS)
        for offset, length in ((SIZE, 1), (SIZE - 1, 2), (-1, 1)):
            with pytest.raises(blockdev.BlockError) as info:
                await layer.read(offset, length)
            assert info.value.errno == errno.EINVAL
        await layer.close()

    run(main())


def test_concurrent_reads_of_a_missing_chunk_fetch_once(tmp_path):
    path, image = make_image(tmp_path / "img")

    async def main():
        src = CountingSource(path, delay=0.05)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        base = 3 * CS
        ranges = [(base, CS), (base, 1), (base + 100, 200),
                  (base + CS - 1, 1), (base + 10, CS - 10)] * 4
        results = await asyncio.gather(*(layer.read(o, n)
                                         for o, n in ranges))
        for (offset, length), got in zip(ranges, results):
            assert bytes(got) == image[offset:offset + length]
        assert src.reads == [(base, CS)]
        # Reads spanning chunks 5-7, all at once: one fetch per chunk.
        ranges = [(5 * CS + 7, 2 * CS), (6 * CS, CS), (5 * CS, 3 * CS),
                  (7 * CS + 5, 5)] * 3
        results = await asyncio.gather(*(layer.read(o, n)
                                         for o, n in ranges))
        for (offset, length), got in zip(ranges, results):
            assert bytes(got) == image[offset:offset + length]
        assert sorted(src.reads[1:]) == [(5 * CS, CS), (6 * CS, CS),
                                         (7 * CS, CS)]
        # Readers arriving while the chunk is being stored are served
        # too, still without a second fetch.
        await drain(layer)
        assert bytes(await layer.read(base, CS)) == image[base:base + CS]
        assert len(src.reads) == 4
        assert layer.stats()["chunks_fetched"] == 4
        await layer.close()

    run(main())


def test_a_cancelled_reader_does_not_cancel_the_shared_fetch(tmp_path):
    path, image = make_image(tmp_path / "img")

    async def main():
        src = CountingSource(path, delay=0.05)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        first = asyncio.ensure_future(layer.read(2 * CS, 10))
        second = asyncio.ensure_future(layer.read(2 * CS, CS))
        # Both readers wait for the one fetch (its delay is 50 ms).
        await until(lambda: src.calls, "the fetch to start")
        assert not first.done() and not second.done()
        first.cancel()
        assert bytes(await second) == image[2 * CS:3 * CS]
        with pytest.raises(asyncio.CancelledError):
            await first
        assert src.reads == [(2 * CS, CS)]
        await layer.close()
        assert layer.map.present(2)

    run(main())


def test_source_error_reaches_every_reader_and_is_retried(tmp_path):
    path, image = make_image(tmp_path / "img")

    async def main():
        src = CountingSource(path, delay=0.05)
        src.fail = blockdev.BlockError(errno.EIO, "origin went away")
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        results = await asyncio.gather(
            *(layer.read(4 * CS + i * 100, 50) for i in range(6)),
            return_exceptions=True)
        for res in results:
            assert isinstance(res, blockdev.BlockError), res
            assert res.errno == errno.EIO
            assert "origin went away" in str(res)
        assert src.reads == [(4 * CS, CS)]
        assert not layer.map.present(4)
        assert layer.stats()["fetch_errors"] == 1
        assert layer.stats()["chunks_fetched"] == 0
        # Nothing was written to the cache file.
        assert read_data_file(layer, 4 * CS, CS) == bytes(CS)
        # The failure is not remembered: the next read fetches again.
        src.fail = None
        got = await layer.read(4 * CS, CS)
        assert bytes(got) == image[4 * CS:5 * CS]
        assert src.reads == [(4 * CS, CS), (4 * CS, CS)]
        await layer.close()
        assert layer.map.present(4)
        assert read_map(layer)[4] == 1

    run(main())


def test_verify_failure_neither_stores_nor_serves(tmp_path):
    path, image = make_image(tmp_path / "img")
    checked = []

    def verify(index, data):
        checked.append(index)
        if index == 2:
            raise blockdev.BlockError(errno.EIO,
                                      f"chunk {index}: digest mismatch")

    async def main():
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS,
                           verify=verify)
        # A read covering good chunks 1 and 3 and the bad chunk 2 fails
        # as a whole: no partial or unchecked data reaches the reader.
        with pytest.raises(blockdev.BlockError, match="digest mismatch"):
            await layer.read(CS + 5, 2 * CS)
        with pytest.raises(blockdev.BlockError, match="digest mismatch"):
            await layer.read(2 * CS + 7, 1)
        await drain(layer)
        assert not layer.map.present(2)
        assert layer.map.present(1)
        assert read_data_file(layer, 2 * CS, CS) == bytes(CS)
        assert layer.stats()["fetch_errors"] == 2
        # A good chunk is served and stored.
        got = await layer.read(5 * CS, 10)
        assert bytes(got) == image[5 * CS:5 * CS + 10]
        assert 5 in checked
        # Once the source is right again the chunk is served and kept.
        layer.verify = None
        got = await layer.read(2 * CS, CS)
        assert bytes(got) == image[2 * CS:3 * CS]
        await layer.close()
        assert read_map(layer)[2] == 1
        assert read_data_file(layer, 2 * CS, CS) == image[2 * CS:3 * CS]

    run(main())


def test_restart_keeps_cached_chunks(tmp_path):
    path, image = make_image(tmp_path / "img")
    cache_dir = str(tmp_path / "cache")
    ranges = [(0, 100), (3 * CS - 10, 20), (10 * CS, 4 * CS),
              (37 * CS + 1, 1233)]
    cached = {0, 2, 3, 10, 11, 12, 13, 37}

    async def first():
        src = CountingSource(path)
        layer = CacheLayer(src, cache_dir, chunk_size=CS)
        for offset, length in ranges:
            await layer.read(offset, length)
        await layer.close()
        assert {o // CS for o, _ in src.reads} == cached
        return layer.directory

    async def second():
        src = CountingSource(path)
        layer = CacheLayer(src, cache_dir, chunk_size=CS)
        assert layer.stats()["chunks_present"] == len(cached)
        for offset, length in ranges:
            got = await layer.read(offset, length)
            assert bytes(got) == image[offset:offset + length]
        assert src.reads == []
        # Block status knows them before any read.
        assert bytes(await layer.read(0, SIZE)) == image
        assert {o // CS for o, _ in src.reads} == \
            set(range(38)) - cached
        await layer.close()
        return layer.directory

    d1 = run(first())
    d2 = run(second())
    assert d1 == d2
    assert sorted(os.listdir(d1)) == ["data", "map", "meta.json"]
    with open(os.path.join(d1, "meta.json")) as f:
        meta = json.load(f)
    assert meta["chunk_size"] == CS and meta["size"] == SIZE


def test_existing_cache_keeps_its_chunk_size(tmp_path):
    path, image = make_image(tmp_path / "img")
    cache_dir = str(tmp_path / "cache")

    async def main():
        layer = CacheLayer(FileSource(path), cache_dir, chunk_size=CS)
        await layer.read(0, SIZE)
        await layer.close()
        src = CountingSource(path)
        layer = CacheLayer(src, cache_dir, chunk_size=4 * CS)
        assert layer.chunk_size == CS
        assert bytes(await layer.read(0, SIZE)) == image
        assert src.reads == []
        await layer.close()

    run(main())


def test_each_source_identity_gets_its_own_directory(tmp_path):
    path_a, image_a = make_image(tmp_path / "a", seed=1)
    path_b, image_b = make_image(tmp_path / "b", seed=2)
    cache_dir = str(tmp_path / "cache")

    async def main():
        a = CacheLayer(FileSource(path_a), cache_dir, chunk_size=CS)
        # A second image in the same root is not "in use" by the first.
        b = CacheLayer(FileSource(path_b), cache_dir, chunk_size=CS)
        assert a.directory != b.directory
        assert os.path.dirname(a.directory) == cache_dir
        assert bytes(await a.read(0, SIZE)) == image_a
        assert bytes(await b.read(0, SIZE)) == image_b
        await a.close()
        await b.close()
        # The same file rewritten in place is another identity: its old
        # cache must not be served for the new content.
        new_path, new_image = make_image(tmp_path / "a", seed=3)
        os.utime(new_path, ns=(1, 1))
        src = CountingSource(new_path)
        c = CacheLayer(src, cache_dir, chunk_size=CS)
        assert c.directory not in (a.directory, b.directory)
        assert bytes(await c.read(0, SIZE)) == new_image
        assert len(src.reads) == 38
        await c.close()
        assert len(os.listdir(cache_dir)) == 3

    run(main())


@pytest.mark.parametrize("damage", ["identity", "size", "version",
                                    "garbage"])
def test_same_key_with_mismatching_meta_is_discarded(tmp_path, damage):
    path, image = make_image(tmp_path / "img")
    cache_dir = str(tmp_path / "cache")

    async def fill():
        layer = CacheLayer(FileSource(path), cache_dir, chunk_size=CS)
        await layer.read(0, SIZE)
        await layer.close()
        return layer.directory

    directory = run(fill())
    meta_path = os.path.join(directory, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    good = dict(meta)
    if damage == "garbage":
        text = "{not json"
    else:
        meta[damage] = {"identity": "file:/elsewhere:1:2:3",
                        "size": SIZE * 2, "version": 99}[damage]
        text = json.dumps(meta)
    with open(meta_path, "w") as f:
        f.write(text)
    # What the stale cache holds must not be what we read back.
    with open(os.path.join(directory, "data"), "r+b") as f:
        f.write(b"\xee" * SIZE)

    async def reopen():
        src = CountingSource(path)
        layer = CacheLayer(src, cache_dir, chunk_size=CS)
        assert layer.directory == directory
        assert layer.stats()["chunks_present"] == 0
        assert bytes(await layer.read(0, SIZE)) == image
        assert len(src.reads) == 38
        await layer.close()

    run(reopen())
    with open(meta_path) as f:
        assert json.load(f) == good


def test_two_layers_on_one_directory_is_cache_in_use(tmp_path):
    path, image = make_image(tmp_path / "img")
    cache_dir = str(tmp_path / "cache")

    async def main():
        a = CacheLayer(FileSource(path), cache_dir, chunk_size=CS)
        with pytest.raises(CacheInUse) as info:
            CacheLayer(FileSource(path), cache_dir, chunk_size=CS)
        assert info.value.errno == errno.EBUSY
        assert "in use" in str(info.value)
        assert isinstance(info.value, blockdev.BlockError)
        # The first one still works.
        assert bytes(await a.read(0, 10)) == image[:10]
        await a.close()
        await a.close()         # idempotent
        b = CacheLayer(FileSource(path), cache_dir, chunk_size=CS)
        assert b.map.present(0)
        await b.close()

    run(main())


def test_block_status_cache_context_matches_what_was_read(tmp_path):
    path, _ = make_image(tmp_path / "img")
    rng = random.Random(5)

    async def main():
        layer = CacheLayer(FileSource(path), str(tmp_path / "cache"),
                           chunk_size=CS)
        assert blockdev.VMTHUNDER_CACHE in layer.capabilities.contexts
        ext = await layer.block_status(0, SIZE, blockdev.VMTHUNDER_CACHE)
        assert ext == [blockdev.Extent(SIZE, 0)]
        read_chunks = set()
        for _ in range(8):
            offset = rng.randrange(SIZE)
            length = rng.randint(1, min(SIZE - offset, 3 * CS))
            await layer.read(offset, length)
            read_chunks.update(range(offset // CS,
                                     (offset + length - 1) // CS + 1))
        await layer.read(SIZE - 1, 1)
        read_chunks.add(37)
        await drain(layer)
        for q_off, q_len in ((0, SIZE), (123, SIZE - 500),
                             (5 * CS + 1, 1), (SIZE - 10, 10)):
            ext = await layer.block_status(q_off, q_len,
                                           blockdev.VMTHUNDER_CACHE)
            assert sum(e.length for e in ext) == q_len
            pos = q_off
            for e in ext:
                assert e.length > 0
                assert e.flags in (0, blockdev.STATE_CACHED)
                for byte in (pos, pos + e.length - 1):
                    assert (byte // CS in read_chunks) == \
                        (e.flags == blockdev.STATE_CACHED), (byte, ext)
                pos += e.length
            # Extents are maximal: neighbours differ.
            for x, y in zip(ext, ext[1:]):
                assert x.flags != y.flags
        with pytest.raises(blockdev.BlockError) as info:
            await layer.block_status(0, SIZE, "qemu:dirty-bitmap:x")
        assert info.value.errno == errno.EINVAL
        await layer.close()

    run(main())


def test_base_allocation_passes_the_sources_holes_through(tmp_path):
    hole_at = 20 * CS
    path, image = make_image(tmp_path / "img", hole_at=hole_at)

    async def main():
        src = FileSource(path)
        expected = await src.block_status(0, SIZE)
        if len(expected) < 2:
            pytest.skip("the filesystem of tmp_path reports no holes")
        assert expected[-1].flags == \
            blockdev.STATE_HOLE | blockdev.STATE_ZERO
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        assert await layer.block_status(0, SIZE) == expected
        # Caching a hole's chunks does not turn it into data.
        assert bytes(await layer.read(hole_at, 2 * CS)) == bytes(2 * CS)
        await drain(layer)
        assert await layer.block_status(0, SIZE) == expected
        ext = await layer.block_status(hole_at - 10, 20)
        assert ext == [blockdev.Extent(10, 0),
                       blockdev.Extent(10, blockdev.STATE_HOLE |
                                       blockdev.STATE_ZERO)]
        await layer.close()

    run(main())


# -- the crash rule: a mark only after the data is durable ----------------

@pytest.mark.parametrize("failing", ["pwrite", "fdatasync"])
def test_store_failure_serves_from_memory_but_does_not_mark(
        tmp_path, monkeypatch, failing):
    path, image = make_image(tmp_path / "img")
    calls = []

    async def broken(*args):
        calls.append(args)
        raise OSError(errno.EIO, "Input/output error")

    async def main():
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        monkeypatch.setattr(fileio, failing, broken)
        got = await layer.read(6 * CS + 3, 2 * CS)
        assert bytes(got) == image[6 * CS + 3:8 * CS + 3]
        await drain(layer)
        assert calls, f"{failing} was never called"
        assert layer.stats()["store_errors"] == 3
        assert layer.stats()["chunks_fetched"] == 3
        assert layer.map.count_present() == 0
        monkeypatch.undo()
        await layer.close()
        # Nothing marked on disk (an empty file: nothing was ever saved).
        assert not any(read_map(layer))
        # Reopened, the chunks are fetched again (and now kept).
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS)
        assert layer.map.count_present() == 0
        got = await layer.read(6 * CS, 3 * CS)
        assert bytes(got) == image[6 * CS:9 * CS]
        assert len(src.reads) == 3
        await layer.close()
        assert read_map(layer)[6:9] == b"\x01\x01\x01"

    run(main())


def test_a_failed_sync_marks_none_of_its_batch(tmp_path, monkeypatch):
    """After fdatasync fails, no chunk its batch covered may be marked.

    Linux reports a writeback error to one fdatasync only; a later sync
    returning 0 says nothing about pages whose writeback already failed.
    So the failed batch is dropped (fetched again later), and only chunks
    written after it are marked by the next, successful sync.
    """
    path, image = make_image(tmp_path / "img")
    real = fileio.fdatasync
    syncs = []

    async def main():
        layer = CacheLayer(CountingSource(path), str(tmp_path / "cache"),
                           chunk_size=CS, sync_interval=0)

        async def scripted(fd):
            syncs.append(fd)
            if len(syncs) == 1:
                raise OSError(errno.EIO, "Input/output error")
            return await real(fd)

        monkeypatch.setattr(fileio, "fdatasync", scripted)
        got = await layer.read(0, 3 * CS)
        assert bytes(got) == image[:3 * CS]
        await drain(layer)
        marked = {i for i in range(3) if layer.map.present(i)}
        dropped = set(range(3)) - marked
        # The first sync's batch (at least the first chunk) is unmarked.
        assert 0 in dropped
        assert layer.stats()["store_errors"] == len(dropped)
        # A dropped chunk is fetched (and this time marked) again.
        reads = len(layer.source.reads)
        assert bytes(await layer.read(0, CS)) == image[:CS]
        await drain(layer)
        assert len(layer.source.reads) == reads + 1
        assert layer.map.present(0)
        await layer.close()
        assert sum(read_map(layer)) == len(marked) + 1

    run(main())


def test_consecutive_missing_chunks_come_in_one_source_read(tmp_path):
    """A read over missing chunks costs one call to the source per run
    (at most MAX_FETCH_BYTES and the write slots, a slot being SLOT_UNIT
    worth of small chunks), not one per chunk; chunks already held split
    the runs."""
    pending = 2
    run_chunks = pending * (cache_layer.SLOT_UNIT // CS)
    assert cache_layer.MAX_FETCH_BYTES >= run_chunks * CS
    path, image = make_image(tmp_path / "img",
                             size=(run_chunks + 11) * CS)

    async def main():
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS,
                           max_pending_writes=pending)
        await layer.read(3 * CS, 1)                 # chunk 3 held
        src.calls.clear()
        got = await layer.read(0, 10 * CS)
        assert bytes(got) == image[:10 * CS]
        assert src.calls == [(0, 3 * CS), (4 * CS, 6 * CS)]
        src.calls.clear()
        got = await layer.read(10 * CS, (run_chunks + 1) * CS)
        assert bytes(got) == image[10 * CS:(11 + run_chunks) * CS]
        assert src.calls == [(10 * CS, run_chunks * CS),
                             ((10 + run_chunks) * CS, CS)]
        await layer.close()

    run(main())


def test_a_bad_chunk_in_a_run_fails_only_its_readers(tmp_path):
    path, image = make_image(tmp_path / "img")

    def verify(index, data):
        if index == 5:
            raise blockdev.BlockError(errno.EIO, "chunk 5: digest mismatch")

    async def main():
        src = CountingSource(path)
        layer = CacheLayer(src, str(tmp_path / "cache"), chunk_size=CS,
                           verify=verify)
        results = await asyncio.gather(
            layer.read(4 * CS, 3 * CS),             # one run: 4, 5, 6
            layer.read(4 * CS, 10), layer.read(6 * CS + 1, 10),
            layer.read(5 * CS, 1), return_exceptions=True)
        assert isinstance(results[0], blockdev.BlockError)
        assert isinstance(results[3], blockdev.BlockError)
        assert bytes(results[1]) == image[4 * CS:4 * CS + 10]
        assert bytes(results[2]) == image[6 * CS + 1:6 * CS + 11]
        # The bad chunk was read a second time, alone, before failing.
        assert src.calls[:2] == [(4 * CS, 3 * CS), (5 * CS, CS)]
        await layer.close()
        assert layer.map.present(4) and layer.map.present(6)
        assert not layer.map.present(5)

    run(main())


def test_chunk_state_runs_match_chunk_states(tmp_path):
    """The run form peers are answered from equals the chunk-by-chunk one,
    with held, unsynced and in-flight chunks mixed."""
    path, _ = make_image(tmp_path / "img")
    rng = random.Random(5)

    async def main():
        layer = CacheLayer(CountingSource(path), str(tmp_path / "cache"),
                           chunk_size=CS)
        for _ in range(6):
            i = rng.randrange(layer.chunks)
            await layer.read(i * CS, 1)
        await drain(layer)
        layer._unsynced.add(3, 5)
        layer._unsynced.add(20, 21)
        layer._inflight.update({7: object(), 8: object(), 30: object()})
        for first, last in [(0, layer.chunks), (3, 9), (7, 8), (29, 38),
                            (0, 1)]:
            runs = layer.chunk_state_runs(first, last)
            flat = [state for a, b, state in runs for _ in range(a, b)]
            assert flat == layer.chunk_states(first, last), (first, last)
            assert runs[0][0] == first and runs[-1][1] == last
            assert all(r[2] != n[2] or r[1] != n[0]
                       for r, n in zip(runs, runs[1:]))
        layer._unsynced.clear()
        layer._inflight.clear()
        await layer.close()

    run(main())


def test_write_slots_are_taken_in_turn_and_given_back(tmp_path):
    """A run takes its write slots all at once, in turn: a later small
    run does not overtake an earlier large one, a waiter cancelled gives
    way to the next, and every slot comes back."""
    path, _ = make_image(tmp_path / "img")

    async def main():
        layer = CacheLayer(CountingSource(path), str(tmp_path / "cache"),
                           chunk_size=CS, max_pending_writes=1)
        total = layer._slots_free
        assert total == cache_layer.SLOT_UNIT // CS
        await layer._take_slots(total - 2)              # 2 left
        order = []

        async def take(name, n):
            await layer._take_slots(n)
            order.append(name)

        big = asyncio.ensure_future(take("big", 4))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 1))
        cancelled = asyncio.ensure_future(take("cancelled", 3))
        last = asyncio.ensure_future(take("last", 1))
        await asyncio.sleep(0)
        assert order == []              # "small" fits, but waits its turn
        layer._give_slots(2)            # 4 free: "big" goes
        await asyncio.sleep(0)
        assert order == ["big"]
        await asyncio.sleep(0)
        assert order == ["big"]         # none left for "small"
        cancelled.cancel()
        layer._give_slots(total - 2)
        await asyncio.gather(big, small, last)
        assert await asyncio.gather(cancelled, return_exceptions=True) \
            != [None]
        assert order == ["big", "small", "last"]
        # Taken: total - 2, 4, 1, 1; given back so far: 2, total - 2.
        layer._give_slots(4)
        assert layer._slots_free == total and not layer._slot_waiters
        await layer.close()

    run(main())


def test_unsynced_runs_are_marked_run_by_run(tmp_path):
    """Chunks written and not yet durable are held (served from the file)
    and marked present by the syncer, run by run, after one fdatasync."""
    path, image = make_image(tmp_path / "img")

    async def main():
        layer = CacheLayer(CountingSource(path), str(tmp_path / "cache"),
                           chunk_size=CS, sync_interval=3600)
        await layer.read(0, CS)             # the first sync comes at once
        await drain(layer)
        await layer.read(2 * CS, 3 * CS)
        await layer.read(10 * CS, CS)
        # Written, not durable: held, not marked.
        while len(layer._unsynced) < 4:
            await asyncio.sleep(0.01)
        assert [i for i in range(12) if i in layer._unsynced] \
            == [2, 3, 4, 10]
        assert not layer.map.present(2) and layer.map.present(0)
        assert layer.chunk_state_runs(0, 12) == [
            (0, 1, cache_layer.HELD), (1, 2, cache_layer.MISSING),
            (2, 5, cache_layer.HELD), (5, 10, cache_layer.MISSING),
            (10, 11, cache_layer.HELD), (11, 12, cache_layer.MISSING)]
        assert bytes(await layer.read(2 * CS, 3 * CS)) \
            == image[2 * CS:5 * CS]
        await layer.close()                 # syncs and marks them
        assert [i for i in range(12) if layer.map.present(i)] \
            == [0, 2, 3, 4, 10]
        assert not layer._unsynced

    run(main())


def test_durable_waits_for_the_marks_of_fetched_chunks(tmp_path):
    """durable(): the chunks a read brought are marked once the next sync
    covers them (what a precache waits for before it says done); a chunk
    nobody fetched is not, and the wait ends at its timeout."""
    path, data = make_image(tmp_path / "img")

    async def main():
        layer = CacheLayer(FileSource(path), str(tmp_path / "c"),
                           chunk_size=CS, sync_interval=0.3)
        try:
            assert await layer.read(0, 4 * CS) == data[:4 * CS]
            assert await layer.durable(range(4), timeout=5)
            assert all(layer.map.present(i) for i in range(4))
            assert not await layer.durable([10], timeout=0.2)
        finally:
            await layer.close()
    run(main())
