"""vmthunder/agent/capacity.py in pieces: the account a cache asks before
it keeps a chunk, the chunks VMs read (what an idle image keeps), a cache
directory no one has open evicted map first, the watermarks' check, the
pin in the state file. The policy on a real agent:
tests/functional/test_cache_capacity.py."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import types

import pytest

from vmthunder.agent import capacity
from vmthunder.agent import state as state_mod
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.cache.read_watch import ImageReads
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.volume.file_source import FileSource

CS = 16 * 1024


def test_watermarks_checked():
    with pytest.raises(ValueError, match="low_watermark 95 is above"):
        capacity.CapacityConfig(max_bytes=100, high_watermark=90,
                                low_watermark=95).check()
    config = capacity.CapacityConfig(max_bytes=1000, high_watermark=90,
                                     low_watermark=50)
    assert (config.high_bytes, config.low_bytes) == (900, 500)


def test_the_account_refuses_what_passes_the_cap():
    fs = capacity.FS_BLOCK          # counted with each write
    cap = capacity.Capacity(types.SimpleNamespace(images={}, vms={}),
                            capacity.CapacityConfig(max_bytes=10 * CS),
                            "/nonexistent")
    assert cap.reserve(None, 6 * CS)
    assert cap.held_bytes == 6 * CS + fs
    assert not cap.reserve(None, 4 * CS)
    assert cap.counters["not_kept_bytes"] == 4 * CS
    cap.stored(None, 6 * CS)
    assert (cap.pending, cap.written) == (0, 6 * CS + fs)
    assert cap.reserve(None, 4 * CS - 2 * fs)
    assert not cap.reserve(None, 1)
    # No cap: everything is kept, nothing counted.
    free = capacity.Capacity(types.SimpleNamespace(images={}, vms={}),
                             capacity.CapacityConfig(), "/nonexistent")
    assert free.reserve(None, 1 << 40) and free.held_bytes == 0


def test_need_watch_records_the_chunks_a_vm_reads(tmp_path):
    async def main():
        size = 8 * CS
        image = tmp_path / "image.raw"
        data = os.urandom(size)
        image.write_bytes(data)
        cache = CacheLayer(FileSource(str(image)), str(tmp_path / "cache"),
                           chunk_size=CS)
        snap = SnapshotLayer(cache, str(tmp_path / "snaps"), "vm1",
                             block_size=4096, size=size + CS)
        needed = bytearray(cache.chunks)
        snap.watch = capacity.NeedWatch("vm1", ImageReads(), snap, needed,
                                        CS)
        try:
            assert await snap.read(CS + 100, 10) == data[CS + 100:CS + 110]
            assert await snap.read(3 * CS - 1, CS + 2) \
                == data[3 * CS - 1:4 * CS + 1]
            # Past the image (a larger disk): nothing to record.
            assert await snap.read(size + 10, 100) == bytes(100)
            assert needed == bytearray([0, 1, 1, 1, 1, 0, 0, 0])
        finally:
            await snap.close()
            await cache.close()
    asyncio.run(main())


def _cache_dir(tmp_path, snapshots: bool = False) -> str:
    directory = tmp_path / "0123456789abcdef01234567"
    directory.mkdir()
    (directory / "meta.json").write_text(json.dumps({"identity": "x"}))
    (directory / "map").write_bytes(b"\x01\x00\x01")
    (directory / "data").write_bytes(os.urandom(3 * CS))
    if snapshots:
        (directory / "snapshots").mkdir()
        (directory / "snapshots" / "vm1.overlay").write_bytes(b"x")
    return str(directory)


def test_a_cache_no_one_has_open_loses_its_map_first(tmp_path, monkeypatch):
    directory = _cache_dir(tmp_path)
    calls = []
    unlink, fsync = os.unlink, os.fsync
    monkeypatch.setattr(os, "unlink", lambda p: (
        calls.append(("unlink", os.path.basename(p))), unlink(p))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (
        calls.append(("fsync",)), fsync(fd))[1])
    assert capacity._evict_directory(directory) == 2
    assert calls[:3] == [("unlink", "map"), ("fsync",), ("unlink", "data")]
    assert not os.path.exists(directory)


def test_a_cache_with_vm_files_or_open_elsewhere(tmp_path):
    directory = _cache_dir(tmp_path, snapshots=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert capacity._evict_directory(directory) is None
        assert os.path.exists(os.path.join(directory, "data"))
    finally:
        os.close(fd)
    assert capacity._evict_directory(directory) == 2
    # The VM's files stay, with their directory.
    assert sorted(os.listdir(directory)) == ["snapshots"]


def test_pinned_recorded_in_the_state_file(tmp_path):
    store = state_mod.StateStore(str(tmp_path))
    store.save([{"name": "a", "origin": "/a", "pinned": True},
                {"name": "b", "origin": "/b"}], [])
    state = store.load()
    assert state["images"] == [{"name": "a", "origin": "/a",
                                "pinned": True},
                               {"name": "b", "origin": "/b"}]
    store.save([{"name": "a", "origin": "/a", "pinned": "yes"}], [])
    with pytest.raises(state_mod.StateError, match="'pinned' must be true"):
        store.load()
