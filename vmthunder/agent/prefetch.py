"""Trace prefetch at VM create: the image's boot trace read ahead of the
guest, behind its demand reads.

When a VM is created on an image whose export published a boot trace
(vmthunder/volume/published_trace.py, checked against the manifest), the
agent reads the trace's chunks in trace order (first touch) through the
image's cache, so the normal fetch path applies: peers and owners first,
the origin last, every chunk verified. Per image and host, one prefetch
serves all the VMs booting on it:

- **window**: it runs at most ``window`` chunks (in trace order) ahead of
  the furthest trace chunk any of its guests has read; a guest that reads
  nothing of the trace (a wrong trace) gets only the first window.
- **demand first**: its reads run with priority PREFETCH
  (vmthunder/p2p/priority.py): in each source's lane of the ImageVolume
  they wait while guests' reads run there, and a queued one a guest now
  waits for is promoted. Pieces are small (``run_chunks``) and few
  (``parallel``), and ``rate`` (``[agent] background_fetch_rate``) caps
  their bytes per second.
- **one fetch per chunk across hosts**: a chunk another host owns and
  nobody holds yet is left to its owner's own prefetch (asked again a
  little later; after ``defer_s`` it goes through the owner anyway); the
  chunks this host owns wait ``settle_s`` (hosts attaching at once see
  each other as owners only after a membership round).
- **stops** when the trace ends, when its guests read nothing for
  ``idle_s`` (booted, or idle), when its last VM is deleted or the image
  detached. A prefetch read that fails is counted and skipped: it never
  fails a VM.

Where the export published no trace, a boot trace the agent recorded
(agent/trace_recording.py: its own, else one a peer of the same image
offers, checked) is prefetched the same way; with none, the boot is
recorded. A published trace always wins over a recorded one.

Counted (`vmthunder status`, the image's ``prefetch``): chunks fetched by
the prefetch, those a guest then read (used) and, once it ended, the rest
(wasted); chunks skipped because held already, promoted reads, time the
reads waited behind demand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from vmthunder import blockdev
from vmthunder.agent.errors import message_of
from vmthunder.cache.cache_layer import HELD, MISSING, CacheLayer
from vmthunder.cache.chunkmap import index_runs
from vmthunder.cache.read_watch import ReadTap
from vmthunder.p2p import priority as priority_mod

LOG = logging.getLogger(__name__)

# Deferred chunks (left to their owner) are looked at again this often.
RETRY_S = 0.25


@dataclasses.dataclass(frozen=True)
class PrefetchOptions:
    enabled: bool = True
    window_bytes: int = 32 * 1024 * 1024
    run_bytes: int = 64 * 1024
    parallel: int = 4
    idle_s: float = 30.0
    defer_s: float = 2.0
    # Chunks this host owns are prefetched only this long after the
    # start: owners are those membership names, and hosts attaching at
    # once see each other only after a round of it.
    settle_s: float = 1.5
    # Bytes per second for background fetches (0: no limit).
    rate: float = 0.0
    # Record boots of images without a published trace and share them
    # (agent/trace_recording.py).
    record: bool = True

    @classmethod
    def from_conf(cls, group) -> PrefetchOptions:
        """From the [agent] options."""
        return cls(enabled=group.prefetch,
                   window_bytes=group.prefetch_window_bytes,
                   run_bytes=group.prefetch_run_bytes,
                   parallel=group.prefetch_parallel,
                   idle_s=group.prefetch_idle_seconds,
                   settle_s=group.prefetch_settle_seconds,
                   rate=group.background_fetch_rate or 0.0,
                   record=group.record_boot_traces)


class Prefetch:
    """One image's trace prefetch on this host (see the module doc).

    ``order`` is the trace's chunks of the cache, each once, in first
    touch order; ``volume`` the ImageVolume under the cache (None: a
    plain origin, no lanes nor owners)."""

    def __init__(self, image: str, cache: CacheLayer, volume,
                 order: list[int], options: PrefetchOptions,
                 rate_limit=None, source: str = "published"):
        self.image = image
        # Where the trace came from: "published", "recorded here",
        # "recorded by peer MEMBER".
        self.source = source
        self.cache = cache
        self.volume = volume
        self.order = order
        self.options = options
        cs = cache.chunk_size
        self.window = max(1, options.window_bytes // cs)
        self.run_chunks = max(1, options.run_bytes // cs)
        self.rate_limit = rate_limit
        self.position = {c: p for p, c in enumerate(order)}
        # Furthest trace position a guest has read (-1: none yet).
        self.guest_pos = -1
        self.state = "running"
        self.stop_reason: str | None = None
        self.vms: set[str] = set()
        # Chunks this prefetch fetched that no guest has read yet.
        self.unused: set[int] = set()
        # Chunks of prefetch reads in flight (for promotion).
        self.inflight: set[int] = set()
        self.counters = {"chunks_prefetched": 0, "bytes_prefetched": 0,
                         "chunks_used": 0, "chunks_held_already": 0,
                         "chunks_deferred": 0, "read_errors": 0,
                         "promoted": 0}
        self._advanced = asyncio.Event()
        # Without lanes, one read at a time: the guest's next read finds
        # at most that one ahead of it on the origin's link.
        self._slots = asyncio.Semaphore(
            max(1, options.parallel) if volume is not None else 1)
        self._reads: set[asyncio.Task] = set()
        self._t0 = time.monotonic()
        self._t1: float | None = None
        # Once ended, chunks still unused are wasted for good after
        # idle_s more: guest reads then cost the watch nothing more.
        self._final = False
        self._last_guest = time.monotonic()
        # Guest reads in progress (begun, not ended), and when one last
        # ended: without an ImageVolume (no lanes: peers off), prefetch
        # reads go only while no guest read runs (and GRACE_S after).
        self.guest_reads_now = 0
        self._guest_ended = -priority_mod.GRACE_S
        self._guests_quiet = asyncio.Event()
        self._guests_quiet.set()
        self.task: asyncio.Task | None = None

    # -- guest side --------------------------------------------------------

    def watch(self, inner) -> ReadTap:
        """``inner`` (the snapshot's watch) with this prefetch looking on:
        every guest read moves it, reads in progress hold it back."""
        return ReadTap(inner, self.guest_read, self._guest_read_began,
                       self.guest_read_ended)

    def _guest_read_began(self) -> None:
        self.guest_reads_now += 1

    def guest_read(self, offset: int, length: int) -> None:
        """A guest read [offset, offset+length): moves the window, counts
        prefetched chunks used, promotes prefetch reads it waits for."""
        if not length:
            return
        self._last_guest = time.monotonic()
        if self.state != "running" and (
                not self.unused or self._final):
            return
        cs = self.cache.chunk_size
        first = offset // cs
        last = min((offset + length - 1) // cs + 1, self.cache.chunks)
        position = self.position
        moved = False
        promote = False
        for i in range(first, last):
            p = position.get(i)
            if p is not None and p > self.guest_pos:
                self.guest_pos = p
                moved = True
            if i in self.unused:
                self.unused.discard(i)
                self.counters["chunks_used"] += 1
            if i in self.inflight:
                promote = True
        if promote and self.volume is not None:
            self.counters["promoted"] += self.volume.promote(first, last)
        if moved:
            self._advanced.set()

    def guest_read_ended(self) -> None:
        self.guest_reads_now = max(0, self.guest_reads_now - 1)
        self._guest_ended = time.monotonic()
        if not self.guest_reads_now:
            self._guests_quiet.set()

    async def _behind_guests(self) -> None:
        """Without lanes (no ImageVolume): wait until no guest read has
        run for GRACE_S."""
        while True:
            if self.guest_reads_now:
                self._guests_quiet.clear()
                await self._guests_quiet.wait()
                continue
            wait = self._guest_ended + priority_mod.GRACE_S \
                - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    # -- the run -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self, reason: str) -> None:
        if self.running:
            self.stop_reason = reason
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.state == "running":
            self._end("stopped", reason)

    def _end(self, state: str, reason: str) -> None:
        self.state = state
        self.stop_reason = self.stop_reason or reason
        self._t1 = time.monotonic()
        asyncio.get_running_loop().call_later(self.options.idle_s,
                                              self._finalise)
        LOG.info("image %s: prefetch %s (%s): %d of %d trace chunks "
                 "prefetched, %d used, %d held already", self.image, state,
                 self.stop_reason, self.counters["chunks_prefetched"],
                 len(self.order), self.counters["chunks_used"],
                 self.counters["chunks_held_already"])

    async def _run(self) -> None:
        token = priority_mod.priority.set(priority_mod.PREFETCH)
        try:
            reason = await self._loop()
        except asyncio.CancelledError:
            for task in list(self._reads):
                task.cancel()
            await asyncio.gather(*self._reads, return_exceptions=True)
            self._end("stopped", self.stop_reason or "cancelled")
            raise
        except Exception as exc:            # never the VM's problem
            LOG.exception("image %s: prefetch failed", self.image)
            self._end("failed", message_of(exc))
            return
        finally:
            priority_mod.priority.reset(token)
        await asyncio.gather(*self._reads, return_exceptions=True)
        # Done means held: what it fetched is in the cache file.
        await self.cache.writes_landed()
        self._end("done", reason)

    async def _loop(self) -> str:
        order = self.order
        pos = 0
        deferred: dict[int, float] = {}     # chunk -> deferred since
        retry_at = 0.0
        turns = 0
        while pos < len(order) or deferred:
            turns += 1
            if turns % 256 == 0:
                # A long stretch of held chunks takes no await: let the
                # loop serve the guests meanwhile.
                await asyncio.sleep(0)
            if deferred and time.monotonic() >= retry_at:
                # Owners' status is cached for a moment: ask again then.
                retry_at = time.monotonic() + RETRY_S
                await self._retry(deferred)
            limit = min(len(order), self.guest_pos + 1 + self.window)
            if pos >= limit:
                if pos >= len(order) and not deferred:
                    break
                self._advanced.clear()
                wait = RETRY_S if deferred else self.options.idle_s
                try:
                    await asyncio.wait_for(self._advanced.wait(), wait)
                except asyncio.TimeoutError:
                    if time.monotonic() - self._last_guest \
                            >= self.options.idle_s:
                        return (f"no guest read for "
                                f"{self.options.idle_s:g} s")
                continue
            # A run: consecutive chunks, consecutive in the trace too.
            a = order[pos]
            n = 1
            while pos + n < limit and n < self.run_chunks \
                    and order[pos + n] == a + n:
                n += 1
            pos += n
            await self._fetch(a, a + n, deferred)
        return "trace ended"

    async def _fetch(self, a: int, b: int, deferred: dict) -> None:
        """Prefetch the missing chunks of [a, b) that are ready (see
        ImageVolume.prefetch_ready); defer the others."""
        states = self.cache.chunk_states(a, b)
        want = [i for i, s in zip(range(a, b), states) if s == MISSING]
        self.counters["chunks_held_already"] += sum(
            1 for s in states if s == HELD)
        if not want:
            return
        if self.volume is not None:
            settled = time.monotonic() - self._t0 >= self.options.settle_s
            ready = await self.volume.prefetch_ready(want[0], want[-1] + 1,
                                                     own=settled)
            now = time.monotonic()
            go = []
            for i in want:
                if ready[i - want[0]] or now - deferred.get(i, now) \
                        >= self.options.defer_s:
                    go.append(i)
                    deferred.pop(i, None)
                elif i not in deferred:
                    deferred[i] = now
                    self.counters["chunks_deferred"] += 1
            want = go
        for first, last in index_runs(want):
            await self._issue(first, last)

    async def _retry(self, deferred: dict) -> None:
        """Deferred chunks: issue those now ready (or deferred too long),
        drop those fetched meanwhile."""
        for i in [i for i in deferred
                  if self.cache.chunk_states(i, i + 1)[0] != MISSING]:
            del deferred[i]
        for first, last in index_runs(sorted(deferred)):
            await self._fetch(first, last, deferred)

    async def _issue(self, first: int, last: int) -> None:
        await self._slots.acquire()
        cs = self.cache.chunk_size
        offset = first * cs
        length = min(last * cs, self.cache.size) - offset
        if self.rate_limit is not None:
            await self.rate_limit.acquire(length)
        if self.volume is None:
            await self._behind_guests()
        # The chunks may have come meanwhile (a guest, another VM).
        states = self.cache.chunk_states(first, last)
        if all(s != MISSING for s in states):
            self._slots.release()
            return
        task = asyncio.ensure_future(self._read(first, last, offset, length))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _read(self, first: int, last: int, offset: int,
                    length: int) -> None:
        missing = [i for i, s in zip(range(first, last),
                                     self.cache.chunk_states(first, last))
                   if s == MISSING]
        self.inflight.update(missing)
        try:
            await self.cache.read_parts(offset, length)
        except blockdev.BlockError as exc:
            self.counters["read_errors"] += 1
            LOG.info("image %s: prefetch of chunks %d-%d failed (skipped): "
                     "%s", self.image, first, last - 1, message_of(exc))
        else:
            cs = self.cache.chunk_size
            for i in missing:
                self.counters["chunks_prefetched"] += 1
                self.counters["bytes_prefetched"] += min(
                    cs, self.cache.size - i * cs)
                self.unused.add(i)
        finally:
            self.inflight.difference_update(missing)
            self._slots.release()

    def _finalise(self) -> None:
        self._final = True

    # -- views -------------------------------------------------------------

    def progress(self) -> dict:
        c = self.counters
        ended = self.state != "running"
        return dict(
            c, state=self.state, stop_reason=self.stop_reason,
            vms=sorted(self.vms), trace_chunks=len(self.order),
            trace_source=self.source,
            guest_position=self.guest_pos + 1,
            window_chunks=self.window, chunk_size=self.cache.chunk_size,
            chunks_unused=len(self.unused),
            # Prefetched and not read by a guest, once it has ended (final
            # prefetch_idle_seconds after the end).
            chunks_wasted=len(self.unused) if ended else None,
            rate_limited_s=round(self.rate_limit.waited, 3)
            if self.rate_limit is not None else None,
            elapsed_s=round((self._t1 or time.monotonic()) - self._t0, 3))



class Prefetches:
    """The agent's prefetches, one per image (see the module doc). The
    agent calls :meth:`vm_created`, :meth:`vm_deleted`,
    :meth:`image_detached`, :meth:`stop`; :meth:`status` for `vmthunder
    status`."""

    def __init__(self, options: PrefetchOptions, boot_traces=None):
        self.options = options
        # Recorded boot traces (agent/trace_recording.py BootTraces), or
        # None: published traces only.
        self.boot_traces = boot_traces
        self.runs: dict[str, Prefetch] = {}
        # image -> why it has no prefetch (no trace, a refused trace...)
        self.notes: dict[str, str] = {}
        # image -> the trace's chunk order, once read.
        self._orders: dict[str, list[int] | None] = {}
        self._starting: dict[str, asyncio.Task] = {}
        # VMs deleted while their image's prefetch was starting.
        self._gone: set[str] = set()
        self.rate_limit = None
        if options.rate:
            from vmthunder.ratelimit import RateLimit
            self.rate_limit = RateLimit(options.rate)

    def vm_created(self, image, vm: str, snapshot) -> None:
        """VM ``vm`` (its SnapshotLayer ``snapshot``) was created on
        ``image`` (the agent's Image): start or join the image's
        prefetch."""
        if not self.options.enabled or image.cache is None:
            return
        run = self.runs.get(image.name)
        if run is not None and run.state == "running":
            self._join(run, vm, snapshot)
            return
        starting = self._starting.get(image.name)
        if starting is not None and not starting.done():
            starting.add_done_callback(
                lambda t: self._join_started(image.name, vm, snapshot))
            return
        task = asyncio.ensure_future(self._start(image, vm, snapshot))
        self._starting[image.name] = task

    def _join(self, run: Prefetch, vm: str, snapshot) -> None:
        run.vms.add(vm)
        snapshot.watch = run.watch(snapshot.watch)

    def _join_started(self, image: str, vm: str, snapshot) -> None:
        run = self.runs.get(image)
        if run is not None and run.state == "running" \
                and vm not in self._gone:
            self._join(run, vm, snapshot)

    async def _start(self, image, vm: str, snapshot) -> None:
        try:
            order = await self._order(image)
        except Exception as exc:
            self.notes[image.name] = f"no prefetch: {message_of(exc)}"
            LOG.error("image %s: %s", image.name, self.notes[image.name])
            return
        source = "published"
        if order is None and self.boot_traces is not None \
                and image.cache is not None and vm not in self._gone:
            found = await self.boot_traces.order_for(image)
            if found is None:
                if vm not in self._gone and image.cache is not None:
                    self.boot_traces.record(image, vm, snapshot)
                old = self.runs.get(image.name)
                if old is not None and old.state != "running":
                    # An earlier VM's prefetch: this one has none.
                    del self.runs[image.name]
            else:
                order, source = found
        if order is None or image.cache is None or vm in self._gone:
            self._gone.discard(vm)
            return
        run = Prefetch(image.name, image.cache, image.volume, order,
                       self.options, self.rate_limit, source)
        self.runs[image.name] = run
        self._join(run, vm, snapshot)
        run.start()
        LOG.info("image %s: prefetch of %d trace chunks (%s) started for VM "
                 "%s (window %d chunks)", image.name, len(order), source, vm,
                 run.window)

    async def _order(self, image) -> list[int] | None:
        if image.name in self._orders:
            return self._orders[image.name]
        from vmthunder.volume import published_trace
        origin = image.volume.origin if image.volume is not None \
            else image.source
        trace = await published_trace.read(origin)
        if trace is None:
            self.notes[image.name] = "no boot trace published with the image"
            self._orders[image.name] = None
            return None
        cache = image.cache
        runs = trace.until_boot().chunk_runs(cache.chunk_size)
        order = [i for a, b in runs if a < cache.chunks
                 for i in range(a, min(b, cache.chunks))]
        self.notes.pop(image.name, None)
        self._orders[image.name] = order
        return order

    async def vm_deleted(self, image: str, vm: str) -> None:
        if self.boot_traces is not None:
            await self.boot_traces.vm_deleted(image, vm)
        starting = self._starting.get(image)
        if starting is not None and not starting.done():
            self._gone.add(vm)
        run = self.runs.get(image)
        if run is None or vm not in run.vms:
            return
        run.vms.discard(vm)
        if not run.vms:
            await run.stop("its VMs were deleted")

    async def image_detached(self, image: str) -> None:
        starting = self._starting.pop(image, None)
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        run = self.runs.pop(image, None)
        if run is not None:
            await run.stop("image detached")
        self._orders.pop(image, None)
        self.notes.pop(image, None)
        if self.boot_traces is not None:
            await self.boot_traces.image_detached(image)

    async def stop(self) -> None:
        if self.boot_traces is not None:
            await self.boot_traces.stop()
        for image in list(self.runs) + list(self._starting):
            await self.image_detached(image)

    def status(self, image: str) -> dict | None:
        run = self.runs.get(image)
        if run is not None:
            return run.progress()
        note = self.notes.get(image)
        return {"state": "none", "note": note} if note else None
