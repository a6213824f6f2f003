"""Flow-level model of booting V VMs on each of M hosts from one image.

Compares boot strategies at scales the namespace harness cannot reach
(1,000 hosts x 10 VMs) and predicts what it should measure at small ones.
Every VM replays the same recorded boot trace; the network is a set of
links shared by fluid flows.

Strategies (``STRATEGIES``):

- ``copy``: each host copies ``image_bytes`` from the origin, then boots
  its VMs from the local copy.
- ``precache``: the same copy before the clock starts (``precache_s``);
  boots are local boots.
- ``direct``: every read of every VM crosses the origin link; no cache.
- ``lazy``: a copy-on-read chunk cache per host; a missing chunk is
  fetched once per host from the origin, concurrent readers of it wait.
- ``vmthunder``: lazy + peers: a missing chunk comes from a host holding
  it (the less loaded uplink of two random holders), else from its owner
  (a hash of the chunk picks one host, as the agents' rendezvous hashing
  does), which fetches it from the origin first if it lacks it; the owner
  itself reads the origin. The origin sends each chunk once, and the
  first copies of different chunks leave from different hosts.
- ``tree``: each host fetches only from its parent in a ``tree_degree``-ary
  tree (host 0 is the root and fetches from the origin); a parent missing
  the chunk fetches it first (it caches it too).

Network: the origin has one uplink (``origin_rate_bps``); every host has
one link of ``host_rate_bps`` in each direction (its downlink limits what
it receives, its uplink what it serves to peers). A transfer is a flow
crossing the sender's uplink and the receiver's downlink; flows share
links max-min fairly (progressive filling). A fetch's data is there
``rtt_s`` after its last byte (one request round trip; 0 by default), or
for chunk fetches of the cached strategies ``origin_fetch_s`` (from the
origin) and ``peer_fetch_s`` (from another host: a holder, an owner, a
parent) when given: what a fetch costs beyond its bytes on the links
(request handling, the NBD round trip, the check against the manifest,
the hand-over between the hosts' caches). The harness gives the costs it
measured in the run (each agent's fetch latency by source, see
vmthunder/bench/harness.py fetch_costs).

VM: request i of the trace has recorded issue t_i and completion c_i. Its
dependency is the request with the latest recorded completion at or
before t_i (none: the VM's start), its think time t_i minus that
completion. In the model, i is issued at (model completion of its
dependency) + think time and completes at the later of issue + local
service time and the arrival of the data it needs (a local hit: issue +
local service). Local service is the recorded c_i - t_i, or
``local_service_s`` if given. Boot time = model completion of the request
that completed last in the recording + the recorded tail (boot_s - its
completion), counted from the VM's start. Writes go to the VM's local
copy-on-write snapshot: local requests.

Approximations and shortcuts (what makes 10,000 VMs run in pure Python):

- Fluid flows: no TCP slow start, loss or per-packet effects; requests
  cost nothing on the wire; the local disk and CPU are never contended.
- Requests become chunk fetches: a read whose chunks were all read by
  one of its ancestors (the chain of dependencies) is a hit in every
  cached strategy, so its timing is a constant offset from its nearest
  non-hit ancestor and it is never simulated on its own. Only the other
  requests ("candidates") are events; those finding all their chunks
  present are rolled forward without touching the event heap.
- Identical VMs are merged: VMs on one host starting at the same time are
  indistinguishable in this deterministic model (same trace, shared host
  cache, equal shares), so they run as one VM of multiplicity V (a
  ``direct`` flow of multiplicity V is V equal flows). Exact; turn it off
  with ``merge_identical=False``, or spread the starts
  (``vm_start_spread_s``) to have every VM on its own.
- Max-min rates are recomputed (progressive filling over flows grouped by
  (sender, receiver), O(groups log links)) only once the number of flow
  arrivals and departures since the last recomputation reaches
  ``rate_update_frac`` (5 %) of the active flows; below 20 active flows
  that is every change, i.e. exact. In between, a flow joining an
  existing (sender, receiver) group takes that group's current rate (a
  link may be oversubscribed by about that fraction until the next
  recomputation) and a flow starting a new group takes the capacity left
  free on its two links; capacity freed by a departure waits for the
  next recomputation.
- Peers forward whole chunks (store and forward), no pipelining.
- ``direct`` with more than ``direct_flow_limit`` flows (after merging)
  uses a closed form instead (result ``model`` = "fluid"): every VM alone,
  each read taking rtt_s + length / fair share, the fair share being
  min(origin / N, host / V) per outstanding read with N VMs always
  reading, and the boot no shorter than N x bytes read / origin rate
  (or V x bytes read / host rate).

``simulate(...)`` is the entry point for the harness (``simulate_trace``
takes a trace object instead of tuples); ``python -m
vmthunder.bench.sim --help`` runs it from a trace file or a synthetic
trace and prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from vmthunder.p2p.owners import OWNER_REGION
from vmthunder.sizes import parse_size

KiB, MiB = 1 << 10, 1 << 20
INF = math.inf
STRATEGIES = ("copy", "precache", "direct", "lazy", "vmthunder", "tree")
CACHED = ("lazy", "vmthunder", "tree")
ROOT = -1                     # anchor of a VM's start in the plan


# -- input --------------------------------------------------------------------

class Request(NamedTuple):
    """One recorded block request, times in seconds from the VM's start."""
    issue_s: float
    complete_s: float
    op: str                   # "read"/"R", "write"/"W"; others are local
    offset: int
    length: int


@dataclass(frozen=True)
class BootTrace:
    requests: tuple[Request, ...]   # sorted by issue time
    boot_s: float
    image_size: int


def trace_from_tuples(rows: Iterable, boot_s: float,
                      image_size: int) -> BootTrace:
    """Adapter from (issue_s, complete_s, op, offset, length) tuples."""
    reqs = []
    for row in rows:
        issue, complete, op, offset, length = row
        r = Request(float(issue), float(complete), str(op), int(offset),
                    int(length))
        if not 0 <= r.issue_s <= r.complete_s:
            raise ValueError(f"request {row!r}: need 0 <= issue <= complete")
        if r.offset < 0 or r.length < 0 or r.offset + r.length > image_size:
            raise ValueError(f"request {row!r} is outside the image "
                             f"({image_size} bytes)")
        reqs.append(r)
    reqs.sort(key=lambda r: (r.issue_s, r.complete_s))
    last = max((r.complete_s for r in reqs), default=0.0)
    if boot_s < last:
        raise ValueError(f"boot_s {boot_s} is before the last completion "
                         f"{last}")
    return BootTrace(tuple(reqs), float(boot_s), int(image_size))


def _is_read(op: str) -> bool:
    return op[:1].lower() == "r"


def synthetic_trace(ws_bytes: int, reads: int, boot_s: float,
                    image_size: int, *, seed: int = 0) -> BootTrace:
    """A boot-like trace: ``reads`` reads of 4-128 KiB whose union is
    about ``ws_bytes``, laid out in the first 2 x ws_bytes of the image and
    read in shuffled runs of nearby extents, some re-read later; a quarter
    of the reads are issued together with the previous one; local service
    100 us + 1 GB/s; think times (exponential) fill boot_s, 5 % tail."""
    if ws_bytes <= 0 or reads <= 0 or ws_bytes > image_size:
        raise ValueError("need 0 < ws_bytes <= image_size and reads > 0")
    rng = random.Random(seed)
    sizes = [4096 << rng.randrange(6) for _ in range(reads)]
    total = sum(sizes)
    if total < ws_bytes:      # too few reads for the working set: larger
        f = ws_bytes / total
        sizes = [max(4096, round(s * f / 4096) * 4096) for s in sizes]
    unique, cum = [], 0
    for s in sizes:
        if cum >= ws_bytes:
            break
        s = min(s, -(-(ws_bytes - cum) // 4096) * 4096)
        unique.append(s)
        cum += s
    region = min(image_size, max(2 * cum, cum))
    weights = [rng.random() for _ in unique]
    gap_unit = (region - cum) / (sum(weights) or 1)
    extents, pos = [], 0
    for s, w in zip(unique, weights):
        pos += int(w * gap_unit) // 4096 * 4096
        if pos + s > image_size:
            pos = image_size - s
        extents.append((pos, s))
        pos += s
    runs, i = [], 0           # boot reads hop between runs of extents
    while i < len(extents):
        n = rng.randint(1, 16)
        runs.append(extents[i:i + n])
        i += n
    rest = runs[1:]
    rng.shuffle(rest)
    order = [e for run in [runs[0]] + rest for e in run]
    keyed = [(float(k), e) for k, e in enumerate(order)]
    for _ in range(reads - len(order)):   # re-reads of earlier extents
        p = rng.uniform(1, len(order))
        off, ln = order[rng.randrange(int(p))]
        sub = min(ln, 4096 << rng.randrange(6))
        sub_off = off + rng.randrange(0, ln - sub + 1, 4096)
        keyed.append((p, (sub_off, sub)))
    keyed.sort(key=lambda x: x[0])
    seq = [e for _, e in keyed]
    svc = [100e-6 + ln / 1e9 for _, ln in seq]
    together = [i > 0 and rng.random() < 0.25 for i in range(len(seq))]
    think_total = 0.95 * boot_s - sum(
        s for s, t in zip(svc, together) if not t)
    if think_total < 0:
        raise ValueError(f"boot_s {boot_s} is too short for {reads} reads")
    draws = [rng.expovariate(1.0) for _ in seq]
    scale = think_total / sum(d for d, t in zip(draws, together) if not t)
    rows, last_c, prev_issue = [], 0.0, 0.0
    for (off, ln), s, tog, d in zip(seq, svc, together, draws):
        issue = prev_issue if tog else last_c + d * scale
        rows.append((issue, issue + s, "read", off, ln))
        last_c = max(last_c, issue + s)
        prev_issue = issue
    return trace_from_tuples(rows, max(boot_s, last_c), image_size)


def trace_stats(trace: BootTrace, chunk_size: int) -> dict:
    """Working set (union of read ranges) and what one VM reads."""
    spans = sorted((r.offset, r.offset + r.length) for r in trace.requests
                   if _is_read(r.op) and r.length)
    ws, end, chunks = 0, -1, set()
    for lo, hi in spans:
        if lo > end:
            ws += hi - lo
            end = hi
        elif hi > end:
            ws += hi - end
            end = hi
        chunks.update(range(lo // chunk_size, (hi - 1) // chunk_size + 1))
    return {"working_set_bytes": ws,
            "working_set_chunks": len(chunks),
            "working_set_chunk_bytes": sum(
                min(chunk_size, trace.image_size - c * chunk_size)
                for c in chunks),
            "reads_per_vm": len(spans),
            "bytes_read_per_vm": sum(hi - lo for lo, hi in spans),
            "requests_per_vm": len(trace.requests)}


# -- the plan: a trace compiled for one mode ----------------------------------

@dataclass
class Plan:
    """Candidates (requests that may wait for the network) of a trace.

    Candidate k is issued ``offset[k]`` after its anchor completes (anchor
    ROOT: the VM's start) and needs dense chunk ids ``need[k]`` (cached
    modes) or ``nbytes[k]`` from the origin (direct). The VM has booted
    ``boot_offset`` after ``boot_anchor`` completes.
    """
    offset: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    need: list[tuple[int, ...]] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    children: dict[int, list[int]] = field(default_factory=dict)
    boot_anchor: int = ROOT
    boot_offset: float = 0.0
    chunk_bytes: list[int] = field(default_factory=list)  # per dense id
    # per dense id: its owner region (p2p/owners.py OWNER_REGION)
    chunk_region: list[int] = field(default_factory=list)


def compile_plan(trace: BootTrace, mode: str, chunk_size: int,
                 local_service_s: float | None = None) -> Plan:
    """mode "cache": chunk fetches, ancestors' chunks are hits; "direct":
    every read fetched; "local": everything local (a copied image)."""
    reqs = trace.requests
    n = len(reqs)
    # Dependency: the latest recorded completion at or before the issue,
    # among requests issued earlier (ties of zero-length requests).
    by_c = sorted(range(n), key=lambda i: (reqs[i].complete_s, i))
    cs = [reqs[i].complete_s for i in by_c]
    dep = [ROOT] * n
    for i, r in enumerate(reqs):
        k = bisect.bisect_right(cs, r.issue_s) - 1
        while k >= 0 and by_c[k] >= i:
            k -= 1
        dep[i] = by_c[k] if k >= 0 else ROOT
    think = [r.issue_s - (reqs[d].complete_s if d != ROOT else 0.0)
             for r, d in zip(reqs, dep)]
    svc = [r.complete_s - r.issue_s if local_service_s is None
           else local_service_s for r in reqs]

    dense: dict[int, int] = {}
    plan = Plan()
    chunks: list[tuple[int, ...]] = []
    for r in reqs:
        if mode == "cache" and _is_read(r.op) and r.length:
            ids = []
            for c in range(r.offset // chunk_size,
                           (r.offset + r.length - 1) // chunk_size + 1):
                if c not in dense:
                    dense[c] = len(dense)
                    plan.chunk_bytes.append(
                        min(chunk_size, trace.image_size - c * chunk_size))
                    plan.chunk_region.append(
                        c * chunk_size // max(OWNER_REGION, chunk_size))
                ids.append(dense[c])
            chunks.append(tuple(ids))
        else:
            chunks.append(())

    # Which requests may miss: cache mode, a read with a chunk no ancestor
    # read (depth-first over the dependency forest, counting the chunks
    # on the current path); direct, every read; local, none.
    candidate = [False] * n
    if mode == "direct":
        candidate = [_is_read(r.op) and r.length > 0 for r in reqs]
    elif mode == "cache":
        kids: list[list[int]] = [[] for _ in range(n)]
        roots = []
        for i, d in enumerate(dep):
            (roots if d == ROOT else kids[d]).append(i)
        on_path = [0] * len(dense)
        stack = [(i, False) for i in reversed(roots)]
        while stack:
            i, leaving = stack.pop()
            if leaving:
                for c in chunks[i]:
                    on_path[c] -= 1
                continue
            candidate[i] = any(on_path[c] == 0 for c in chunks[i])
            for c in chunks[i]:
                on_path[c] += 1
            stack.append((i, True))
            stack.extend((j, False) for j in reversed(kids[i]))
    elif mode != "local":
        raise ValueError(f"unknown plan mode {mode!r}")

    # Offsets: a hit completes a constant time after its nearest candidate
    # ancestor (its anchor); candidates are anchors themselves.
    anchor = [ROOT] * n
    rel_done = [0.0] * n
    plan.children[ROOT] = []
    for i, r in enumerate(reqs):
        d = dep[i]
        a, base = (ROOT, 0.0) if d == ROOT else (anchor[d], rel_done[d])
        issue = base + think[i]
        if candidate[i]:
            k = len(plan.offset)
            plan.offset.append(issue)
            plan.service.append(svc[i])
            plan.need.append(chunks[i])
            plan.nbytes.append(r.length)
            plan.children[a].append(k)
            plan.children[k] = []
            anchor[i], rel_done[i] = k, 0.0
        else:
            anchor[i], rel_done[i] = a, issue + svc[i]
    if n:
        last = max(range(n), key=lambda i: (reqs[i].complete_s, i))
        plan.boot_anchor = anchor[last]
        plan.boot_offset = rel_done[last] + trace.boot_s - \
            reqs[last].complete_s
    else:
        plan.boot_offset = trace.boot_s
    return plan


# -- network ------------------------------------------------------------------

class _Group:
    """Flows from one sender link to one receiver link: always the same
    per-flow rate, so one virtual clock ``v`` (bytes served per flow) and
    a heap of finish points serve them all (processor sharing)."""
    __slots__ = ("src", "dst", "count", "rate", "v", "tv", "flows", "token")

    def __init__(self, src: int, dst: int, now: float):
        self.src, self.dst = src, dst
        self.count = 0        # flows, with multiplicity
        self.rate = 0.0       # bytes/s per flow
        self.v = 0.0
        self.tv = now
        self.flows: list = []  # (finish_v, seq, mult, size, tag)
        self.token = 0


class Net:
    """Fluid flows over links, max-min fair (see the module docstring for
    when rates are recomputed). Link 0 is the origin's uplink; host h has
    uplink 1 + 2h and downlink 2 + 2h. Capacities in bytes/s (INF ok)."""

    ORIGIN = 0

    def __init__(self, caps: list[float], rate_update_frac: float = 0.05):
        self.cap = caps
        self.assigned = [0.0] * len(caps)   # sum of flow rates per link
        self.nflows = [0] * len(caps)       # flows per link
        self.groups: dict[int, _Group] = {}
        self.heap: list = []                # (finish_t, token, group)
        self.token = 0
        self.seq = 0
        self.changes = 0
        self.active = 0
        self.frac = rate_update_frac
        self.recomputes = 0
        self.due: list = []                 # instant flows: (tag, mult)
        self.origin_bytes = 0.0
        self.peer_bytes = 0.0
        # Origin bytes sent as a piecewise linear function of time.
        self.o_rate = 0.0
        self.o_t = 0.0
        self.o_cum = 0.0
        self.o_marks = [(0.0, 0.0)]

    @staticmethod
    def up(h: int) -> int:
        return 1 + 2 * h

    @staticmethod
    def down(h: int) -> int:
        return 2 + 2 * h

    def _o_mark(self, now: float) -> None:
        if now > self.o_t:
            self.o_cum += self.o_rate * (now - self.o_t)
            self.o_t = now
            self.o_marks.append((now, self.o_cum))

    def _push(self, g: _Group) -> None:
        if g.flows and g.rate > 0:
            self.token += 1
            g.token = self.token
            heapq.heappush(self.heap, (
                g.tv + (g.flows[0][0] - g.v) / g.rate, self.token, g))
        else:
            g.token = 0

    def add(self, now: float, src: int, dst: int, size: float, mult: int,
            tag) -> None:
        if src == 0:
            self.origin_bytes += size * mult
        else:
            self.peer_bytes += size * mult
        cap = self.cap
        if size <= 0 or (cap[src] == INF and cap[dst] == INF):
            if src == 0:
                self._o_mark(now)
                self.o_cum += size * mult
                self.o_marks.append((now, self.o_cum))
            self.due.append((tag, mult))
            return
        key = src * len(cap) + dst
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group(src, dst, now)
            free = min(cap[src] - self.assigned[src],
                       cap[dst] - self.assigned[dst])
            g.rate = max(0.0, free / mult)
        elif g.rate:
            g.v += g.rate * (now - g.tv)
            g.tv = now
        else:
            g.tv = now
        self.seq += 1
        head = g.flows[0][0] if g.flows else INF
        heapq.heappush(g.flows, (g.v + size, self.seq, mult, size, tag))
        g.count += mult
        r = g.rate * mult
        self.assigned[src] += r
        self.assigned[dst] += r
        self.nflows[src] += mult
        self.nflows[dst] += mult
        if src == 0:
            self._o_mark(now)
            self.o_rate += r
        self.active += mult
        self.changes += 1
        if g.v + size < head:
            self._push(g)

    def next_time(self) -> float:
        heap = self.heap
        while heap and heap[0][1] != heap[0][2].token:
            heapq.heappop(heap)
        return heap[0][0] if heap else INF

    def pop(self):
        """Finish the earliest flow (call after next_time): its tag, mult."""
        t, _, g = heapq.heappop(self.heap)
        fv, _, mult, _, tag = heapq.heappop(g.flows)
        g.v = max(g.v + g.rate * (t - g.tv), fv)
        g.tv = t
        g.count -= mult
        r = g.rate * mult
        self.assigned[g.src] -= r
        self.assigned[g.dst] -= r
        self.nflows[g.src] -= mult
        self.nflows[g.dst] -= mult
        if g.src == 0:
            self._o_mark(t)
            self.o_rate -= r
        self.active -= mult
        self.changes += 1
        if g.flows:
            self._push(g)
        else:
            g.token = 0
            del self.groups[g.src * len(self.cap) + g.dst]
        return tag, mult

    def want_recompute(self) -> bool:
        return self.changes > 0 and (
            self.changes >= self.frac * self.active
            or self.next_time() == INF)

    def _fill_one_sender(self, groups: list[_Group], src: int) -> None:
        """Water-filling when every flow leaves one sender (lazy, direct,
        copy): each receiver link carries one group, so its per-flow limit
        is known up front; same result as _fill, without the link heap."""
        cap = self.cap
        left = cap[src]
        n = sum(g.count for g in groups)
        for lim, g in sorted(((cap[g.dst] / g.count, g) for g in groups),
                             key=lambda x: x[0]):
            level = left / n if left != INF else INF
            if lim <= level:
                g.rate = lim
                if left != INF:
                    left = max(0.0, left - lim * g.count)
                n -= g.count
            else:
                g.rate = level

    def _fill(self, groups: list[_Group]) -> None:
        """Progressive filling: freeze the flows of the link with the
        smallest fair share, take their rates off their other link,
        repeat."""
        cap = self.cap
        cnt: dict[int, int] = {}
        members: dict[int, list[_Group]] = {}
        for g in groups:
            g.rate = -1.0     # not frozen yet
            for link in (g.src, g.dst):
                cnt[link] = cnt.get(link, 0) + g.count
                members.setdefault(link, []).append(g)
        rem = {link: cap[link] for link in cnt}
        heap = [(rem[link] / c, link) for link, c in cnt.items()]
        heapq.heapify(heap)
        while heap:
            share, link = heapq.heappop(heap)
            c = cnt[link]
            if c <= 0 or share != rem[link] / c:
                continue      # stale entry
            if share == INF:
                break
            for g in members[link]:
                if g.rate >= 0:
                    continue
                g.rate = share
                o = g.dst if g.src == link else g.src
                cnt[o] -= g.count
                if rem[o] != INF:
                    rem[o] = max(0.0, rem[o] - share * g.count)
                if cnt[o] > 0:
                    heapq.heappush(heap, (rem[o] / cnt[o], o))
            cnt[link] = 0

    def recompute(self, now: float) -> None:
        """Max-min fair rates by progressive filling over the groups."""
        self.recomputes += 1
        self.changes = 0
        groups = list(self.groups.values())
        for g in groups:
            if g.rate:
                g.v += g.rate * (now - g.tv)
            g.tv = now
        src = groups[0].src if groups else 0
        if all(g.src == src for g in groups):
            self._fill_one_sender(groups, src)
        else:
            self._fill(groups)
        cap = self.cap
        assigned = [0.0] * len(cap)
        o_rate = 0.0
        entries = []
        for g in groups:
            r = g.rate * g.count
            assigned[g.src] += r
            assigned[g.dst] += r
            if g.src == 0:
                o_rate += r
            if g.rate > 0:
                self.token += 1
                g.token = self.token
                entries.append((now + (g.flows[0][0] - g.v) / g.rate,
                                self.token, g))
            else:
                g.token = 0
        self.assigned = assigned
        self._o_mark(now)
        self.o_rate = o_rate
        heapq.heapify(entries)
        self.heap = entries

    def peak_origin_Bps(self, window_s: float) -> float:
        """Highest origin throughput over aligned windows, bytes/s."""
        marks = self.o_marks
        if len(marks) < 2 or marks[-1][1] <= 0:
            return 0.0
        ts = [m[0] for m in marks]

        def cum_at(x: float) -> float:
            i = bisect.bisect_right(ts, x) - 1
            t0, c0 = marks[i]
            if i + 1 < len(marks):
                t1, c1 = marks[i + 1]
                if t1 > t0:
                    return c0 + (c1 - c0) * (x - t0) / (t1 - t0)
            return c0
        nwin = max(1, math.ceil(ts[-1] / window_s))
        prev, best = 0.0, 0.0
        for k in range(1, nwin + 1):
            cur = cum_at(k * window_s)
            best = max(best, cur - prev)
            prev = cur
        return best / window_s


def max_min_rates(flows: list[tuple[int, int]],
                  caps: list[float]) -> list[float]:
    """Max-min fair rate of each (src_link, dst_link) flow (for tests and
    callers that want the exact allocation of a flow set)."""
    net = Net(caps)
    for i, (s, d) in enumerate(flows):
        net.add(0.0, s, d, 1.0, 1, i)
    net.recompute(0.0)
    return [net.groups[s * len(caps) + d].rate
            if s * len(caps) + d in net.groups else INF for s, d in flows]


# -- the simulation -----------------------------------------------------------

_ISSUE, _ARRIVE, _DATA, _COPIED, _START = range(5)
_T_CHUNK, _T_DIRECT, _T_COPY = range(3)


class _Sim:
    def __init__(self, plan: Plan, strategy: str, hosts: int,
                 vms: list[tuple[int, float, int]], net: Net, *,
                 rtt_s: float, tree_degree: int, image_bytes: int,
                 local_boot_s: float, seed: int,
                 origin_fetch_s: float | None = None,
                 peer_fetch_s: float | None = None):
        self.plan, self.strategy, self.net = plan, strategy, net
        self.hosts = hosts
        self.vm_host = [v[0] for v in vms]
        self.vm_start = [v[1] for v in vms]
        self.vm_mult = [v[2] for v in vms]
        self.vm_done = [-1.0] * len(vms)
        self.host_vms: list[list[int]] = [[] for _ in range(hosts)]
        for i, v in enumerate(vms):
            self.host_vms[v[0]].append(i)
        self.rtt = rtt_s
        # Fixed cost of a chunk fetch, by source (None: rtt_s).
        self.origin_fetch = rtt_s if origin_fetch_s is None \
            else origin_fetch_s
        self.peer_fetch = rtt_s if peer_fetch_s is None else peer_fetch_s
        self.degree = tree_degree
        self.image_bytes = image_bytes
        self.local_boot = local_boot_s
        self.rng = random.Random(seed)
        self.W = len(plan.chunk_bytes)
        self.state = [bytearray(self.W) for _ in range(hosts)]  # 0/1/2
        self.waiters: dict[int, list] = {}
        self.holders: list[list[int]] = [[] for _ in range(self.W)]
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.copied: list[float] = [INF] * hosts
        self.handled = 0

    def push(self, t: float, kind: int, a, b=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    # -- VMs

    def complete(self, vm: int, k: int, t: float) -> None:
        """Candidate k of vm completed at t: roll forward its children that
        are hits now (chunks never leave a cache), queue the others."""
        plan = self.plan
        offset, service, need, children = (plan.offset, plan.service,
                                           plan.need, plan.children)
        st = self.state[self.vm_host[vm]]
        direct = self.strategy == "direct"
        stack = [(k, t)]
        while stack:
            k, t = stack.pop()
            if k == plan.boot_anchor:
                self.vm_done[vm] = t + plan.boot_offset
            for j in children[k]:
                ti = t + offset[j]
                if not direct:
                    for c in need[j]:
                        if st[c] != 2:
                            break
                    else:
                        stack.append((j, ti + service[j]))
                        continue
                self.push(ti, _ISSUE, vm, j)

    def issue(self, vm: int, j: int, t: float) -> None:
        h = self.vm_host[vm]
        plan = self.plan
        if self.strategy == "direct":
            self.net.add(t, 0, Net.down(h), plan.nbytes[j], self.vm_mult[vm],
                         (_T_DIRECT, [vm, j, 1, t], None))
            return
        st = self.state[h]
        req = None
        W = self.W
        for c in plan.need[j]:
            s = st[c]
            if s == 2:
                continue
            if s == 0:
                self.fetch(h, c, t)
            if req is None:
                req = [vm, j, 0, t]
            req[2] += 1
            self.waiters.setdefault(h * W + c, []).append(req)
        if req is None:
            self.complete(vm, j, t + plan.service[j])

    def data(self, req: list, t: float) -> None:
        req[2] -= 1
        if req[2] == 0:
            vm, j, _, issued = req
            self.complete(vm, j, max(t, issued + self.plan.service[j]))

    # -- chunks

    def chunk_flow(self, t: float, src: int | None, h: int, c: int) -> None:
        """Chunk c on its way to host h from host ``src`` (None: the
        origin); it lands the source's fetch cost after its last byte."""
        if src is None:
            self.net.add(t, 0, Net.down(h), self.plan.chunk_bytes[c], 1,
                         (_T_CHUNK, h, c, self.origin_fetch))
        else:
            self.net.add(t, Net.up(src), Net.down(h),
                         self.plan.chunk_bytes[c], 1,
                         (_T_CHUNK, h, c, self.peer_fetch))

    def fetch(self, h: int, c: int, t: float) -> None:
        """Start getting chunk c to host h (which lacks it)."""
        self.state[h][c] = 1
        s = self.strategy
        if s == "lazy":
            self.chunk_flow(t, None, h, c)
        elif s == "vmthunder":
            if self.holders[c]:
                self.chunk_flow(t, self.pick(self.holders[c]), h, c)
                return
            owner = self.owner(c)
            if owner == h:
                self.chunk_flow(t, None, h, c)
                return
            if self.state[owner][c] == 0:
                self.fetch(owner, c, t)
            self.waiters.setdefault(owner * self.W + c, []).append(h)
        elif s == "tree":
            if h == 0:
                self.chunk_flow(t, None, h, c)
                return
            p = (h - 1) // self.degree
            sp = self.state[p][c]
            if sp == 2:
                self.chunk_flow(t, p, h, c)
                return
            if sp == 0:
                self.fetch(p, c, t)
            self.waiters.setdefault(p * self.W + c, []).append(h)
        else:
            raise AssertionError(s)

    def owner(self, c: int) -> int:
        """The host that fetches chunk c from the origin for everyone (the
        owner of its region, as the agents have it)."""
        region = self.plan.chunk_region[c]
        return (((region + 1) * 2654435761) & 0xFFFFFFFF) % self.hosts

    def pick(self, holders: list[int]) -> int:
        """Spread over holders: the less busy uplink of two at random."""
        n = len(holders)
        if n == 1:
            return holders[0]
        rnd = self.rng.random
        a, b = holders[int(rnd() * n)], holders[int(rnd() * n)]
        nf = self.net.nflows
        return a if nf[Net.up(a)] <= nf[Net.up(b)] else b

    def arrived(self, h: int, c: int, t: float) -> None:
        self.state[h][c] = 2
        self.holders[c].append(h)
        for w in self.waiters.pop(h * self.W + c, ()):
            if type(w) is int:    # a host waiting to fetch from a holder
                # tree: the parent; vmthunder: the owner (first copy).
                src = h if self.strategy in ("tree", "vmthunder") else \
                    self.pick(self.holders[c])
                self.chunk_flow(t, src, w, c)
            else:
                self.data(w, t)

    # -- main loop

    def flow_done(self, tag, t: float) -> None:
        kind, a, b = tag[:3]
        delay = tag[3] if len(tag) > 3 else self.rtt
        if delay > 0:
            self.push(t + delay, _ARRIVE + kind, a, b)
        else:
            self.dispatch(_ARRIVE + kind, a, b, t)

    def dispatch(self, kind: int, a, b, t: float) -> None:
        if kind == _ISSUE:
            self.issue(a, b, t)
        elif kind == _ARRIVE:
            self.arrived(a, b, t)
        elif kind == _DATA:
            self.data(a, t)
        elif kind == _COPIED:
            self.copied[a] = t
            for vm in self.host_vms[a]:
                start = max(t, self.vm_start[vm])
                self.vm_done[vm] = start + self.local_boot
        elif kind == _START:
            self.complete(a, ROOT, t)

    def run(self) -> None:
        net, events = self.net, self.events
        if self.strategy in ("copy", "precache"):
            for h in range(self.hosts):
                net.add(0.0, 0, Net.down(h), self.image_bytes, 1,
                        (_T_COPY, h, None))
        else:
            for vm, start in enumerate(self.vm_start):
                self.push(start, _START, vm)
        while True:
            if net.due:
                due, net.due = net.due, []
                for tag, _ in due:
                    self.flow_done(tag, self.now)
                continue
            t_ev = events[0][0] if events else INF
            t_fl = net.next_time()
            t = min(t_ev, t_fl)
            if t == INF:
                break
            if t > self.now and net.want_recompute():
                net.recompute(self.now)
                continue
            self.now = t
            self.handled += 1
            if t_fl <= t_ev:
                tag, _ = net.pop()
                self.flow_done(tag, t)
            else:
                _, _, kind, a, b = heapq.heappop(events)
                self.dispatch(kind, a, b, t)


def _bits(rate_bps: float) -> float:
    return INF if rate_bps is None or rate_bps == INF else rate_bps / 8.0


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def _direct_fluid(plan: Plan, hosts: int, vms_per_host: int,
                  origin_Bps: float, host_Bps: float,
                  rtt_s: float) -> float:
    """Boot time of one VM when each read gets a fixed fair share."""
    share = min(origin_Bps / (hosts * vms_per_host), host_Bps / vms_per_host)
    done = {ROOT: 0.0}
    boot = plan.boot_offset if plan.boot_anchor == ROOT else None
    stack = [ROOT]
    while stack:
        k = stack.pop()
        for j in plan.children[k]:
            issue = done[k] + plan.offset[j]
            fetch = rtt_s + (plan.nbytes[j] / share if share < INF else 0.0)
            done[j] = issue + max(plan.service[j], fetch)
            if j == plan.boot_anchor:
                boot = done[j] + plan.boot_offset
            stack.append(j)
    # Overlapping reads would beat the fair share; the links cannot.
    read = sum(plan.nbytes)
    return max(boot, read * hosts * vms_per_host / origin_Bps,
               read * vms_per_host / host_Bps)


def simulate(trace_requests, boot_s: float, image_size: int,
             image_bytes: int, hosts: int, vms_per_host: int, strategy: str,
             origin_rate_bps: float, host_rate_bps: float,
             chunk_size: int = 256 * KiB, *, rtt_s: float = 0.0,
             origin_fetch_s: float | None = None,
             peer_fetch_s: float | None = None,
             local_service_s: float | None = None,
             vm_start_spread_s: float = 0.0, tree_degree: int = 4,
             rate_update_frac: float = 0.05, merge_identical: bool = True,
             window_s: float = 1.0, direct_flow_limit: int = 3_000_000,
             seed: int = 0) -> dict:
    """Simulate one strategy; rates in bit/s (math.inf: unlimited).

    ``trace_requests``: (issue_s, complete_s, op, offset, length) tuples or
    a BootTrace (then boot_s and image_size are taken from it). Times in
    the result are seconds from the clock start (t=0, when the first VM
    may start); per-VM boot times are counted from each VM's own start.

    Result keys: strategy, model ("event", or "fluid" for a big
    ``direct``), hosts, vms_per_host, vms, boot_p50_s, boot_p95_s,
    boot_max_s, boot_mean_s, all_booted_s, origin_bytes, peer_bytes,
    peak_origin_bps (bit/s, highest ``window_s`` average), precache_s,
    local_boot_s, working_set_bytes, working_set_chunks,
    working_set_chunk_bytes, reads_per_vm, bytes_read_per_vm,
    requests_per_vm, candidates_per_vm, events, rate_recomputations,
    sim_wall_s, params.
    """
    wall0 = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if hosts < 1 or vms_per_host < 1 or chunk_size < 1:
        raise ValueError("hosts, vms_per_host and chunk_size must be >= 1")
    trace = trace_requests if isinstance(trace_requests, BootTrace) else \
        trace_from_tuples(trace_requests, boot_s, image_size)
    stats = trace_stats(trace, chunk_size)
    o_Bps, h_Bps = _bits(origin_rate_bps), _bits(host_rate_bps)
    local_plan = compile_plan(trace, "local", chunk_size, local_service_s)
    local_boot = local_plan.boot_offset
    mode = {"copy": "local", "precache": "local", "direct": "direct"}.get(
        strategy, "cache")
    plan = local_plan if mode == "local" else compile_plan(
        trace, mode, chunk_size, local_service_s)

    rng = random.Random(seed)
    vms: list[tuple[int, float, int]] = []   # (host, start, multiplicity)
    for h in range(hosts):
        if vm_start_spread_s > 0:
            vms.extend((h, rng.uniform(0, vm_start_spread_s), 1)
                       for _ in range(vms_per_host))
        elif merge_identical:
            vms.append((h, 0.0, vms_per_host))
        else:
            vms.extend((h, 0.0, 1) for _ in range(vms_per_host))

    result = {"strategy": strategy, "model": "event"}
    precache_s = 0.0
    n_vm = hosts * vms_per_host
    if strategy == "direct" and len(vms) * len(plan.offset) > \
            direct_flow_limit:
        boot = _direct_fluid(plan, hosts, vms_per_host, o_Bps, h_Bps, rtt_s)
        boots = [boot] * n_vm
        done_at = [start + boot for _, start, m in vms for _ in range(m)]
        origin_bytes = stats["bytes_read_per_vm"] * n_vm
        result.update(model="fluid", peer_bytes=0.0,
                      peak_origin_bps=min(o_Bps, origin_bytes / max(
                          max(done_at), 1e-12)) * 8,
                      rate_recomputations=0, events=0)
    else:
        net = Net([o_Bps] + [h_Bps] * (2 * hosts), rate_update_frac)
        sim = _Sim(plan, strategy, hosts, vms, net, rtt_s=rtt_s,
                   tree_degree=tree_degree, image_bytes=image_bytes,
                   local_boot_s=local_boot, seed=seed,
                   origin_fetch_s=origin_fetch_s,
                   peer_fetch_s=peer_fetch_s)
        sim.run()
        if min(sim.vm_done) < 0:
            raise RuntimeError("simulation ended with VMs not booted")
        if strategy == "precache":
            precache_s = max(sim.copied)
            done_at = [s + local_boot for _, s, m in vms for _ in range(m)]
        else:
            done_at = [d for d, m in zip(sim.vm_done, sim.vm_mult)
                       for _ in range(m)]
        boots = sorted(d - s for d, (_, s, m) in zip(
            done_at, ((h, s, m) for h, s, m in vms for _ in range(m))))
        origin_bytes = net.origin_bytes
        result.update(peer_bytes=net.peer_bytes,
                      peak_origin_bps=net.peak_origin_Bps(window_s) * 8,
                      rate_recomputations=net.recomputes,
                      events=sim.handled)
    boots.sort()
    result.update({
        "hosts": hosts, "vms_per_host": vms_per_host, "vms": n_vm,
        "boot_p50_s": _percentile(boots, 50),
        "boot_p95_s": _percentile(boots, 95),
        "boot_max_s": boots[-1],
        "boot_mean_s": sum(boots) / len(boots),
        "all_booted_s": max(done_at),
        "origin_bytes": origin_bytes,
        "precache_s": precache_s,
        "local_boot_s": local_boot,
        "candidates_per_vm": len(plan.offset),
        **stats,
        "sim_wall_s": time.perf_counter() - wall0,
    })
    result["params"] = {
        "image_size": trace.image_size, "image_bytes": image_bytes,
        "boot_s": trace.boot_s, "origin_rate_bps": origin_rate_bps,
        "host_rate_bps": host_rate_bps, "chunk_size": chunk_size,
        "rtt_s": rtt_s, "origin_fetch_s": origin_fetch_s,
        "peer_fetch_s": peer_fetch_s, "local_service_s": local_service_s,
        "vm_start_spread_s": vm_start_spread_s, "tree_degree": tree_degree,
        "rate_update_frac": rate_update_frac,
        "merge_identical": merge_identical, "window_s": window_s,
        "seed": seed}
    return result


def simulate_trace(trace, *, strategy: str, hosts: int, vms_per_host: int,
                   origin_rate_bps: float, host_rate_bps: float,
                   image_bytes: int, chunk_size: int = 256 * KiB,
                   **kw) -> dict:
    """simulate() for any trace object with ``requests`` (5-tuples or
    NamedTuples of issue_s, complete_s, op, offset, length), ``image_size``
    and ``boot_s`` (None: the last completion) -- e.g. a
    vmthunder.trace.Trace, without importing that module. Requests
    completing after boot_s (I/O after the boot marker) are dropped."""
    rows = [tuple(r)[:5] for r in trace.requests]
    boot_s = trace.boot_s
    if boot_s is None:
        boot_s = max((r[1] for r in rows), default=0.0)
    rows = [r for r in rows if r[1] <= boot_s]
    return simulate(rows, boot_s, trace.image_size, image_bytes, hosts,
                    vms_per_host, strategy, origin_rate_bps, host_rate_bps,
                    chunk_size, **kw)


# -- command line -------------------------------------------------------------

_RATE_UNITS = {  # tc's units: "bit" suffixes are bits, "bps" bytes per s
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def parse_rate(text: str) -> float:
    """200mbit, 1gbit, 25mbps (tc: bytes/s), 1e9 (bit/s), inf -> bit/s."""
    t = text.strip().lower()
    if t in ("inf", "infinite", "unlimited"):
        return INF
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            num, mul = t[:-len(unit)], _RATE_UNITS[unit]
            break
    else:
        num, mul = t, 1
    try:
        value = float(num) * mul
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate (examples: 200mbit, 1gbit, inf)") \
            from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: rate must be positive")
    return value


def load_trace(path: str) -> BootTrace:
    """A recorded boot trace (vmthunder/trace.py format), up to its
    boot marker."""
    from vmthunder import trace as trace_mod
    trace = trace_mod.load(path)
    boot_s = trace.boot_s
    rows = [tuple(r)[:5] for r in trace.requests]
    if boot_s is None:
        boot_s = max((r[1] for r in rows), default=0.0)
    return trace_from_tuples([r for r in rows if r[1] <= boot_s], boot_s,
                             trace.image_size)


def _finite(obj):
    """JSON has no infinity: unlimited rates become the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.sim",
        description="Model boot strategies on M hosts x V VMs.")
    p.add_argument("--hosts", type=int, default=10)
    p.add_argument("--vms-per-host", type=int, default=10)
    p.add_argument("--origin-rate", type=parse_rate, default="200mbit")
    p.add_argument("--host-rate", type=parse_rate, default="1gbit")
    p.add_argument("--strategies", default="copy,precache,direct,lazy,"
                   "vmthunder,tree")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", metavar="FILE",
                     help="a recorded boot trace (vmthunder/bench/traces/"
                     "*.trace.gz, `vmthunder boot --trace`)")
    src.add_argument("--synthetic", metavar="WS_MB,READS,BOOT_S,IMAGE_MB",
                     default="50,1500,30,2048",
                     help="synthetic boot trace (default %(default)s)")
    p.add_argument("--image-bytes", type=parse_size,
                   help="allocated bytes a copy moves (default: image size)")
    p.add_argument("--chunk-size", type=parse_size, default=256 * KiB)
    p.add_argument("--rtt-ms", type=float, default=0.0,
                   help="request round trip added to each fetch")
    p.add_argument("--origin-fetch-ms", type=float,
                   help="fixed cost of a chunk fetch from the origin "
                        "(cached strategies; default: --rtt-ms)")
    p.add_argument("--peer-fetch-ms", type=float,
                   help="fixed cost of a chunk fetch from another host "
                        "(holder, owner, parent; default: --rtt-ms)")
    p.add_argument("--local-service-us", type=float,
                   help="local service time per request (default: the "
                   "recorded one)")
    p.add_argument("--vm-start-spread", type=float, default=0.0,
                   metavar="S", help="VMs start uniformly over [0, S] s")
    p.add_argument("--tree-degree", type=int, default=4)
    p.add_argument("--rate-update-frac", type=float, default=0.05)
    p.add_argument("--no-merge", action="store_true",
                   help="simulate identical VMs one by one")
    p.add_argument("--window", type=float, default=1.0,
                   help="window of the peak origin throughput, s")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"unknown strategies {bad}; known: {STRATEGIES}")
    if args.trace:
        trace = load_trace(args.trace)
        source = {"trace": args.trace}
    else:
        try:
            ws, reads, boot, image = args.synthetic.split(",")
            trace = synthetic_trace(int(float(ws) * MiB), int(reads),
                                    float(boot), int(float(image) * MiB),
                                    seed=args.seed)
        except ValueError as e:
            raise SystemExit(f"--synthetic {args.synthetic}: {e}") from None
        source = {"synthetic": args.synthetic}
    image_bytes = args.image_bytes or trace.image_size
    results = {}
    for s in strategies:
        r = simulate(
            trace, trace.boot_s, trace.image_size, image_bytes, args.hosts,
            args.vms_per_host, s, args.origin_rate, args.host_rate,
            args.chunk_size, rtt_s=args.rtt_ms / 1e3,
            origin_fetch_s=None if args.origin_fetch_ms is None
            else args.origin_fetch_ms / 1e3,
            peer_fetch_s=None if args.peer_fetch_ms is None
            else args.peer_fetch_ms / 1e3,
            local_service_s=None if args.local_service_us is None
            else args.local_service_us / 1e6,
            vm_start_spread_s=args.vm_start_spread,
            tree_degree=args.tree_degree,
            rate_update_frac=args.rate_update_frac,
            merge_identical=not args.no_merge, window_s=args.window,
            seed=args.seed)
        results[s] = r
        print(f"# {s} done in {r['sim_wall_s']:.1f} s", file=sys.stderr,
              flush=True)
    first = next(iter(results.values()))
    print(f"{args.hosts} hosts x {args.vms_per_host} VMs, origin "
          f"{args.origin_rate / 1e6:g} Mbit/s, hosts "
          f"{args.host_rate / 1e6:g} Mbit/s; working set "
          f"{first['working_set_bytes'] / MiB:.1f} MiB, "
          f"{first['reads_per_vm']} reads/VM, local boot "
          f"{first['local_boot_s']:.2f} s")
    print(f"{'strategy':<10} {'p50 s':>8} {'p95 s':>8} {'max s':>8} "
          f"{'all s':>8} {'origin GB':>10} {'peer GB':>9} "
          f"{'peak Mb/s':>9} {'precache':>8} {'model':>6} {'wall s':>6}")
    for s, r in results.items():
        print(f"{s:<10} {r['boot_p50_s']:>8.2f} {r['boot_p95_s']:>8.2f} "
              f"{r['boot_max_s']:>8.2f} {r['all_booted_s']:>8.2f} "
              f"{r['origin_bytes'] / 1e9:>10.2f} "
              f"{r['peer_bytes'] / 1e9:>9.2f} "
              f"{r['peak_origin_bps'] / 1e6:>9.1f} "
              f"{r['precache_s']:>8.2f} {r['model']:>6} "
              f"{r['sim_wall_s']:>6.1f}")
    per = {s: {k: v for k, v in r.items() if k != "params"}
           for s, r in results.items()}
    params = dict(first["params"], hosts=args.hosts,
                  vms_per_host=args.vms_per_host, **source)
    print(json.dumps(_finite({"results": per, "params": params})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
