"""Filling a cache through the copy loop (the agent's precache).

:class:`CacheChunksSource` is the source: chunks of a
:class:`~vmthunder.cache.cache_layer.CacheLayer`, in an order given (a
boot trace's first touches, or the whole image), read through the
cache's own read path, so the cache fetches what it lacks as it always
does (peers that hold a chunk first, the origin last, every chunk
checked against the manifest) and keeps it. Its bytes are those chunks
laid end to end in that order, one slot of ``chunk_size`` bytes each
(the image's short last chunk padded with zeros): the engine's pieces
are whole slots, so any order is kept, a piece at a time, with the
engine's requests in flight, rate limit and progress. The destination is
a sink (destinations.DiscardDestination): the cache holds the data.
"""

from __future__ import annotations

from vmthunder import blockdev
from vmthunder.cache.cache_layer import HELD
from vmthunder.cache.chunkmap import index_runs
from vmthunder.transfer.base import MiB, Extent, Source


class CacheChunksSource(Source):
    """The chunks ``order`` of ``cache``, one slot each, end to end.

    ``request_size`` bytes of slots per read (rounded down to whole
    chunks, one at least), ``max_in_flight`` reads at a time. Each read
    goes to the cache run by run of consecutive chunks, one run after
    the other, so no more than ``max_in_flight`` runs are fetched at
    once. ``chunks_done`` and ``bytes_fetched`` count the chunks read and
    the bytes of those that were not held when their read began.
    """

    def __init__(self, cache, order: list[int], *,
                 request_size: int = MiB, max_in_flight: int = 4):
        super().__init__(f"cache:{cache.describe()}", {})
        self.cache = cache
        self.order = list(order)
        cs = cache.chunk_size
        self.request_size = max(cs, request_size - request_size % cs)
        self.max_in_flight = max(1, max_in_flight)
        self.chunks_total = len(self.order)
        self.bytes_total = sum(self.chunk_bytes(i) for i in self.order)
        self.chunks_done = 0
        self.bytes_fetched = 0

    def describe(self) -> str:
        return self.cache.describe()

    def chunk_bytes(self, index: int) -> int:
        cs = self.cache.chunk_size
        return min(cs, self.cache.size - index * cs)

    async def open(self) -> None:
        self.size = len(self.order) * self.cache.chunk_size

    async def extents(self, offset: int, length: int) -> list[Extent]:
        # All data, to the end: pieces stay on whole slots.
        return [Extent(offset, self.size - offset, True)]

    async def read(self, offset: int, length: int):
        cs = self.cache.chunk_size
        first, end = offset // cs, -(-(offset + length) // cs)
        if offset % cs or (offset + length) % cs:
            raise ValueError(f"read at {offset} of {length} bytes is not "
                             f"on whole chunk slots of {cs} bytes")
        chunks = self.order[first:end]
        parts = []
        for lo, end in index_runs(chunks):
            hi = end - 1
            states = self.cache.chunk_states(lo, hi + 1)
            start = lo * cs
            stop = min((hi + 1) * cs, self.cache.size)
            try:
                parts.extend(await self.cache.read_parts(start,
                                                         stop - start))
            except blockdev.BlockError as exc:
                raise blockdev.BlockError(
                    exc.errno, f"chunks {lo}-{hi}: {exc or type(exc).__name__}"
                ) from None
            if stop - start < (hi + 1 - lo) * cs:       # the short last one
                parts.append(bytes((hi + 1 - lo) * cs - (stop - start)))
            self.chunks_done += hi + 1 - lo
            self.bytes_fetched += sum(self.chunk_bytes(i) for i, st in zip(
                range(lo, hi + 1), states) if st != HELD)
        self.bytes_read += length
        return blockdev.joined(parts)

    def bytes_by_source(self) -> dict[str, int]:
        """What the cache's source fetched so far (all it fetched, VMs'
        fetches included): from peers, from the origin."""
        try:
            stats = self.cache.source.stats()
        except Exception:           # a closed or odd source: no numbers
            return {}
        return {"peers": stats.get("bytes_from_peers", 0),
                "origin": stats.get("bytes_from_origin",
                                    stats.get("bytes_read", 0))}


__all__ = ["CacheChunksSource"]
