"""Stalled guest reads (vmthunder/agent/health.py): found once each, and
said with what they wait for: the origin, or a peer (here a parent that
accepts and never answers), and which chunk. Real layers over a file;
the slow parts are a gated origin and a silent loopback server."""

from __future__ import annotations

import asyncio
import logging
import random
import types

from tests.unit.test_peer_volume import Origin
from vmthunder.agent.health import StallWatch
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.cache.read_watch import ImageReads, VmReads
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.p2p.volume import ImageVolume, StaticPeers
from vmthunder.volume.manifest import build_manifest

CS = 4096


def _image(tmp_path):
    path = tmp_path / "image.raw"
    data = random.Random(3).randbytes(64 * CS)
    path.write_bytes(data)
    return str(path), data


async def _stalled(tmp_path, source, volume):
    """Start a guest read of chunk 9 through a snapshot over a cache over
    ``source``; let the watch (threshold 0.05 s) find it; the log."""
    cache = CacheLayer(source, str(tmp_path / "cache"), chunk_size=CS,
                       verify=None)
    snap = SnapshotLayer(cache, str(tmp_path / "snaps"), "vm7")
    image = types.SimpleNamespace(name="img", cache=cache, volume=volume,
                                  reads=ImageReads())
    snap.watch = VmReads("vm7", image.reads, snap)
    watch = StallWatch({"img": image}, 0.05)
    read = asyncio.ensure_future(snap.read(9 * CS + 100, 200))
    await asyncio.sleep(0)                      # the read begins
    assert watch.check() == 0                   # not long enough yet
    await asyncio.sleep(0.06)
    assert watch.stalled_now() == 1
    assert watch.check() == 1
    assert watch.check() == 0                   # once
    assert image.reads.stalled == 1
    return read, snap, cache


def test_a_read_waiting_for_the_origin(tmp_path, caplog):
    path, data = _image(tmp_path)

    async def main():
        origin = Origin(path)
        origin.gate = asyncio.Event()
        read, snap, cache = await _stalled(tmp_path, origin, None)
        origin.gate.set()
        assert await read == data[9 * CS + 100:9 * CS + 300]
        await snap.close()
        await cache.close()
        return origin.describe()
    with caplog.at_level(logging.WARNING):
        described = asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("stalled read")]
    assert line.startswith("stalled read: VM vm7 (image img) has waited "), \
        line
    assert line.endswith(f" s for 200 bytes at offset {9 * CS + 100}: "
                         f"chunk 9 from the origin ({described})"), line


def test_a_read_waiting_for_a_peer(tmp_path, caplog):
    path, data = _image(tmp_path)
    manifest = build_manifest(path, "img", CS)

    async def main():
        async def silent(reader, writer):
            try:
                await reader.read()
            finally:
                writer.close()
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        uri = f"nbd://127.0.0.1:{server.sockets[0].getsockname()[1]}/img"
        origin = Origin(path)
        # Tree mode: every read goes to the parent first.
        volume = ImageVolume(origin, manifest, "img", StaticPeers([uri]),
                             mode="tree", peer_timeout=1.0)
        read, snap, cache = await _stalled(tmp_path, volume, volume)
        # The parent times out; the origin serves.
        assert await read == data[9 * CS + 100:9 * CS + 300]
        await snap.close()
        await cache.close()
        server.close()
        return uri
    with caplog.at_level(logging.WARNING):
        uri = asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("stalled read")]
    assert line.endswith(f"at offset {9 * CS + 100}: chunk 9 from parent "
                         f"{uri}"), line
    assert any("the stalled read of 200 bytes" in r.getMessage()
               for r in caplog.records)
