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
    another, so misses do not cascade from host to host. One exception:
    with ``owns`` (``owns(index) -> bool``, from ImageVolume.owns), a
    read whose other chunks are all held or in flight may include chunks
    this host *owns* (p2p/owners.py): those are fetched through the
    cache, once for every peer asking, as in ``through`` mode. Reads of
    unowned, unheld chunks are still refused.
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

import asyncio
import errno
import time
import typing

from vmthunder import blockdev
from vmthunder.cache import cache_layer
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.p2p.owners import serving_peer

MODES = ("held", "through")
# An owned chunk in flight, not yet in the volume: looked at again this
# many times, this many seconds apart.
_PATIENCE, _PATIENCE_STEP = 20, 0.005
# The first looks again come at once (the next turns of the event loop):
# the cache's fetch task, created in this turn, usually reaches the volume
# in the next, and a 5 ms step was most of an owner fetch's time.
_PATIENCE_NOW = 2


@typing.runtime_checkable
class RootedFetches(typing.Protocol):
    """A source whose fetches peers may wait for only while rooted."""

    def fetch_is_rooted(self, index: int) -> bool:
        """True while chunk ``index`` is read from the origin or from a
        holder (never from another host's fetch): waits never chain."""


@typing.runtime_checkable
class LandingChunks(typing.Protocol):
    """A source that hands out each chunk of a read in flight as soon as
    it is checked."""

    def landing(self, index: int) -> asyncio.Future | None:
        """A future of chunk ``index``'s bytes while it is read here."""


class PeerExport(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(
        block_status=True,
        contexts=(blockdev.BASE_ALLOCATION, blockdev.VMTHUNDER_CACHE))

    def __init__(self, cache: CacheLayer, mode: str = "held", *,
                 owns=None):
        if mode not in MODES:
            raise ValueError(f"peer export mode {mode!r}: expected one of "
                             f"{', '.join(MODES)}")
        self.cache = cache
        self.mode = mode
        self.size = cache.size
        self.chunk_size = cache.chunk_size
        # What the cache's source tells of its fetches (an ImageVolume
        # tells both): which may be waited for, and what its reads in
        # flight deliver, chunk by chunk (see _held_parts).
        source = cache.source
        self._rooted = source.fetch_is_rooted \
            if isinstance(source, RootedFetches) else None
        self._landing = source.landing \
            if isinstance(source, LandingChunks) else None
        # expect_owned(index): a landing future for an owned chunk whose
        # fetch has not reached the source yet (ImageVolume), or None.
        self._expect_owned = getattr(source, "expect_owned", None)
        # owns(index): chunks fetched for peers in ``held`` mode (None:
        # none).
        self.owns = owns
        self.counters = {"reads": 0, "bytes_served": 0, "refused": 0,
                         "status_queries": 0, "chunks_fetched_for_peers": 0,
                         # _PATIENCE_STEP waits for an owned chunk in
                         # flight that had not reached the volume yet.
                         "waits_for_owned": 0}
        # held mode over a volume: how long reads took, by the slowest
        # way they were served (held, landing, later, owned): [n, s].
        self.serve_times: dict[str, list] = {}

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
        elif self._landing is not None:
            parts = await self._held_parts(offset, length)
        else:
            try:
                parts = await self.cache.read_held(offset, length,
                                                   wait=self._waitable)
            except blockdev.BlockError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                self._refuse(str(exc))
        self.counters["reads"] += 1
        self.counters["bytes_served"] += length
        return parts

    def _refuse(self, why: str):
        self.counters["refused"] += 1
        # ENODATA is not an NBD error; ENOTSUP is ("not this range, not
        # now"), and ImageVolume reads it as "not held".
        raise blockdev.BlockError(errno.ENOTSUP, why)

    async def _held_parts(self, offset: int, length: int,
                          patience: int = _PATIENCE) -> list:
        """``held`` mode over an ImageVolume, chunk by chunk: held chunks
        from the cache; chunks in flight from the volume's piece carrying
        them (landing(), never the cache's whole fetch, which may wait
        for other hosts); missing chunks owned here fetched through the
        cache; anything else refused at once, before any wait.

        An owned chunk whose fetch has not reached the volume yet (the
        cache's fetch task not started, or waiting for write slots) is
        looked at again a few times over ~0.1 s, then refused (the peer
        reads the origin): never a wait on the cache's whole fetch."""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        if length == 0 or self.cache.map.all_present(first, last):
            return await self.cache.read_parts(offset, length)
        segments: list = []          # [kind, a, b, future]
        for i, state in enumerate(self.cache.chunk_states(first, last),
                                  first):
            if state == cache_layer.HELD:
                kind, future = "held", None
            elif state == cache_layer.FETCHING:
                kind, future = "landing", self._landing(i)
                if future is None and self.cache.landed(i):
                    # Read and checked, being written to the cache file
                    # (the volume has handed it over): served from the
                    # cache's memory now. Before, such a chunk (most
                    # chunks a boot storm's hosts ask an owner for just
                    # after it fetched them) waited 5 ms steps.
                    kind = "held"
                elif future is None:
                    if patience <= 0 or self.owns is None \
                            or not self.owns(i):
                        self._refuse(f"{self.cache.describe()}: chunk {i} "
                                     "is being fetched from a peer")
                    future = self._expect_owned(i) \
                        if self._expect_owned is not None else None
                    if future is None:
                        kind = "later"
                    else:
                        # Landing as soon as the fetch brings it, bounded
                        # by the patience the polling had (_landed).
                        self.counters["waits_for_owned"] += 1
                        kind = "expected"
            elif self.owns is not None and self.owns(i):
                kind, future = "owned", None
            else:
                self._refuse(f"{self.cache.describe()} does not hold "
                             f"chunk {i}")
            if segments and kind not in ("landing", "expected") \
                    and segments[-1][0] == kind:
                segments[-1][2] = i + 1
            else:
                segments.append([kind, i, i + 1, future])
        pieces = []
        for kind, a, b, future in segments:
            lo, hi = max(offset, a * cs), min(offset + length, b * cs)
            if kind == "held":
                pieces.append(self.cache.read_parts(lo, hi - lo))
            elif kind == "landing":
                pieces.append(self._landed(future, a, lo, hi))
            elif kind == "expected":
                pieces.append(self._landed(future, a, lo, hi,
                                           _PATIENCE * _PATIENCE_STEP))
            elif kind == "later":
                pieces.append(self._later(lo, hi, patience - 1))
            else:
                pieces.append(self._fetch_owned(lo, hi))
        t0 = time.monotonic()
        parts = []
        for got in await asyncio.gather(*pieces):
            parts.extend(got)
        if patience == _PATIENCE:
            # The read's time, under the slowest way it was served.
            kinds = {seg[0] for seg in segments}
            slowest = next(k for k in ("owned", "later", "expected",
                                       "landing", "held") if k in kinds)
            row = self.serve_times.setdefault(slowest, [0, 0.0])
            row[0] += 1
            row[1] += time.monotonic() - t0
        return parts

    async def _landed(self, future, index: int, lo: int, hi: int,
                      timeout: float | None = None) -> list:
        try:
            view = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self._refuse(f"{self.cache.describe()}: chunk {index}, owned "
                         f"here, was not fetched within {timeout} s")
        if view is None:
            self._refuse(f"{self.cache.describe()}: the fetch of chunk "
                         f"{index} failed")
        base = index * self.chunk_size
        return [view[lo - base:hi - base]]

    async def _later(self, lo: int, hi: int, patience: int) -> list:
        self.counters["waits_for_owned"] += 1
        await asyncio.sleep(0 if patience >= _PATIENCE - _PATIENCE_NOW
                            else _PATIENCE_STEP)
        return await self._held_parts(lo, hi - lo, patience)

    async def _fetch_owned(self, lo: int, hi: int) -> list:
        """Owned chunks that were missing: fetched through the cache, and
        the fetch asks no other owner (serving_peer). Checked again first:
        since the plan, a local read may have started fetching them."""
        cs = self.chunk_size
        first, last = lo // cs, (hi - 1) // cs + 1
        if any(s != cache_layer.MISSING
               for s in self.cache.chunk_states(first, last)):
            return await self._held_parts(lo, hi - lo)
        self.counters["chunks_fetched_for_peers"] += last - first
        token = serving_peer.set(True)
        try:
            # No await since the check: the fetch starts here.
            return await self.cache.read_parts(lo, hi - lo)
        finally:
            serving_peer.reset(token)

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

        def add(a: int, b: int, flags: int) -> None:
            lo, hi = max(offset, a * cs), min(offset + length, b * cs)
            if extents and extents[-1].flags == flags:
                extents[-1] = blockdev.Extent(extents[-1].length + hi - lo,
                                              flags)
            else:
                extents.append(blockdev.Extent(hi - lo, flags))
        for start, end, state in self.cache.chunk_state_runs(first, last):
            if state == cache_layer.HELD:
                add(start, end, blockdev.STATE_CACHED)
            elif state == cache_layer.FETCHING:
                # Only fetches rooted at the origin or a holder may be
                # waited for (no waiting cycles): chunk by chunk.
                for i in range(start, end):
                    add(i, i + 1, blockdev.STATE_CACHED
                        | blockdev.STATE_FETCHING if self._waitable(i)
                        else 0)
            else:
                add(start, end, 0)
        return extents

    def stats(self) -> dict:
        return dict(self.counters, mode=self.mode, serve_ms={
            k: {"reads": n, "mean_ms": round(t / n * 1e3, 3)}
            for k, (n, t) in sorted(self.serve_times.items())})

    async def close(self) -> None:
        """Nothing to release: the cache belongs to the host's image (the
        VMs' snapshots use it too); its owner closes it."""
