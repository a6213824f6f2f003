"""An origin whose chunk *and* that chunk's digest-table entry are both
forged (issue 10), against a real tgtd: LUN 1 the image, LUN 2 its
manifest as `vmthunder export` lays it out, both files changed behind
tgtd's back (it reads them through the page cache).

The header and the page digests are untouched, so only the check of the
table's pages against their page digests can catch it. Through both
stacks a host runs (`vmthunder serve`: CacheLayer over the IscsiSource,
checking with the lazily read manifest; the agent with peers: CacheLayer
over an ImageVolume and its PeerDigestTable), a read of the chunk fails
with EIO, neither the chunk nor the table's page is marked in a cache,
and once the origin is repaired the read returns the right bytes.

Needs root and tgt (skips otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from tests.functional.iscsi_fixtures import tgtd  # noqa: F401
from vmthunder.blockdev import BlockError
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.p2p.digest_table import PeerDigestTable
from vmthunder.p2p.volume import ImageVolume, StaticPeers
from vmthunder.volume import manifest as mf
from vmthunder.volume.iscsi_source import IscsiSource

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CS = 4096                       # 2048 chunks: 32 KiB of table, 8 pages
SIZE = 8 * MiB
IQN = "iqn.2024-01.org.vmthunder.test"
BAD = 700                       # on page 2 of the table


def pad512(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def patch(path, offset: int, content: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(content)


async def settle(cache: CacheLayer, table: PeerDigestTable | None) -> None:
    """Background table fetches done, chunks stored, synced and marked."""
    caches = [cache]
    if table is not None:
        await asyncio.gather(*table._keeping, return_exceptions=True)
        caches.append(table.cache)
    for c in caches:
        while c._store_tasks:
            await asyncio.gather(*list(c._store_tasks),
                                 return_exceptions=True)
        if c._syncer is not None:
            await asyncio.gather(c._syncer, return_exceptions=True)


@pytest.mark.parametrize("stack", ["serve", "peers"])
def test_forged_chunk_and_table_entry_on_the_origin(tgtd, tmp_path,  # noqa
                                                    stack):
    data = random.Random(21).randbytes(SIZE)
    volume = tmp_path / "volume.raw"
    volume.write_bytes(data)
    manifest = mf.build_manifest(str(volume), "img", CS)
    raw = manifest.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    mpath = tmp_path / "manifest.lun"
    mpath.write_bytes(pad512(raw))
    ds = manifest.digest_size
    page = BAD * ds // mf.PAGE_SIZE
    entry = head["table_offset"] + BAD * ds
    right_chunk = data[BAD * CS:(BAD + 1) * CS]
    forged = bytearray(right_chunk)
    forged[100:108] = b"FORGED!!"
    forged = bytes(forged)

    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:forged")
    daemon.add_lun(target, 1, str(volume))
    daemon.add_lun(target, 2, str(mpath))
    # The origin forged: the chunk, and its entry in the table.
    patch(volume, BAD * CS, forged)
    patch(mpath, entry, manifest._hash(forged))

    async def main():
        source = await IscsiSource.open(daemon.url(target, 1),
                                        manifest_lun=2)
        lazy = source.manifest
        assert lazy.lazy_loading and lazy == manifest
        table = None
        if stack == "serve":
            cache = CacheLayer(source, str(tmp_path / "cache"),
                               chunk_size=CS, verify=lazy.verify,
                               prepare_verify=lazy.load)
        else:
            peers = StaticPeers([])
            image = ImageVolume(source, lazy, "img", peers,
                                peer_timeout=2)
            table = PeerDigestTable(lazy, "img", peers,
                                    str(tmp_path / "tables"),
                                    peer_timeout=2)
            image.digest_table = table
            cache = CacheLayer(image, str(tmp_path / "cache"),
                               chunk_size=CS, verify=None)
        try:
            # Chunks around it read fine (their pages are right).
            assert await cache.read(0, 2 * CS) == data[:2 * CS]
            for _ in range(2):          # refused again: nothing remembered
                with pytest.raises(BlockError) as info:
                    got = await cache.read((BAD - 1) * CS, 3 * CS)
                    assert got[CS:2 * CS] != forged, "the forgery was served"
                assert info.value.errno == errno.EIO
                assert "'img'" in str(info.value), info.value
                await settle(cache, table)
                assert not cache.map.present(BAD)
                assert not lazy.loaded(BAD)
                if table is not None:
                    assert not table.cache.map.present(page)
            # Repaired.
            patch(volume, BAD * CS, right_chunk)
            patch(mpath, entry, manifest._hash(right_chunk))
            got = await cache.read((BAD - 1) * CS, 3 * CS)
            assert got == data[(BAD - 1) * CS:(BAD + 2) * CS]
            await settle(cache, table)
            assert cache.map.present(BAD)
            if table is not None:
                assert table.cache.map.present(page)
        finally:
            await cache.close()             # and the stack under it
    asyncio.run(main())
