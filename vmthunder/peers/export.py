"""A host's image cache re-exported, read-only, to the other hosts.

The peer NBD server of a host exports one :class:`PeerExport` per image it
caches. Per-VM snapshots are never exported (tenant data stays on its
host): a PeerExport wraps a :class:`~vmthunder.cache.cache_layer.CacheLayer`
and nothing else.

Modes:

``held`` (mesh)
    A read is served only from what the cache holds (marked, or written
    and not yet durable) or has in flight (the reader waits for it to
    land). A read touching any other chunk fails at once with ENOTSUP on
    the wire and fetches nothing: a peer never fetches on behalf of
    another, so misses do not cascade from host to host.
``through`` (tree)
    Reads are ordinary cache reads: a miss is fetched from the layer
    below (the parent, or the origin), so children read through.

Block status in the ``vmthunder:cache`` context reports held chunks as
STATE_CACHED and chunks in flight as STATE_CACHED | STATE_FETCHING. Only
"rooted" fetches are reported (and waited for in ``held`` mode): those the
cache's source reads from the origin or from a peer that *holds* the
chunk (ImageVolume.fetch_is_rooted). A fetch that itself waits for
another peer's in-flight fetch is not offered, so waits never chain and
two hosts can never wait for each other.
"""

from __future__ import annotations

import errno

from vmthunder import blockdev
from vmthunder.cache import cache_layer
from vmthunder.cache.cache_layer import CacheLayer

MODES = ("held", "through")


class PeerExport(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(
        block_status=True,
        contexts=(blockdev.BASE_ALLOCATION, blockdev.VMTHUNDER_CACHE))

    def __init__(self, cache: CacheLayer, mode: str = "held"):
        if mode not in MODES:
            raise ValueError(f"peer export mode {mode!r}: expected one of "
                             f"{', '.join(MODES)}")
        self.cache = cache
        self.mode = mode
        self.size = cache.size
        self.chunk_size = cache.chunk_size
        # The cache's source tells which of its fetches may be waited for.
        self._rooted = getattr(cache.source, "fetch_is_rooted", None)
        self.counters = {"reads": 0, "bytes_served": 0, "refused": 0,
                         "status_queries": 0}

    def describe(self) -> str:
        return f"peer export ({self.mode}) of {self.cache.describe()}"

    def identity(self) -> str:
        return self.cache.identity()

    def _waitable(self, index: int) -> bool:
        return self._rooted is None or self._rooted(index)

    async def read(self, offset: int, length: int) -> bytes:
        data = blockdev.joined(await self.read_parts(offset, length))
        return bytes(data) if isinstance(data, memoryview) else data

    async def read_parts(self, offset: int, length: int) -> list:
        self.check_range(offset, length)
        if self.mode == "through":
            parts = await self.cache.read_parts(offset, length)
        else:
            try:
                parts = await self.cache.read_held(offset, length,
                                                   wait=self._waitable)
            except blockdev.BlockError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                self.counters["refused"] += 1
                # ENODATA is not an NBD error; ENOTSUP is ("not this
                # range, not now"), and ImageVolume reads it as "not held".
                raise blockdev.BlockError(errno.ENOTSUP, str(exc)) from None
        self.counters["reads"] += 1
        self.counters["bytes_served"] += length
        return parts

    def local_extent(self, offset: int, length: int):
        # Only ranges the cache holds, marked, in the page cache: right in
        # both modes.
        extent = self.cache.local_extent(offset, length)
        if extent is not None:
            self.counters["reads"] += 1
            self.counters["bytes_served"] += length
        return extent

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        self.check_range(offset, length)
        if context != blockdev.VMTHUNDER_CACHE:
            return await self.cache.block_status(offset, length, context)
        self.counters["status_queries"] += 1
        if length == 0:
            return []
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        extents: list[blockdev.Extent] = []
        for i, state in enumerate(self.cache.chunk_states(first, last),
                                  first):
            if state == cache_layer.HELD:
                flags = blockdev.STATE_CACHED
            elif state == cache_layer.FETCHING and self._waitable(i):
                flags = blockdev.STATE_CACHED | blockdev.STATE_FETCHING
            else:
                flags = 0
            lo, hi = max(offset, i * cs), min(offset + length, (i + 1) * cs)
            if extents and extents[-1].flags == flags:
                extents[-1] = blockdev.Extent(extents[-1].length + hi - lo,
                                              flags)
            else:
                extents.append(blockdev.Extent(hi - lo, flags))
        return extents

    def stats(self) -> dict:
        return dict(self.counters, mode=self.mode)

    async def close(self) -> None:
        """Nothing to release: the cache belongs to the host's image (the
        VMs' snapshots use it too); its owner closes it."""
