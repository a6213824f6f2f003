"""vmthunder.cache.chunkmap: run searches, persistence, dirty tracking."""

import asyncio
import os
import random

import pytest

from vmthunder.cache import chunkmap
from vmthunder.cache.chunkmap import ChunkMap


def run(coro):
    return asyncio.run(coro)


def brute_runs(states, lo, hi):
    """Reference: maximal runs of equal presence in states[lo:hi]."""
    out = []
    for i in range(lo, hi):
        if out and out[-1][2] == states[i]:
            out[-1] = (out[-1][0], i + 1, states[i])
        else:
            out.append((i, i + 1, states[i]))
    return out


def test_new_map_is_empty():
    m = ChunkMap(10)
    assert len(m) == 10
    assert m.count_present() == 0
    assert m.none_present(0, 10)
    assert not m.all_present(0, 10)
    assert list(m.runs(0, 10)) == [(0, 10, False)]
    assert not m.dirty


def test_set_clear_and_queries():
    m = ChunkMap(16)
    m.set(3)
    m.set(5, 9)
    assert [m.present(i) for i in range(16)] == [
        i == 3 or 5 <= i < 9 for i in range(16)]
    assert m.count_present() == 5
    assert m.all_present(5, 9)
    assert m.all_present(3, 4)
    assert not m.all_present(3, 5)
    assert not m.all_present(4, 9)
    assert m.none_present(0, 3)
    assert m.none_present(9, 16)
    assert not m.none_present(0, 4)
    assert not m.none_present(8, 16)
    # Empty ranges: vacuously all and none present.
    assert m.all_present(0, 0) and m.none_present(5, 5)
    m.clear(6, 8)
    assert [i for i in range(16) if m.present(i)] == [3, 5, 8]
    m.set(0, 16, chunkmap.ABSENT)
    assert m.count_present() == 0


def test_runs_examples():
    m = ChunkMap(12)
    m.set(2, 5)
    m.set(7)
    m.set(11)
    assert list(m.runs(0, 12)) == [
        (0, 2, False), (2, 5, True), (5, 7, False), (7, 8, True),
        (8, 11, False), (11, 12, True)]
    # Sub-ranges start and end inside runs.
    assert list(m.runs(3, 8)) == [(3, 5, True), (5, 7, False),
                                  (7, 8, True)]
    assert list(m.runs(4, 5)) == [(4, 5, True)]
    assert list(m.runs(5, 5)) == []
    m.set(0, 12)
    assert list(m.runs(0, 12)) == [(0, 12, True)]


def test_runs_random_against_reference():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 64)
        m = ChunkMap(n)
        states = [False] * n
        for _ in range(rng.randint(0, 10)):
            lo = rng.randrange(n)
            hi = rng.randint(lo + 1, n)
            present = rng.random() < 0.6
            m.set(lo, hi, chunkmap.PRESENT if present else chunkmap.ABSENT)
            states[lo:hi] = [present] * (hi - lo)
        lo = rng.randrange(n)
        hi = rng.randint(lo, n)
        assert list(m.runs(lo, hi)) == brute_runs(states, lo, hi)
        assert m.all_present(lo, hi) == all(states[lo:hi])
        assert m.none_present(lo, hi) == (not any(states[lo:hi]))
        assert m.count_present() == sum(states)


def test_persistence_round_trip(tmp_path):
    path = str(tmp_path / "map")

    async def main():
        m = ChunkMap(100, path)
        m.set(0)
        m.set(10, 20)
        m.set(99)
        assert m.dirty
        await m.save()
        assert not m.dirty
        m.close()

    run(main())
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) == 100
    assert raw == bytes(1 if i == 0 or 10 <= i < 20 or i == 99 else 0
                        for i in range(100))
    m = ChunkMap(100, path)
    assert [i for i in range(100) if m.present(i)] == \
        [0] + list(range(10, 20)) + [99]
    # A freshly loaded map has nothing to save.
    assert not m.dirty
    m.close()


def test_save_now_round_trip(tmp_path):
    path = str(tmp_path / "map")
    m = ChunkMap(50, path)
    m.set(7, 9)
    m.save_now()
    m.close()
    m = ChunkMap(50, path)
    assert [i for i in range(50) if m.present(i)] == [7, 8]
    m.close()


def test_file_grows_to_full_length_on_first_save(tmp_path):
    path = str(tmp_path / "map")

    async def main():
        m = ChunkMap(1000, path)
        m.set(3)            # only the first bytes are dirty
        await m.save()
        m.close()

    run(main())
    assert os.path.getsize(path) == 1000
    m = ChunkMap(1000, path)
    assert m.count_present() == 1 and m.present(3)
    m.close()


@pytest.mark.parametrize("length", [1, 99, 101, 250])
def test_wrong_length_file_is_ignored(tmp_path, length):
    path = tmp_path / "map"
    path.write_bytes(b"\x01" * length)
    m = ChunkMap(100, str(path))
    assert m.count_present() == 0
    assert list(m.runs(0, 100)) == [(0, 100, False)]
    m.set(5)
    m.save_now()
    m.close()
    # The foreign content is gone, not merged with ours.
    raw = path.read_bytes()
    assert len(raw) == 100
    assert raw == bytes(1 if i == 5 else 0 for i in range(100))


def test_empty_file_is_an_empty_map(tmp_path):
    path = tmp_path / "map"
    path.write_bytes(b"")
    m = ChunkMap(10, str(path))
    assert m.count_present() == 0
    m.close()


def test_bytes_other_than_0_1_are_absent(tmp_path):
    path = tmp_path / "map"
    stored = bytes([0, 1, 2, 0xFF, 1, 0x80, 0x10, 1])
    path.write_bytes(stored)
    m = ChunkMap(len(stored), str(path))
    assert [m.present(i) for i in range(len(stored))] == [
        False, True, False, False, True, False, False, True]
    assert m.count_present() == 3
    assert list(m.runs(0, 8)) == [
        (0, 1, False), (1, 2, True), (2, 4, False), (4, 5, True),
        (5, 7, False), (7, 8, True)]
    assert not m.all_present(1, 3)
    assert m.none_present(2, 4)
    m.close()


def test_save_writes_only_the_changed_range(tmp_path, monkeypatch):
    path = tmp_path / "map"
    path.write_bytes(bytes(100))
    m = ChunkMap(100, str(path))
    # Change the file behind the map's back outside the range we touch:
    # a save that rewrote the whole map would undo it.
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"\x07")
        f.seek(90)
        f.write(b"\x07")
    writes = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        writes.append((offset, bytes(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    m.set(40, 43)
    m.set(50)
    run(m.save())
    assert writes == [(40, bytes([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]))]
    raw = path.read_bytes()
    assert raw[0] == 7 and raw[90] == 7
    assert raw[40:51] == bytes([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1])
    # Nothing dirty: a save writes nothing at all.
    writes.clear()
    run(m.save())
    assert writes == []
    # Clearing is a change too.
    m.clear(41)
    run(m.save())
    assert writes == [(41, b"\x00")]
    m.close()


def test_marks_set_during_a_save_stay_dirty(tmp_path):
    path = str(tmp_path / "map")

    async def main():
        m = ChunkMap(20, path)
        m.set(2)
        saving = asyncio.ensure_future(m.save())
        await asyncio.sleep(0)      # the save copied the map; now writing
        assert not saving.done()
        m.set(15)
        await saving
        assert m.dirty
        with open(path, "rb") as f:
            raw = f.read()
        assert raw[2] == 1 and raw[15] == 0
        await m.save()
        assert not m.dirty
        with open(path, "rb") as f:
            raw = f.read()
        assert raw[2] == 1 and raw[15] == 1
        m.close()

    run(main())


def test_failed_save_keeps_the_range_dirty(tmp_path, monkeypatch):
    path = str(tmp_path / "map")
    m = ChunkMap(20, path)
    m.set(4, 6)
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError):
        run(m.save())
    assert m.dirty
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    run(m.save())
    assert not m.dirty
    m.close()
    m = ChunkMap(20, path)
    assert [i for i in range(20) if m.present(i)] == [4, 5]
    m.close()


def test_save_before_hook_runs_after_the_copy(tmp_path):
    """Marks set while ``before`` runs are not in this save."""
    path = str(tmp_path / "map")

    async def main():
        m = ChunkMap(10, path)
        m.set(1)

        async def before():
            m.set(8)

        await m.save(sync=True, before=before)
        with open(path, "rb") as f:
            raw = f.read()
        assert raw[1] == 1 and raw[8] == 0
        assert m.dirty
        await m.save()
        with open(path, "rb") as f:
            assert f.read()[8] == 1
        m.close()

    run(main())


def test_map_without_file_saves_nothing():
    m = ChunkMap(4)
    m.set(1)
    run(m.save(sync=True))
    m.save_now()
    m.close()
    assert m.present(1)


def test_an_interrupted_first_save_never_leaves_a_short_map(tmp_path,
                                                            monkeypatch):
    """A map file is empty or full length, whatever step fails.

    A short file reads as "not our map" (and a snapshot refuses it), so
    the file must reach its full length before any mark is written.
    """
    path = str(tmp_path / "map")

    def failing_ftruncate(fd, length):
        raise OSError(28, "No space left on device")

    for saver in ("save", "save_now"):
        if os.path.exists(path):
            os.unlink(path)
        m = ChunkMap(100, path)
        m.set(10, 20)
        monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
        with pytest.raises(OSError):
            if saver == "save":
                run(m.save())
            else:
                m.save_now()
        monkeypatch.undo()
        assert os.path.getsize(path) in (0, 100), saver
        assert m.dirty
        m.close()
