"""Guest reads watched: how long they take, whether the cache held them,
and which are still waiting.

A SnapshotLayer given a :class:`VmReads` (its ``watch``) calls
``begin()`` and ``end()`` around every read it takes through the layers,
and ``instant()`` for a read served straight from a page-cache-resident
file (``local_extent``: the NBD server sends it with sendfile; it waits
for nothing, and is counted as taking no time). The VMs of one image share
one :class:`ImageReads`: the image's latency histogram, its hits and
misses, and the reads in progress, which the agent's watchdog looks at to
find stalled ones (vmthunder/agent/health.py).

A read is a hit when, as it arrives, every block it covers is in the VM's
own overlay or held in the image's cache (marked, or written and not yet
synced: nothing to fetch), else a miss (it starts or joins a fetch). A
read over the overlay and missing chunks counts as a miss even where the
overlay covers them.

Cost per read (see docs/design.md): two clock reads, two map searches over
the few bytes of the read's blocks, a dict insert and delete, a bisect;
nothing is allocated but the small record of the read in progress.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from time import monotonic

from vmthunder.cache.cache_layer import HELD, CacheLayer

LOG = logging.getLogger(__name__)

# Upper bounds (seconds) of the latency histogram's buckets: from a page
# cache hit (~0.1 ms through the layers) to a read that waits for a
# target restart (seconds), Prometheus-style (each bucket counts reads
# taking at most its bound; the last, +Inf, all of them).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PendingRead:
    """A guest read in progress, as :meth:`ImageReads.stalled_now` lists
    it."""

    __slots__ = ("token", "vm", "offset", "length", "started", "reported")

    def __init__(self, token: int, entry: tuple, reported: bool):
        self.token = token
        self.started, self.vm, self.offset, self.length = entry
        self.reported = reported


class ImageReads:
    """The guest reads of one image's VMs: latency histogram, hits and
    misses, reads in progress, stalled reads counted."""

    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds = tuple(bounds)
        # counts[i]: reads taking at most bounds[i] and more than
        # bounds[i - 1]; counts[-1]: more than the last bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.hits = 0
        self.misses = 0
        # Reads that waited longer than the stall threshold (counted once
        # each, by the watchdog).
        self.stalled = 0
        # token -> (started, vm, offset, length): a tuple, the cheapest
        # record to make on every read.
        self.pending: dict[int, tuple] = {}
        # Tokens of the pending reads reported as stalled.
        self.reported: set[int] = set()
        self._next = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def histogram(self) -> dict:
        """{"buckets": [(bound, cumulative count)...] ending with
        (inf, count), "count", "sum"} (the Prometheus shape)."""
        total = 0
        buckets = []
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            buckets.append((bound, total))
        return {"buckets": buckets, "count": total, "sum": self.sum}

    def stalled_now(self, threshold: float, now: float | None = None
                    ) -> list[PendingRead]:
        """The reads in progress that have waited ``threshold`` seconds or
        more, oldest first."""
        since = (monotonic() if now is None else now) - threshold
        old = [(entry, token) for token, entry in self.pending.items()
               if entry[0] <= since]
        old.sort(key=lambda item: item[0][0])
        return [PendingRead(token, entry, token in self.reported)
                for entry, token in old]

    def report(self, pending: PendingRead) -> None:
        """Mark ``pending`` stalled (counted once)."""
        if pending.token in self.pending \
                and pending.token not in self.reported:
            self.reported.add(pending.token)
            self.stalled += 1
            pending.reported = True

    def stats(self) -> dict:
        return {"read_hits": self.hits, "read_misses": self.misses,
                "stalled_reads": self.stalled,
                "reads_in_progress": len(self.pending)}


class ReadTap:
    """A snapshot's read watch with one more party looking on (the
    agent's trace prefetch, a boot recording): ``on_read(offset,
    length)`` for every guest read (begun or instant), ``on_begin()`` and
    ``on_end()``, when given, around the reads that wait; then the
    ``inner`` watch (a VmReads, another tap, or None) as before."""

    __slots__ = ("inner", "on_read", "on_begin", "on_end")

    def __init__(self, inner, on_read, on_begin=None, on_end=None):
        self.inner = inner
        self.on_read = on_read
        self.on_begin = on_begin
        self.on_end = on_end

    def begin(self, offset: int, length: int):
        self.on_read(offset, length)
        if self.on_begin is not None:
            self.on_begin()
        return self.inner.begin(offset, length) if self.inner else None

    def end(self, token) -> None:
        if self.on_end is not None:
            self.on_end()
        if self.inner is not None:
            self.inner.end(token)

    def instant(self, offset: int = 0, length: int = 0) -> None:
        self.on_read(offset, length)
        if self.inner is not None:
            self.inner.instant(offset, length)


class VmReads:
    """One VM's handle on its image's :class:`ImageReads` (a
    SnapshotLayer's ``watch``). ``snapshot`` is the VM's SnapshotLayer;
    when the layer below it has a chunk map (a CacheLayer), a read whose
    chunks it holds is a hit."""

    __slots__ = ("vm", "reads", "_snap_held", "_bs", "_cache_held", "_cs",
                 "_cache_size", "_cache_states")

    def __init__(self, vm: str, reads: ImageReads, snapshot):
        self.vm = vm
        self.reads = reads
        # Bound once: begin() runs on every read.
        self._snap_held = snapshot.map.all_present
        self._bs = snapshot.block_size
        lower = snapshot.lower
        self._cache_size = lower.size
        if isinstance(lower, CacheLayer):
            self._cache_held = lower.map.all_present
            self._cs = lower.chunk_size
            # Chunks written but not yet marked are held too (slow path).
            self._cache_states = lower.chunk_states
        else:
            # No cache under the snapshot: a read is a hit only when its
            # overlay holds it.
            self._cache_held = self._cache_states = None
            self._cs = 0

    def begin(self, offset: int, length: int) -> int:
        reads = self.reads
        token = reads._next = reads._next + 1
        reads.pending[token] = (monotonic(), self.vm, offset, length)
        end = offset + length
        held = self._cache_held
        if held is not None:
            # Usually all held (a warm cache): one search.
            cend = end if end <= self._cache_size else self._cache_size
            cs = self._cs
            if offset >= cend or held(offset // cs, (cend - 1) // cs + 1):
                reads.hits += 1
                return token
        bs = self._bs
        if not length or self._snap_held(offset // bs, (end - 1) // bs + 1):
            reads.hits += 1
        elif held is not None and self._cache_states is not None \
                and offset < cend and all(
                    state == HELD for state in self._cache_states(
                        offset // cs, (cend - 1) // cs + 1)):
            reads.hits += 1
        else:
            reads.misses += 1
        return token

    def end(self, token: int) -> None:
        reads = self.reads
        entry = reads.pending.pop(token, None)
        if entry is None:
            return
        took = monotonic() - entry[0]
        reads.counts[bisect_left(reads.bounds, took)] += 1
        reads.sum += took
        if reads.reported and token in reads.reported:
            reads.reported.discard(token)
            LOG.warning("VM %s: the stalled read of %d bytes at offset %d "
                        "ended after %.1f s", self.vm, entry[3], entry[2],
                        took)

    def instant(self, offset: int = 0, length: int = 0) -> None:
        """A read (of ``length`` bytes at ``offset``) served from a
        resident file, without waiting."""
        reads = self.reads
        reads.counts[0] += 1
        reads.hits += 1
