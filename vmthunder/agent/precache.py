"""Warming an image's cache on request (`vmthunder precache`): the whole
image, or the chunks a recorded boot trace reads, in its order, through
the normal fetch path, as a copy of the transfer library (its engine's
requests in flight, rate limit and progress) into a sink."""

from __future__ import annotations

import asyncio
import logging
import time

from vmthunder import trace as trace_mod
from vmthunder.agent.errors import message_of
from vmthunder.cache.cache_layer import HELD, CacheLayer
from vmthunder.transfer import engine
from vmthunder.transfer.cachefill import CacheChunksSource
from vmthunder.transfer.destinations import DiscardDestination
from vmthunder.transfer.errors import TransferError

LOG = logging.getLogger(__name__)

TraceError = trace_mod.TraceError

# Precache: reads of up to PRECACHE_RUN_BYTES of consecutive chunks, at
# most PRECACHE_PARALLEL of them in flight, so VMs' own fetches (and their
# share of the cache's write slots) are not starved.
PRECACHE_RUN_BYTES = 1024 * 1024
PRECACHE_PARALLEL = 4
# A boot trace named in a precache request is read only when it is a
# regular file of at most PRECACHE_TRACE_MAX_FILE_BYTES, at most
# PRECACHE_TRACE_MAX_TEXT_BYTES once decompressed, with at most
# PRECACHE_TRACE_MAX_REQUESTS requests (a systemd boot is ~1000; each
# costs ~200 bytes while loaded): bigger is refused (400), never read
# whole. Whatever the file, the agent's memory and time stay bounded.
PRECACHE_TRACE_MAX_FILE_BYTES = 16 * 1024 * 1024
PRECACHE_TRACE_MAX_TEXT_BYTES = 32 * 1024 * 1024
PRECACHE_TRACE_MAX_REQUESTS = 250_000


class Precache:
    """Warming one image's cache: the chunks of ``order`` not held yet,
    in that order, as a copy of the transfer library (its engine): the
    source reads them through the cache (so the normal fetch path
    applies: peers first, the origin last, every chunk verified; the
    cache keeps them), the destination discards. PRECACHE_PARALLEL reads
    of up to PRECACHE_RUN_BYTES in flight; ``rate_limit``: a shared
    vmthunder.ratelimit.RateLimit (the agent's background fetch rate,
    [agent] background_fetch_rate) or bytes per second, None for none.

    ``from_peers``/``from_origin`` are what the image's source fetched
    from each while this ran (VMs' fetches of the same time included).
    """

    def __init__(self, image: str, cache: CacheLayer, order: list[int],
                 trace: str | None, *, rate_limit=None):
        self.image = image
        self.cache = cache
        self.trace = trace
        # Bytes per second (None: no limit), for the status.
        self.rate_limit = getattr(rate_limit, "rate", rate_limit) or None
        self.chunks_selected = len(order)
        todo = [i for i in order
                if cache.chunk_states(i, i + 1)[0] != HELD]
        self._todo = todo
        self.source = CacheChunksSource(
            cache, todo, request_size=PRECACHE_RUN_BYTES,
            max_in_flight=PRECACHE_PARALLEL)
        self.copy = engine.Copy(self.source, DiscardDestination(),
                                rate_limit=rate_limit or None,
                                digest=None,
                                detect_zeroes=False)
        self.chunks_total = self.source.chunks_total
        self.bytes_total = self.source.bytes_total
        self.state = "running"
        self.error: str | None = None
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._t1: float | None = None
        self._source0 = self._source_bytes()
        self._source1: tuple[int, int] | None = None
        self.task: asyncio.Task | None = None

    @property
    def chunks_done(self) -> int:
        return self.source.chunks_done

    @property
    def bytes_fetched(self) -> int:
        return self.source.bytes_fetched

    def _source_bytes(self) -> tuple[int, int]:
        """(bytes from peers, bytes from the origin) the source reports
        so far; a plain origin reports all it read as from the origin."""
        try:
            stats = self.cache.source.stats()
        except Exception:           # a closed or odd source: no numbers
            return (0, 0)
        return (stats.get("bytes_from_peers", 0),
                stats.get("bytes_from_origin", stats.get("bytes_read", 0)))

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self.copy.run()
            # Done means kept: the chunks read are on disk and marked (a
            # restart right after finds them; Nova's cache_image relies
            # on it).
            if not await self.cache.durable(self._todo):
                LOG.warning("image %s: precache read every chunk, but not "
                            "all are kept in the cache yet (a store "
                            "failed, or they were evicted)", self.image)
        except asyncio.CancelledError:
            self._end("cancelled")
            LOG.info("image %s: precache cancelled after %d of %d chunks",
                     self.image, self.chunks_done, self.chunks_total)
            raise
        except TransferError as exc:
            self.error = exc.reason or message_of(exc)
            self._end("failed")
            LOG.error("image %s: precache failed after %d of %d chunks: %s",
                      self.image, self.chunks_done, self.chunks_total,
                      self.error)
        else:
            self._end("done")
            LOG.info("image %s: precache done: %d chunks (%d bytes) "
                     "fetched in %.1f s", self.image, self.chunks_total,
                     self.bytes_fetched, self._t1 - self._t0)

    def _end(self, state: str) -> None:
        self.state = state
        self._t1 = time.monotonic()
        self._source1 = self._source_bytes()

    async def cancel(self) -> None:
        if self.running:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.state == "running":     # cancelled before it began
            self._end("cancelled")

    def progress(self) -> dict:
        now = self._source1 or self._source_bytes()
        elapsed = (self._t1 or time.monotonic()) - self._t0
        return {
            "image": self.image, "trace": self.trace, "state": self.state,
            "chunks_selected": self.chunks_selected,
            "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done,
            "bytes_total": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "from_peers": max(0, now[0] - self._source0[0]),
            "from_origin": max(0, now[1] - self._source0[1]),
            "chunk_size": self.cache.chunk_size,
            "rate_limit": self.rate_limit,
            "started_at": self.started_at,
            "elapsed_s": round(elapsed, 3),
            "error": self.error,
        }


async def trace_chunk_runs(path: str, chunk_size: int) -> list[tuple]:
    """The chunks of ``chunk_size`` bytes trace ``path`` reads, in
    first-touch order, as runs (first, end). Read and parsed in a thread
    within the PRECACHE_TRACE_MAX_* limits; TraceError says what is
    wrong."""
    def load() -> list[tuple]:
        return trace_mod.load(
            path, max_file_bytes=PRECACHE_TRACE_MAX_FILE_BYTES,
            max_text_bytes=PRECACHE_TRACE_MAX_TEXT_BYTES,
            max_requests=PRECACHE_TRACE_MAX_REQUESTS,
        ).chunk_runs(chunk_size)
    return await asyncio.to_thread(load)
