"""Warming an image's cache on request (`vmthunder precache`): the whole
image, or the chunks a recorded boot trace reads, in its order, through
the normal fetch path."""

from __future__ import annotations

import asyncio
import logging
import time

from vmthunder import blockdev
from vmthunder import trace as trace_mod
from vmthunder.agent.errors import message_of
from vmthunder.cache.cache_layer import HELD, CacheLayer

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
    read through the cache (so the normal fetch path applies: peers
    first, the origin last, every chunk verified), in that order, a few
    runs at a time.

    ``from_peers``/``from_origin`` are what the image's source fetched
    from each while this ran (VMs' fetches of the same time included).
    """

    def __init__(self, image: str, cache: CacheLayer, order: list[int],
                 trace: str | None):
        self.image = image
        self.cache = cache
        self.trace = trace
        self.chunks_selected = len(order)
        self.todo = [i for i in order
                     if cache.chunk_states(i, i + 1)[0] != HELD]
        self.chunks_total = len(self.todo)
        self.bytes_total = sum(self._chunk_bytes(i) for i in self.todo)
        self.chunks_done = 0
        self.bytes_fetched = 0
        self.state = "running"
        self.error: str | None = None
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._t1: float | None = None
        self._source0 = self._source_bytes()
        self._source1: tuple[int, int] | None = None
        self.task: asyncio.Task | None = None

    def _chunk_bytes(self, index: int) -> int:
        cs = self.cache.chunk_size
        return min(cs, self.cache.size - index * cs)

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

    def _runs(self):
        """Consecutive chunks of ``todo`` grouped into runs of at most
        PRECACHE_RUN_BYTES (one chunk at least), in order."""
        most = max(1, PRECACHE_RUN_BYTES // self.cache.chunk_size)
        run: list[int] = []
        for i in self.todo:
            if run and (i != run[-1] + 1 or len(run) >= most):
                yield run
                run = []
            run.append(i)
        if run:
            yield run

    async def _run(self) -> None:
        runs = self._runs()
        workers = [asyncio.ensure_future(self._worker(runs))
                   for _ in range(PRECACHE_PARALLEL)]
        try:
            try:
                await asyncio.wait(workers,
                                   return_when=asyncio.FIRST_EXCEPTION)
            finally:
                # The first failure (or a cancel) stops the others.
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
            for w in workers:
                if w.done() and not w.cancelled() and w.exception():
                    raise w.exception()
        except asyncio.CancelledError:
            self._end("cancelled")
            LOG.info("image %s: precache cancelled after %d of %d chunks",
                     self.image, self.chunks_done, self.chunks_total)
            raise
        except Exception as exc:
            self.error = message_of(exc)
            self._end("failed")
            LOG.error("image %s: precache failed after %d of %d chunks: %s",
                      self.image, self.chunks_done, self.chunks_total,
                      self.error)
        else:
            self._end("done")
            LOG.info("image %s: precache done: %d chunks (%d bytes) "
                     "fetched in %.1f s", self.image, self.chunks_total,
                     self.bytes_fetched, self._t1 - self._t0)

    async def _worker(self, runs) -> None:
        # The runs generator is shared: each worker takes the next run in
        # order (no await between next() calls of one worker and another).
        cache = self.cache
        cs = cache.chunk_size
        for run in runs:
            # A VM may have brought some of them meanwhile: read only the
            # chunks still missing (or in flight: the read joins it).
            states = cache.chunk_states(run[0], run[-1] + 1)
            missing = [i for i, st in zip(run, states) if st != HELD]
            self.chunks_done += len(run) - len(missing)
            j = 0
            while j < len(missing):
                k = j + 1
                while k < len(missing) and missing[k] == missing[k - 1] + 1:
                    k += 1
                first, last = missing[j], missing[k - 1]
                offset = first * cs
                length = min((last + 1) * cs, cache.size) - offset
                try:
                    await cache.read_parts(offset, length)
                except blockdev.BlockError as exc:
                    raise blockdev.BlockError(
                        exc.errno, f"chunks {first}-{last}: "
                        f"{message_of(exc)}") from None
                self.chunks_done += k - j
                self.bytes_fetched += length
                j = k

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
