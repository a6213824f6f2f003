"""Demand reads first: a fetch's priority, and the lanes where fetches queue.

A fetch is a guest's (DEMAND, the default) or a trace prefetch's
(PREFETCH). The prefetcher (vmthunder/agent/prefetch.py) sets
:data:`priority` around its reads; context variables follow a read into
the tasks it starts (the cache's fetch, the ImageVolume's pieces), so the
ImageVolume knows at each source whose read it is.

An ImageVolume has one :class:`Lane` per source it reads: the origin and
each peer. A demand read never waits in a lane: it only counts itself
while it runs. A prefetch read waits for its turn: no demand read running
in that lane, and fewer than ``prefetch_limit`` prefetch reads there, so
a guest's read finds at most that many (small) prefetch reads ahead of it
on the wire, never a queue of them. A waiting prefetch read that covers a
chunk a guest asks for meanwhile (the guest joined the prefetch's fetch
in the cache) is promoted: it goes at once and counts as demand.

A lane also waits ``grace`` seconds after its last demand read before a
prefetch read goes: a guest's reads often come back to back (the next
read of a boot right after the last one's answer), and a prefetch read
put on the wire in between would be ahead of it (a link is not
preemptive: what is sent is sent).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time

DEMAND, PREFETCH = 0, 1
# A lane's pause after a demand read before prefetch reads go (module doc).
GRACE_S = 0.002
PRIORITY_NAMES = {DEMAND: "demand", PREFETCH: "prefetch"}

priority: contextvars.ContextVar[int] = contextvars.ContextVar(
    "vmthunder_fetch_priority", default=DEMAND)


class _Waiter:
    __slots__ = ("first", "last", "future", "promoted")

    def __init__(self, first: int, last: int, future: asyncio.Future):
        self.first, self.last = first, last
        self.future = future
        self.promoted = False


class Lane:
    """Where the reads of one source queue (see the module doc)."""

    def __init__(self, name: str, prefetch_limit: int = 1,
                 grace: float = GRACE_S):
        self.name = name
        self.prefetch_limit = max(1, prefetch_limit)
        self.grace = grace
        self.demand_ended = -grace      # monotonic time of the last end
        self._timer: asyncio.TimerHandle | None = None
        self.demand = 0             # demand (and promoted) reads running
        self.prefetch = 0           # prefetch reads running
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.counters = {"demand_reads": 0, "prefetch_reads": 0,
                         "prefetch_waited": 0, "prefetch_wait_s": 0.0,
                         "promoted": 0}

    async def enter(self, first: int, last: int) -> int:
        """Take a turn for chunks [first, last); the class the read runs
        as (DEMAND or PREFETCH), to hand to :meth:`leave`."""
        if priority.get() != PREFETCH:
            self.demand += 1
            self.counters["demand_reads"] += 1
            return DEMAND
        self.counters["prefetch_reads"] += 1
        if self.demand == 0 and self.prefetch < self.prefetch_limit \
                and not self.waiting and self._quiet() <= 0:
            self.prefetch += 1
            return PREFETCH
        waiter = _Waiter(first, last,
                         asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        self._wake()
        self.counters["prefetch_waited"] += 1
        started = time.monotonic()
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # Given a turn and cancelled before taking it: hand it on.
                self.leave(DEMAND if waiter.promoted else PREFETCH)
            else:
                self._remove(waiter)
            raise
        finally:
            self.counters["prefetch_wait_s"] += time.monotonic() - started
        return DEMAND if waiter.promoted else PREFETCH

    def leave(self, kind: int) -> None:
        if kind == DEMAND:
            self.demand -= 1
            self.demand_ended = time.monotonic()
        else:
            self.prefetch -= 1
        self._wake()

    def _quiet(self) -> float:
        """Seconds until the lane has been free of demand for
        ``grace`` (<= 0: it has)."""
        return self.demand_ended + self.grace - time.monotonic()

    def promote(self, first: int, last: int) -> int:
        """Let the waiting prefetch reads covering any chunk of [first,
        last) go now, as demand; how many."""
        n = 0
        for waiter in list(self.waiting):
            if waiter.first < last and first < waiter.last \
                    and not waiter.future.done():
                self._remove(waiter)
                waiter.promoted = True
                self.demand += 1
                waiter.future.set_result(None)
                n += 1
        self.counters["promoted"] += n
        return n

    def _remove(self, waiter: _Waiter) -> None:
        try:
            self.waiting.remove(waiter)
        except ValueError:
            pass

    def _wake(self) -> None:
        if not self.waiting or self.demand:
            return
        wait = self._quiet()
        if wait > 0:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(
                    wait, self._timer_fired)
            return
        while self.waiting and self.demand == 0 \
                and self.prefetch < self.prefetch_limit:
            waiter = self.waiting.popleft()
            if waiter.future.done():
                continue
            self.prefetch += 1
            waiter.future.set_result(None)

    def _timer_fired(self) -> None:
        self._timer = None
        self._wake()

    def stats(self) -> dict:
        return dict(self.counters,
                    prefetch_wait_s=round(self.counters["prefetch_wait_s"],
                                          3),
                    demand_running=self.demand,
                    prefetch_running=self.prefetch,
                    prefetch_queued=len(self.waiting))


class Lanes:
    """The lanes of one ImageVolume, by source name ("origin", a peer's
    URI)."""

    def __init__(self, prefetch_limit: int = 1):
        self.prefetch_limit = prefetch_limit
        self.lanes: dict[str, Lane] = {}

    def lane(self, name: str) -> Lane:
        lane = self.lanes.get(name)
        if lane is None:
            lane = self.lanes[name] = Lane(name, self.prefetch_limit)
        return lane

    def promote(self, first: int, last: int) -> int:
        return sum(lane.promote(first, last) for lane in self.lanes.values())

    def stats(self) -> dict:
        """Totals over the lanes, and the queue now."""
        total = {"demand_reads": 0, "prefetch_reads": 0,
                 "prefetch_waited": 0, "prefetch_wait_s": 0.0,
                 "promoted": 0, "prefetch_queued": 0}
        for lane in self.lanes.values():
            s = lane.stats()
            for key in total:
                total[key] += s[key]
        total["prefetch_wait_s"] = round(total["prefetch_wait_s"], 3)
        return total
