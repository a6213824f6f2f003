"""A manifest's digest table, fetched from peers like the image itself.

A compute host reads an image's manifest lazily (volume/manifest.py): the
header and the page digests at attach, the table's pages as chunks are
fetched. With peers, the table is one more image: its "chunks" are the
table's pages, checked against the page digests, and it gets the same
stack as the image: an ImageVolume (holders, owners, the origin's
manifest LUN last) under a CacheLayer, re-exported to peers read-only as
``IMAGE@digests``. So a page of digests leaves the origin about once
however many hosts boot, hosts keep verifying chunks from peers when the
origin is gone, and the table a host loaded survives its restarts.

The manifest checks every page it loads through this cache against its
page digest once more (as it does the pages it reads straight from the
origin): no digest is trusted on the word of whoever filled the cache.
"""

from __future__ import annotations

import asyncio

from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.p2p.export import PeerExport
from vmthunder.p2p.owners import serving_peer
from vmthunder.p2p.volume import ImageVolume
from vmthunder.volume import manifest as manifest_mod

# Export (and peer directory) name of an image's table: IMAGE + SUFFIX.
# '@' is in no image name (agent/service.py check_name), so names never
# collide.
SUFFIX = "@digests"


def table_name(image: str) -> str:
    return image + SUFFIX


def image_of(name: str) -> str:
    """The image a peer export name belongs to (itself for an image)."""
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


class PeerDigestTable:
    """The digest table of ``manifest`` (a lazily read one) for
    ``image``: fetched through peers, cached under ``cache_dir``; from
    now on the manifest loads its pieces through it."""

    def __init__(self, manifest: manifest_mod.Manifest, image: str, peers,
                 cache_dir: str, **volume_options):
        self.name = table_name(image)
        self.volume = ImageVolume(
            manifest.table_device(), manifest.table_manifest(), self.name,
            peers, **volume_options)
        # (Nothing to close if this fails: the volume connects lazily.)
        self.cache = CacheLayer(self.volume, cache_dir,
                                chunk_size=manifest_mod.PAGE_SIZE)
        self._export: PeerExport | None = None
        self._manifest = manifest
        self._keeping: set[asyncio.Task] = set()
        manifest.read_table_through(self.read)

    async def read(self, offset: int, length: int) -> bytes:
        # A host serving an image chunk to a peer (an owner fetching it)
        # checks it against this table: the table is another image, so its
        # pages may come from their own owners (no loop: the table's pages
        # are checked against digests held here). The manifest asks for
        # whole pages and checks them again (Manifest.load).
        token = serving_peer.set(False)
        try:
            return await self.cache.read(offset, length)
        finally:
            serving_peer.reset(token)

    def keep(self, first: int, last: int) -> None:
        """Have this cache hold the table's pages of image chunks [first,
        last), fetched in the background: the host loaded those digests
        straight from the origin (with the chunks' data), and peers may
        ask it for them, also once the origin is gone."""
        ds, page = self._manifest.digest_size, manifest_mod.PAGE_SIZE
        lo = first * ds // page
        hi = min(-(-last * ds // page), self.cache.chunks)
        if lo >= hi or self.cache.map.all_present(lo, hi):
            return
        size = min(hi * page, self.cache.size) - lo * page
        task = asyncio.ensure_future(self.read(lo * page, size))
        self._keeping.add(task)
        # Best effort: a failure leaves the pages to a later read.
        task.add_done_callback(lambda t: self._keeping.discard(t)
                               or t.cancelled() or t.exception())

    def peer_export(self, mode: str) -> PeerExport:
        """The table as peers read it (same modes as the image's)."""
        if self._export is None or self._export.mode != mode:
            self._export = PeerExport(
                self.cache, mode=mode,
                owns=self.volume.owns if mode == "held" else None)
        return self._export

    def stats(self) -> dict:
        return {"pages": self.cache.chunks,
                "pages_held": self.cache.map.count_present(),
                **{k: v for k, v in self.volume.stats().items()
                   if k.startswith(("bytes_", "chunks_"))}}

    async def close(self) -> None:
        for task in list(self._keeping):
            task.cancel()
        await asyncio.gather(*self._keeping, return_exceptions=True)
        await self.cache.close()
