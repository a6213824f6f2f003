"""vmthunder.cache.snapshot: per-VM copy-on-write over a read-only layer."""

import asyncio
import errno
import hashlib
import os
import random

import pytest

from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.cache.snapshot import SnapshotLayer, check_name
from vmthunder.volume.file_source import FileSource

BS = 4096
SIZE = 64 * BS + 1000           # the last block is short


def run(coro):
    return asyncio.run(coro)


def make_image(path, size=SIZE, seed=1, hole_at=None):
    rng = random.Random(seed)
    data_end = size if hole_at is None else hole_at
    # No zero bytes in the data: a block read back as zeros is then
    # always wrong.
    data = bytes(b | 1 for b in rng.randbytes(data_end))
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path), data + bytes(size - data_end)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ReadOnlyLower(blockdev.BlockDevice):
    """A lower layer that fails the test if anything tries to change it."""

    def __init__(self, path):
        self.inner = FileSource(path)
        self.size = self.inner.size
        self.reads = 0
        self.changes = []

    def identity(self):
        return self.inner.identity()

    async def read(self, offset, length):
        self.reads += 1
        return await self.inner.read(offset, length)

    async def write(self, offset, data, fua=False):
        self.changes.append(("write", offset, len(data)))
        raise AssertionError("the snapshot wrote to the layer below")

    async def write_zeroes(self, offset, length, fua=False):
        self.changes.append(("write_zeroes", offset, length))
        raise AssertionError("the snapshot wrote zeroes to the layer below")

    async def trim(self, offset, length):
        self.changes.append(("trim", offset, length))
        raise AssertionError("the snapshot trimmed the layer below")

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        return await self.inner.block_status(offset, length, context)

    async def close(self):
        await self.inner.close()


def crash(snap):
    """Drop a snapshot like a killed process would: no flush, no save."""
    snap.map.close()
    # The page-cache mapping holds the file (and its lock) like the fd.
    snap._resident.close()
    os.close(snap._fd)
    snap._fd = None


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "img")


def test_reads_fall_through_until_written(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert snap.size == SIZE
        assert snap.capabilities.writable
        assert bytes(await snap.read(0, SIZE)) == data
        assert bytes(await snap.read(SIZE - 10, 10)) == data[-10:]
        new = b"\xab" * BS
        await snap.write(3 * BS, new)
        model = bytearray(data)
        model[3 * BS:4 * BS] = new
        assert bytes(await snap.read(0, SIZE)) == model
        assert bytes(await snap.read(3 * BS - 5, 10)) == \
            model[3 * BS - 5:3 * BS + 5]
        # Reads entirely outside written blocks do not touch the overlay.
        before = lower.reads
        assert bytes(await snap.read(10 * BS, 100)) == \
            data[10 * BS:10 * BS + 100]
        assert lower.reads == before + 1
        # ...and reads of written blocks do not go below.
        before = lower.reads
        assert bytes(await snap.read(3 * BS, BS)) == new
        assert lower.reads == before
        await snap.close()
        assert lower.changes == []

    run(main())


@pytest.mark.parametrize("offset,length", [
    (0, BS),                    # aligned, one block
    (2 * BS, 5 * BS),           # aligned, several blocks
    (100, 10),                  # tiny, inside one block
    (BS - 1, 2),                # straddles two blocks
    (BS + 7, BS - 7),           # partial head, ends aligned
    (3 * BS, BS + 123),         # aligned start, partial tail
    (5 * BS - 1, 20 * BS + 2),  # spans many blocks, both ends partial
    (SIZE - 1000, 1000),        # the whole short last block
    (SIZE - 10, 10),            # tail of the short last block
    (63 * BS + 5, BS + 995),    # partial head, ends at the device end
    (0, SIZE),                  # everything
])
def test_writes_aligned_and_unaligned(tmp_path, image, offset, length):
    path, data = image
    rng = random.Random(offset * 31 + length)

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        new = bytes(b | 1 for b in rng.randbytes(length))
        await snap.write(offset, new)
        model = bytearray(data)
        model[offset:offset + length] = new
        assert bytes(await snap.read(0, SIZE)) == model
        # The block map holds exactly the blocks the write touched.
        touched = set(range(offset // BS, (offset + length - 1) // BS + 1))
        assert {i for i in range(snap.blocks) if snap.map.present(i)} == \
            touched
        await snap.close()
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        await snap.close()
        assert lower.changes == []

    run(main())
    assert sha256(path) == hashlib.sha256(data).hexdigest()


def test_random_writes_against_a_model(tmp_path, image):
    path, data = image
    rng = random.Random(11)

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        model = bytearray(data)
        for step in range(300):
            kind = rng.random()
            if kind < 0.3:
                offset = rng.randrange(0, SIZE // BS) * BS
                length = min(rng.randint(1, 4) * BS, SIZE - offset)
            elif kind < 0.6:
                offset = rng.randrange(SIZE)
                length = rng.randint(1, min(200, SIZE - offset))
            else:
                offset = rng.randrange(SIZE)
                length = rng.randint(1, min(6 * BS, SIZE - offset))
            if rng.random() < 0.15:
                await snap.write_zeroes(offset, length)
                model[offset:offset + length] = bytes(length)
            else:
                new = rng.randbytes(length)
                await snap.write(offset, new)
                model[offset:offset + length] = new
            o = rng.randrange(SIZE)
            n = rng.randint(1, min(3 * BS, SIZE - o))
            assert bytes(await snap.read(o, n)) == model[o:o + n], step
        # Concurrent non-overlapping unaligned writes sharing blocks.
        pieces = []
        pos = 7
        while pos < 30 * BS:
            n = rng.randint(1, 3000)
            pieces.append((pos, rng.randbytes(n)))
            pos += n
        await asyncio.gather(*(snap.write(o, d) for o, d in pieces))
        for o, d in pieces:
            model[o:o + len(d)] = d
        assert bytes(await snap.read(0, SIZE)) == model
        await snap.flush()
        await snap.close()
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        await snap.close()
        assert lower.changes == []

    run(main())
    assert sha256(path) == hashlib.sha256(data).hexdigest()


def test_out_of_range_requests_are_einval(tmp_path, image):
    path, _ = image

    async def main():
        snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        for call in (snap.read(SIZE, 1), snap.write(SIZE - 1, b"ab"),
                     snap.write_zeroes(SIZE - 5, 6), snap.trim(-1, 2)):
            with pytest.raises(blockdev.BlockError) as info:
                await call
            assert info.value.errno == errno.EINVAL
        await snap.close()

    run(main())


def test_write_zeroes(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        model = bytearray(data)
        for offset, length in ((BS, 2 * BS), (10 * BS + 3, 5),
                               (20 * BS - 1, 3 * BS), (SIZE - 17, 17)):
            await snap.write_zeroes(offset, length)
            model[offset:offset + length] = bytes(length)
        assert bytes(await snap.read(0, SIZE)) == model
        # fua makes them durable without a separate flush.
        await snap.write_zeroes(40 * BS + 1, 10, fua=True)
        model[40 * BS + 1:40 * BS + 11] = bytes(10)
        crash(snap)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        await snap.close()
        assert lower.changes == []

    run(main())


def test_trim_forgets_only_fully_covered_blocks(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        await snap.write(0, b"A" * (10 * BS))
        # Covers the tail of block 1, blocks 2-4 fully, the head of 5.
        await snap.trim(BS + 100, 4 * BS)
        assert [snap.map.present(i) for i in range(10)] == [
            True, True, False, False, False, True, True, True, True, True]
        assert bytes(await snap.read(2 * BS, 3 * BS)) == \
            data[2 * BS:5 * BS]
        # Partly covered blocks keep what the VM wrote.
        assert bytes(await snap.read(BS, BS)) == b"A" * BS
        assert bytes(await snap.read(5 * BS, BS)) == b"A" * BS
        # Inside one block: nothing is forgotten.
        await snap.trim(7 * BS + 1, BS - 2)
        assert snap.map.present(7)
        # Exactly one block.
        await snap.trim(8 * BS, BS)
        assert not snap.map.present(8) and snap.map.present(9)
        # A trim that ends at the device end covers the short last block.
        await snap.write(SIZE - 1000, b"B" * 1000)
        assert snap.map.present(64)
        await snap.trim(64 * BS, 1000)
        assert not snap.map.present(64)
        assert bytes(await snap.read(SIZE - 1000, 1000)) == data[-1000:]
        await snap.close()
        assert lower.changes == []

    run(main())


def test_block_status(tmp_path):
    hole_at = 32 * BS
    path, _ = make_image(tmp_path / "img", hole_at=hole_at)

    async def main():
        lower = FileSource(path)
        below = await lower.block_status(0, SIZE)
        if len(below) < 2:
            pytest.skip("the filesystem of tmp_path reports no holes")
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert await snap.block_status(0, SIZE) == below
        hole = blockdev.STATE_HOLE | blockdev.STATE_ZERO
        await snap.write(40 * BS, b"x" * BS)
        assert await snap.block_status(0, SIZE) == [
            blockdev.Extent(hole_at, 0),
            blockdev.Extent(8 * BS, hole),
            blockdev.Extent(BS, 0),
            blockdev.Extent(SIZE - 41 * BS, hole)]
        await snap.close()

    run(main())


def test_flush_then_crash_keeps_the_data(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        model = bytearray(data)
        await snap.write(5 * BS, b"F" * BS)
        await snap.write(9 * BS + 10, b"G" * 10)
        model[5 * BS:6 * BS] = b"F" * BS
        model[9 * BS + 10:9 * BS + 20] = b"G" * 10
        await snap.flush()
        crash(snap)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        # A FUA write is durable on its own.
        await snap.write(20 * BS + 1, b"H" * 3, fua=True)
        model[20 * BS + 1:20 * BS + 4] = b"H" * 3
        crash(snap)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        # And a clean close keeps everything too.
        await snap.write(30 * BS, b"I" * BS)
        model[30 * BS:31 * BS] = b"I" * BS
        await snap.close()
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        assert bytes(await snap.read(0, SIZE)) == model
        await snap.close()

    run(main())


def test_unflushed_writes_after_a_crash_are_old_or_new(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        await snap.write(2 * BS, b"1" * BS)
        await snap.flush()
        # Not flushed: an overwrite of a flushed block, a new aligned
        # block, a new partial block, and a range over both kinds.
        await snap.write(2 * BS, b"2" * BS)
        await snap.write(4 * BS, b"N" * BS)
        await snap.write(6 * BS + 5, b"P" * 5)
        await snap.write(7 * BS - 10, b"Q" * (2 * BS))
        crash(snap)
        snap = SnapshotLayer(lower, str(tmp_path / "snaps"), "vm1")
        got = bytes(await snap.read(0, SIZE))

        def block(buf, i):
            return buf[i * BS:(i + 1) * BS]

        assert block(got, 2) in (b"1" * BS, b"2" * BS)
        assert block(got, 4) in (block(data, 4), b"N" * BS)
        new6 = bytearray(block(data, 6))
        new6[5:10] = b"PPPPP"
        new6[BS - 10:] = b"Q" * 10
        assert block(got, 6) in (block(data, 6), bytes(new6),
                                 block(data, 6)[:5] + b"P" * 5 +
                                 block(data, 6)[10:])
        new8 = b"Q" * (BS - 10) + block(data, 8)[BS - 10:]
        assert block(got, 7) in (block(data, 7), b"Q" * BS)
        assert block(got, 8) in (block(data, 8), new8)
        # Everything else is untouched.
        for i in set(range(65)) - {2, 4, 6, 7, 8}:
            assert block(got, i) == block(data, i), i
        await snap.close()

    run(main())


class PowerLoss:
    """Model of a page cache that a power cut empties.

    Overlay writes through vmthunder.fileio stay in memory (visible to
    reads) until an fdatasync of their file starts; the sync writes what
    was there when it started, then takes a while, so writes completing
    meanwhile are not covered. :meth:`cut` returns the on-disk state.
    The chunk map's own writes go straight to the file: the worst case
    for the rule "a mark only after its data is durable".
    """

    def __init__(self, monkeypatch):
        self.pending = {}           # fd -> [(offset, bytes)]
        self.real_pread = fileio.pread
        monkeypatch.setattr(fileio, "pwrite", self.pwrite)
        monkeypatch.setattr(fileio, "pread", self.pread)
        monkeypatch.setattr(fileio, "fdatasync", self.fdatasync)

    async def pwrite(self, fd, data, offset):
        await asyncio.sleep(0)
        self.pending.setdefault(fd, []).append((offset, bytes(data)))

    async def pread(self, fd, length, offset):
        buf = bytearray(await self.real_pread(fd, length, offset))
        buf.extend(bytes(length - len(buf)))
        for w_off, w_data in self.pending.get(fd, ()):
            lo, hi = max(offset, w_off), min(offset + length,
                                             w_off + len(w_data))
            if lo < hi:
                buf[lo - offset:hi - offset] = w_data[lo - w_off:hi - w_off]
        return buf

    async def fdatasync(self, fd):
        for w_off, w_data in self.pending.pop(fd, ()):
            os.pwrite(fd, w_data, w_off)
        await asyncio.sleep(0.002)


def test_power_loss_never_shows_unwritten_blocks(tmp_path, image,
                                                 monkeypatch):
    """Concurrent writes and flushes, then a power cut at a random time.

    Every block must read back as one of the values it held (never
    zeros from a mark whose data was lost), and at least as new as the
    value it had when the last completed flush started.
    """
    path, data = image
    nblocks = SIZE // BS            # whole blocks; the short one stays
    regions = 4
    per = nblocks // regions

    async def one_round(rnd):
        rng = random.Random(rnd)
        sdir = str(tmp_path / f"snaps{rnd}")
        PowerLoss(monkeypatch)
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        # history[i]: the values block i held, oldest first.
        history = [[data[i * BS:(i + 1) * BS]] for i in range(nblocks)]
        durable = [0] * nblocks     # index into history[i]
        model = bytearray(data)

        async def writer(region):
            lo_b = region * per
            for _ in range(40):
                b = rng.randrange(lo_b, lo_b + per)
                if rng.random() < 0.5:
                    offset, length = b * BS, BS * rng.randint(1, 2)
                else:
                    offset = b * BS + rng.randrange(BS)
                    length = rng.randint(1, BS)
                length = min(length, (lo_b + per) * BS - offset)
                new = bytes(v | 1 for v in rng.randbytes(length))
                await snap.write(offset, new)
                model[offset:offset + length] = new
                for i in range(offset // BS, (offset + length - 1) // BS + 1):
                    history[i].append(bytes(model[i * BS:(i + 1) * BS]))

        async def flusher():
            while True:
                mark = [len(h) - 1 for h in history]
                await snap.flush()
                durable[:] = mark
                await asyncio.sleep(rng.random() * 0.004)

        tasks = [asyncio.ensure_future(writer(r)) for r in range(regions)]
        tasks.append(asyncio.ensure_future(flusher()))
        await asyncio.sleep(0.005 + rng.random() * 0.05)
        # The power goes: what is in the files now is all that survives.
        overlay = open(snap.overlay_path, "rb").read()
        bmap = open(snap.map.path, "rb").read()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        crash(snap)
        monkeypatch.undo()
        with open(snap.overlay_path, "wb") as f:
            f.write(overlay)
        with open(snap.map.path, "wb") as f:
            f.write(bmap)
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        got = bytes(await snap.read(0, nblocks * BS))
        await snap.close()
        for i in range(nblocks):
            value = got[i * BS:(i + 1) * BS]
            assert value in history[i], \
                f"round {rnd}: block {i} holds data it never held"
            newest = max(k for k, v in enumerate(history[i]) if v == value)
            assert newest >= durable[i], \
                f"round {rnd}: block {i} lost a flushed write"
        return sum(len(h) - 1 for h in history)

    writes = 0
    for rnd in range(12):
        writes += run(one_round(rnd))
    assert writes > 100


def test_a_write_during_a_flush_is_not_marked_by_it(tmp_path, image,
                                                    monkeypatch):
    """The map a flush saves holds only marks whose data it synced."""
    path, data = image
    real = fileio.fdatasync

    async def main():
        snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        await snap.write(1 * BS, b"a" * BS)

        async def sync_then_write(fd):
            await real(fd)
            # Lands after the sync did its work, before the flush ends.
            await snap.write(3 * BS, b"b" * BS)

        monkeypatch.setattr(fileio, "fdatasync", sync_then_write)
        await snap.flush()
        monkeypatch.undo()
        with open(snap.map.path, "rb") as f:
            on_disk = f.read()
        assert on_disk[1] == 1
        assert on_disk[3] == 0, "block 3 marked before its data was synced"
        # The next flush covers it.
        await snap.flush()
        with open(snap.map.path, "rb") as f:
            assert f.read()[3] == 1
        await snap.close()

    run(main())


def test_delete_removes_only_the_overlay_and_map(tmp_path, image):
    path, data = image
    cache_dir = str(tmp_path / "cache")

    async def main():
        cache = CacheLayer(FileSource(path), cache_dir, chunk_size=16384)
        sdir = os.path.join(cache.directory, "snapshots")
        vm1 = SnapshotLayer(cache, sdir, "vm1")
        vm2 = SnapshotLayer(cache, sdir, "vm2")
        await vm1.write(0, b"1" * BS)
        await vm2.write(0, b"2" * BS)
        await vm1.flush()
        await vm2.flush()
        assert sorted(os.listdir(sdir)) == [
            "vm1.map", "vm1.overlay", "vm2.map", "vm2.overlay"]
        await vm1.delete()
        assert sorted(os.listdir(sdir)) == ["vm2.map", "vm2.overlay"]
        assert sorted(os.listdir(cache.directory)) == [
            "data", "map", "meta.json", "snapshots"]
        assert bytes(await vm2.read(0, BS)) == b"2" * BS
        assert bytes(await cache.read(0, SIZE)) == data
        await vm1.delete()          # idempotent
        # A new vm1 starts from the image again.
        vm1 = SnapshotLayer(cache, sdir, "vm1")
        assert bytes(await vm1.read(0, SIZE)) == data
        await vm1.close()
        await vm2.close()
        await cache.close()

    run(main())
    assert sha256(path) == hashlib.sha256(data).hexdigest()


def test_two_snapshots_over_one_cache_are_independent(tmp_path, image):
    path, data = image

    async def main():
        source = FileSource(path)
        cache = CacheLayer(source, str(tmp_path / "cache"), chunk_size=16384)
        sdir = os.path.join(cache.directory, "snapshots")
        vm1 = SnapshotLayer(cache, sdir, "vm1")
        vm2 = SnapshotLayer(cache, sdir, "vm2")
        m1, m2 = bytearray(data), bytearray(data)
        await vm1.write(BS + 1, b"x" * 100)
        m1[BS + 1:BS + 101] = b"x" * 100
        await vm2.write(BS, b"y" * (3 * BS))
        m2[BS:4 * BS] = b"y" * (3 * BS)
        await vm2.write_zeroes(10 * BS, BS)
        m2[10 * BS:11 * BS] = bytes(BS)
        await vm1.trim(BS, BS)      # forgets vm1's block 1 only
        m1[BS:2 * BS] = data[BS:2 * BS]
        assert bytes(await vm1.read(0, SIZE)) == m1
        assert bytes(await vm2.read(0, SIZE)) == m2
        # Both read the image through one cache: fetched once.
        assert cache.stats()["bytes_fetched"] == SIZE
        assert source.bytes_read == SIZE
        await vm1.close()
        await vm2.close()
        await cache.close()
        cache = CacheLayer(FileSource(path), str(tmp_path / "cache"),
                           chunk_size=16384)
        vm1 = SnapshotLayer(cache, sdir, "vm1")
        vm2 = SnapshotLayer(cache, sdir, "vm2")
        assert bytes(await vm1.read(0, SIZE)) == m1
        assert bytes(await vm2.read(0, SIZE)) == m2
        assert bytes(await cache.read(0, SIZE)) == data
        await vm1.close()
        await vm2.close()
        await cache.close()

    run(main())


def test_one_snapshot_opened_twice_is_busy(tmp_path, image):
    path, _ = image

    async def main():
        a = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        with pytest.raises(blockdev.BlockError) as info:
            SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        assert info.value.errno == errno.EBUSY
        await a.close()
        b = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        await b.close()

    run(main())


def test_reopening_with_another_block_size_keeps_the_data(tmp_path, image):
    """A changed [snapshot] block_size must not silently drop VM data."""
    path, data = image
    sdir = str(tmp_path / "s")

    async def main():
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        await snap.write(0, b"z" * BS)
        await snap.close()
        with pytest.raises(blockdev.BlockError) as info:
            SnapshotLayer(FileSource(path), sdir, "vm1", block_size=2 * BS)
        assert info.value.errno == errno.EINVAL
        assert "block size" in str(info.value)
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        assert bytes(await snap.read(0, BS)) == b"z" * BS
        await snap.close()

    run(main())


@pytest.mark.parametrize("name", [
    "", ".", "..", "../evil", "a/b", "/abs", ".hidden", "-dash", "_x",
    "a b", "vm\n1", "vm1\n", "x" * 129, "é",
])
def test_invalid_names_are_rejected(tmp_path, image, name):
    path, _ = image
    with pytest.raises(ValueError) as info:
        check_name(name)
    assert repr(name) in str(info.value)
    assert "not valid" in str(info.value)
    assert "letters, digits" in str(info.value)
    with pytest.raises(ValueError, match="not valid"):
        SnapshotLayer(FileSource(path), str(tmp_path / "s"), name)
    # Nothing was created, inside or outside the directory.
    assert not os.path.exists(tmp_path / "s") or \
        os.listdir(tmp_path / "s") == []
    assert sorted(os.listdir(tmp_path)) == ["img"] or \
        sorted(os.listdir(tmp_path)) == ["img", "s"]


@pytest.mark.parametrize("name", ["vm1", "a.b_c-d", "9", "x" * 128,
                                  "VM.01"])
def test_valid_names_are_accepted(tmp_path, image, name):
    path, _ = image
    assert check_name(name) == name

    async def main():
        snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), name)
        await snap.write(0, b"q")
        await snap.close()

    run(main())
    assert sorted(os.listdir(tmp_path / "s")) == [name + ".map",
                                                  name + ".overlay"]


def test_block_size_must_be_a_power_of_two(tmp_path, image):
    path, _ = image
    with pytest.raises(ValueError, match="power of two"):
        SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1",
                      block_size=3000)


def test_partial_write_stores_the_whole_block_in_the_overlay(tmp_path,
                                                            image):
    """A partial write copies the rest of its block from below, so the
    overlay alone holds the VM's view of every block it marks."""
    path, data = image

    async def main():
        snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1")
        await snap.write(3 * BS + 100, b"w" * 10)
        await snap.close()

    run(main())
    with open(tmp_path / "s" / "vm1.overlay", "rb") as f:
        f.seek(3 * BS)
        block = f.read(BS)
    expect = bytearray(data[3 * BS:4 * BS])
    expect[100:110] = b"w" * 10
    assert block == expect


# -- virtual size above the image (a flavor's root disk) -----------------

VSIZE = 100 * BS + 123          # past the image, and itself unaligned


def test_reads_past_the_image_are_zeros(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "s"), "vm1", size=VSIZE)
        assert snap.size == VSIZE
        assert bytes(await snap.read(0, VSIZE)) == data + bytes(VSIZE - SIZE)
        assert bytes(await snap.read(SIZE, 10)) == bytes(10)
        assert bytes(await snap.read(VSIZE - 7, 7)) == bytes(7)
        # Straddling the image's end: its bytes, then zeros.
        assert bytes(await snap.read(SIZE - 100, 300)) == \
            data[-100:] + bytes(200)
        # Past the image nothing is asked of the layer below.
        before = lower.reads
        await snap.read(80 * BS, 4 * BS)
        assert lower.reads == before
        # Nothing to sendfile from past the image.
        assert snap.local_extent(80 * BS, BS) is None
        with pytest.raises(blockdev.BlockError) as info:
            await snap.read(VSIZE - 1, 2)
        assert info.value.errno == errno.EINVAL
        await snap.close()
        assert lower.changes == []

    run(main())


def test_writes_past_the_image_persist_across_reopen(tmp_path, image):
    path, data = image
    sdir = str(tmp_path / "s")

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, sdir, "vm1", size=VSIZE)
        model = bytearray(data + bytes(VSIZE - SIZE))
        writes = [
            (90 * BS, b"P" * BS),               # aligned, past the image
            (70 * BS + 5, b"Q" * 20),           # partial block past it
            (SIZE - 50, b"R" * 200),            # straddles the image's end
            (VSIZE - 100, b"S" * 100),          # ends at the virtual end
        ]
        for offset, buf in writes:
            await snap.write(offset, buf)
            model[offset:offset + len(buf)] = buf
        assert bytes(await snap.read(0, VSIZE)) == model
        await snap.close()
        # Reopened without a size: the size it has on disk.
        snap = SnapshotLayer(lower, sdir, "vm1")
        assert snap.size == VSIZE
        assert bytes(await snap.read(0, VSIZE)) == model
        await snap.close()
        # ...and with it.
        snap = SnapshotLayer(lower, sdir, "vm1", size=VSIZE)
        assert bytes(await snap.read(0, VSIZE)) == model
        await snap.close()
        assert lower.changes == []
        assert os.path.getsize(os.path.join(sdir, "vm1.overlay")) == VSIZE

    run(main())


def test_flushed_writes_past_the_image_survive_a_crash(tmp_path, image):
    path, data = image
    sdir = str(tmp_path / "s")

    async def main():
        snap = SnapshotLayer(FileSource(path), sdir, "vm1", size=VSIZE)
        await snap.write(95 * BS, b"C" * BS, fua=True)
        crash(snap)
        snap = SnapshotLayer(FileSource(path), sdir, "vm1", size=VSIZE)
        assert bytes(await snap.read(95 * BS, BS)) == b"C" * BS
        await snap.close()

    run(main())


def test_block_status_past_the_image(tmp_path, image):
    path, _ = image

    async def main():
        snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1",
                             size=VSIZE)
        below = await FileSource(path).block_status(0, SIZE)
        hole = blockdev.STATE_HOLE | blockdev.STATE_ZERO
        assert await snap.block_status(0, VSIZE) == \
            below + [blockdev.Extent(VSIZE - SIZE, hole)]
        await snap.write(80 * BS, b"x" * BS)
        assert await snap.block_status(SIZE, VSIZE - SIZE) == [
            blockdev.Extent(80 * BS - SIZE, hole),
            blockdev.Extent(BS, 0),
            blockdev.Extent(VSIZE - 81 * BS, hole)]
        # A range straddling the image's end.
        got = await snap.block_status(SIZE - 10, 20)
        assert sum(e.length for e in got) == 20
        assert got[-1] == blockdev.Extent(10, hole)
        await snap.close()

    run(main())


def test_write_zeroes_and_trim_past_the_image(tmp_path, image):
    path, data = image

    async def main():
        lower = ReadOnlyLower(path)
        snap = SnapshotLayer(lower, str(tmp_path / "s"), "vm1", size=VSIZE)
        model = bytearray(data + bytes(VSIZE - SIZE))
        await snap.write(SIZE - 2 * BS, b"W" * (VSIZE - SIZE + 2 * BS))
        model[SIZE - 2 * BS:] = b"W" * (VSIZE - SIZE + 2 * BS)
        written = snap.map.count_present()
        # Zeroes from inside the image to past it, ending mid-block.
        await snap.write_zeroes(SIZE - 300, 20 * BS + 1)
        model[SIZE - 300:SIZE - 300 + 20 * BS + 1] = bytes(20 * BS + 1)
        assert bytes(await snap.read(0, VSIZE)) == model
        # Whole blocks past the image were forgotten, not filled.
        assert snap.map.count_present() < written
        # Up to the virtual end (a short last block).
        await snap.write_zeroes(99 * BS, VSIZE - 99 * BS, fua=True)
        model[99 * BS:] = bytes(VSIZE - 99 * BS)
        assert not snap.map.present(snap.blocks - 1)
        # Trim past the image: the VM's blocks are forgotten, zeros show.
        await snap.trim(90 * BS, 5 * BS)
        model[90 * BS:95 * BS] = bytes(5 * BS)
        assert bytes(await snap.read(0, VSIZE)) == model
        crash(snap)
        snap = SnapshotLayer(lower, str(tmp_path / "s"), "vm1")
        # write_zeroes was fua: everything before it is durable.
        assert bytes(await snap.read(0, 90 * BS)) == model[:90 * BS]
        await snap.close()
        assert lower.changes == []

    run(main())


def test_virtual_size_below_the_image_is_refused(tmp_path, image):
    path, _ = image
    with pytest.raises(ValueError) as info:
        SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1",
                      size=SIZE - 1)
    assert str(SIZE - 1) in str(info.value)
    assert str(SIZE) in str(info.value)
    assert not os.path.exists(tmp_path / "s")
    for bad in (True, 1.5e6, "1G"):
        with pytest.raises(ValueError, match="integer"):
            SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1",
                          size=bad)
    # Exactly the image size is the default.
    snap = SnapshotLayer(FileSource(path), str(tmp_path / "s"), "vm1",
                         size=SIZE)
    assert snap.size == SIZE
    run(snap.close())


def test_reopen_smaller_is_refused_larger_grows(tmp_path, image):
    path, data = image
    sdir = str(tmp_path / "s")

    async def main():
        # An image-sized snapshot (unaligned end) written at its last
        # block, then grown twice.
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        await snap.write(SIZE - 1000, b"T" * 1000)
        await snap.write(0, b"H" * BS)
        await snap.close()
        snap = SnapshotLayer(FileSource(path), sdir, "vm1", size=VSIZE)
        model = bytearray(data + bytes(VSIZE - SIZE))
        model[SIZE - 1000:SIZE] = b"T" * 1000
        model[:BS] = b"H" * BS
        assert bytes(await snap.read(0, VSIZE)) == model
        await snap.write(VSIZE - 5, b"E" * 5)
        model[VSIZE - 5:] = b"E" * 5
        await snap.close()
        with pytest.raises(blockdev.BlockError) as info:
            SnapshotLayer(FileSource(path), sdir, "vm1", size=VSIZE - 1)
        assert info.value.errno == errno.EINVAL
        assert str(VSIZE) in str(info.value) and \
            str(VSIZE - 1) in str(info.value)
        assert os.path.getsize(os.path.join(sdir, "vm1.overlay")) == VSIZE
        bigger = VSIZE + 10 * BS
        snap = SnapshotLayer(FileSource(path), sdir, "vm1", size=bigger)
        assert bytes(await snap.read(0, bigger)) == model + bytes(10 * BS)
        await snap.close()
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        assert snap.size == bigger
        await snap.close()

    run(main())


def test_a_grow_interrupted_after_the_map_finishes_at_that_size(tmp_path,
                                                               image):
    path, data = image
    sdir = str(tmp_path / "s")

    async def main():
        snap = SnapshotLayer(FileSource(path), sdir, "vm1")
        await snap.write(0, b"G" * BS)
        await snap.close()
        # The map grew (first, durably), the overlay did not: a crash
        # in between.
        with open(os.path.join(sdir, "vm1.map"), "r+b") as f:
            f.truncate((VSIZE + BS - 1) // BS)
        with pytest.raises(blockdev.BlockError, match="grown"):
            SnapshotLayer(FileSource(path), sdir, "vm1")
        snap = SnapshotLayer(FileSource(path), sdir, "vm1", size=VSIZE)
        assert bytes(await snap.read(0, BS)) == b"G" * BS
        assert bytes(await snap.read(SIZE, VSIZE - SIZE)) == \
            bytes(VSIZE - SIZE)
        await snap.close()

    run(main())


def test_read_now_gives_what_read_gives_or_nothing(tmp_path):
    """The NBD fast path (read_now): the same bytes as read(), counted as
    read() counts them, for ranges all in the overlay or all below it
    (held by the cache); None for the rest, which read() then serves."""
    path, image = make_image(tmp_path / "img")

    async def main():
        cache = CacheLayer(FileSource(path), str(tmp_path / "cache"),
                           chunk_size=4 * BS)
        snap = SnapshotLayer(cache, str(tmp_path / "snaps"), "vm",
                             block_size=BS, size=SIZE + 8 * BS)
        assert cache.read_now(0, BS) is None           # not fetched yet
        assert snap.read_now(0, BS) is None
        await cache.read(0, 8 * BS)
        while not cache.map.all_present(0, 2):     # durable, marked
            await asyncio.sleep(0.01)
        await snap.write(2 * BS, b"w" * BS)
        reads = snap.counters["read_requests"]
        cases = [(0, BS), (BS + 10, 100), (2 * BS, BS), (2 * BS + 5, 7)]
        for offset, length in cases:
            got = snap.read_now(offset, length)
            assert got is not None, (offset, length)
            assert bytes(got) == bytes(await snap.read(offset, length))
        assert snap.counters["read_requests"] == reads + 2 * len(cases)
        # Part overlay, part below; not fetched; past the image: None.
        for offset, length in [(BS, 2 * BS), (20 * BS, BS),
                               (SIZE + BS, BS), (SIZE - 10, 20)]:
            assert snap.read_now(offset, length) is None, (offset, length)
        await snap.close()
        await cache.close()

    run(main())
