"""ImageVolume: one image's origin and its peers behind one read interface.

A compute host stacks its copy-on-read cache of an image on an
ImageVolume (the cache then runs with ``verify=None``: the volume checks
every chunk against the manifest, wherever it came from). For each chunk
of a read the volume picks a source:

mesh mode (the default)
    1. a peer that holds the chunk; consecutive chunks held by the same
       peers are split evenly among them (the least loaded first), one NBD
       read per piece;
    2. else a peer already fetching it (from the origin, or from a holder:
       such fetches are "rooted", and only those are offered, so waits
       never chain and two hosts never wait for each other);
    3. else, when the directory names the image's owners
       (``owners_for``) and the chunk's owner (p2p/owners.py:
       rendezvous hashing over the hosts that announced the image) is
       another live peer, that owner: its export fetches the chunks it
       owns for whoever asks (once), so in a boot storm each chunk leaves
       the origin about once. Consecutive chunks of one owner go in one
       read; such reads may take ``owner_timeout`` (the owner's own
       origin fetch included). A host never asks an owner for its own
       chunks, nor while it reads on behalf of a peer (no loops, one hop);
    4. else the origin.
    Which peer holds what comes from NBD block status in the
    ``vmthunder:cache`` context of the peer's export (p2p/export.py),
    asked for a window of chunks at a time and remembered for
    ``status_ttl`` seconds.
tree mode
    The first peer the directory names is the fixed parent; every read
    goes to it (its export reads through its own cache), an empty list
    means "read the origin".

A peer that times out (``peer_timeout`` covers connecting, the status
query and each read), breaks the connection, answers with an error or
sends a chunk that does not match the manifest is counted, avoided for
``avoid_s`` seconds, and the chunks it owed are read from the next holder,
finally from the origin. A peer answering "not held" (its status was
stale) is only skipped for that read. Origin data is checked too: a chunk
that mismatches twice fails the read with EIO naming image and chunk.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import random
import time
from typing import Protocol

from vmthunder import aio
from vmthunder import blockdev
# Chunk states, the cache's own, also as a peer reports them.
from vmthunder.cache.cache_layer import FETCHING, HELD, MISSING
from vmthunder.cache.chunkmap import index_runs
from vmthunder.nbd.client import NbdClient, NbdError, open_nbd
from vmthunder.p2p.owners import OWNER_REGION, OwnerTable, serving_peer
from vmthunder.p2p.priority import DEMAND, Lanes, priority
from vmthunder.volume.manifest import Manifest

LOG = logging.getLogger(__name__)

MODES = ("mesh", "tree")
# One read from a peer carries at most this much.
PEER_READ_MAX = 4 * 1024 * 1024
# A chunk nobody holds or fetches, read from its owner (which fetches it).
OWNER = 3
# A peer is asked about this much of the image at a time.
STATUS_WINDOW_BYTES = 256 * 1024 * 1024
ERROR_KINDS = ("timeout", "mismatch", "io", "not_held")
# What a failing peer may raise (a bad URI in the directory included).
_PEER_ERRORS = (blockdev.BlockError, NbdError, OSError, ValueError)


class PeerDirectory(Protocol):
    """Who else serves an image (the agent answers from tooz membership)."""

    def peers_for(self, image: str) -> list[str]:
        """NBD URIs (``nbd://HOST:PORT/EXPORT``) of the peer exports of
        ``image`` on *other* hosts; in tree mode the first is the parent.
        """

    def owners_for(self, image: str) -> list[tuple[str, str | None]]:
        """(key, uri) of every host that announced ``image``, THIS host
        included with uri None; keys are stable (member ids) and the
        same on every host. Empty: no owners (fetch order without
        owners, vmthunder/p2p/owners.py)."""


class StaticPeers:
    """A PeerDirectory with a fixed list (tests, one-off setups)."""

    def __init__(self, uris=()):
        self.uris = list(uris)

    def peers_for(self, image: str) -> list[str]:
        return list(self.uris)

    def owners_for(self, image: str) -> list[tuple[str, str | None]]:
        return []


class StaticOwners(StaticPeers):
    """A PeerDirectory with fixed peers that also names the owners: this
    host is ``self_key``, ``peers`` maps the other hosts' keys to their
    URIs (tests, one-off setups)."""

    def __init__(self, self_key: str, peers: dict[str, str]):
        super().__init__(peers.values())
        self.self_key = self_key
        self.keyed = dict(peers)

    def owners_for(self, image: str) -> list[tuple[str, str | None]]:
        return [*self.keyed.items(), (self.self_key, None)]


class _Peer:
    """One peer export: a few connections, its status, its record."""

    def __init__(self, uri: str):
        self.uri = uri
        self.clients: list[NbdClient] = []
        self._open_lock = asyncio.Lock()
        self.avoid_until = 0.0
        self.load = 0                   # bytes being read from it now
        # status window -> (expires, bytes of chunk states)
        self.status: dict[int, tuple[float, bytes]] = {}
        self.status_pending: dict[int, asyncio.Future] = {}
        self.counters = {"chunks": 0, "bytes": 0, "status_queries": 0,
                         **{k: 0 for k in ERROR_KINDS}}

    def avoided(self, now: float) -> bool:
        return now < self.avoid_until

    async def client(self, size: int, timeout: float,
                     limit: int) -> NbdClient:
        """A connection: an idle one, a new one (up to ``limit``), else
        the least busy."""
        self.clients = [c for c in self.clients if not c.closed]
        best = min(self.clients, key=lambda c: c.in_flight, default=None)
        if best is not None and (best.in_flight == 0
                                 or len(self.clients) >= limit):
            return best
        async with self._open_lock:
            self.clients = [c for c in self.clients if not c.closed]
            best = min(self.clients, key=lambda c: c.in_flight, default=None)
            if best is not None and (best.in_flight == 0
                                     or len(self.clients) >= limit):
                return best
            try:
                client = await open_nbd(
                    self.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE],
                    timeout=timeout)
            except (blockdev.BlockError, NbdError, OSError):
                if best is not None:
                    return best
                raise
            if client.size != size:
                client.abort()
                raise blockdev.BlockError(
                    errno.EIO, f"peer {self.uri} exports {client.size} "
                    f"bytes, the image has {size}")
            self.clients.append(client)
            return client

    def drop(self, client: NbdClient | None = None) -> None:
        """Abort one connection (or all): nothing more lands in buffers."""
        for c in ([client] if client is not None else list(self.clients)):
            c.abort()
            if c in self.clients:
                self.clients.remove(c)

    def forget_status(self) -> None:
        self.status.clear()


class ImageVolume(blockdev.BlockDevice):
    def __init__(self, origin: blockdev.BlockDevice, manifest: Manifest,
                 image: str, peers: PeerDirectory, *,
                 peer_timeout: float = 2.0, avoid_s: float = 30.0,
                 max_peer_connections: int = 2, mode: str = "mesh",
                 status_ttl: float = 0.5, status_window: int | None = None,
                 owner_timeout: float | None = None,
                 max_status_peers: int = 3,
                 owner_region: int = OWNER_REGION):
        if mode not in MODES:
            raise ValueError(f"image volume mode {mode!r}: expected one of "
                             f"{', '.join(MODES)}")
        if manifest.size != origin.size:
            raise ValueError(
                f"image {image!r}: the manifest says {manifest.size} bytes, "
                f"the origin {origin.describe()} has {origin.size}")
        self.origin = origin
        self.manifest = manifest
        self.image = image
        self.peers = peers
        self.mode = mode
        self.size = origin.size
        self.chunk_size = manifest.chunk_size
        self.peer_timeout = peer_timeout
        # An owner's answer may include its own fetch from the origin.
        self.owner_timeout = max(peer_timeout, 10.0) \
            if owner_timeout is None else owner_timeout
        self.avoid_s = avoid_s
        self.max_peer_connections = max(1, max_peer_connections)
        self.status_ttl = status_ttl
        # Peers asked which chunks they hold, per read: a random few. Asking
        # all of them made every host query every other (hosts² queries
        # per status_ttl); a chunk none of the few holds comes from its
        # owner (mesh), which has it or fetches it once for everyone.
        self.max_status_peers = max(1, max_status_peers)
        # A status query asks for this many chunks (default: 256 MiB of
        # the image, whatever the chunk size; and fits NBD's 32-bit
        # length).
        if status_window is None:
            status_window = STATUS_WINDOW_BYTES // self.chunk_size
        self.status_window = max(1, min(status_window,
                                        (1 << 30) // self.chunk_size))
        self.capabilities = blockdev.Capabilities(
            block_status=origin.capabilities.block_status)
        self._peers: dict[str, _Peer] = {}
        self._owner_table = OwnerTable(
            image, max(1, owner_region // self.chunk_size))
        # chunk -> number of reads of it going to the origin or to a peer
        # that holds it (see fetch_is_rooted).
        self._rooted: dict[int, int] = {}
        # chunk -> future of its bytes (a read-only memoryview, None if
        # its read failed), while a read of it is rooted, or (chunks this
        # host owns) from the start of any read of it: see landing().
        self._landing: dict[int, asyncio.Future] = {}
        # The manifest's digest table when it is fetched through peers too
        # (p2p/digest_table.py); closed with this volume.
        self.digest_table = None
        self._closed = False
        self.counters = {"reads": 0, "chunks_from_origin": 0,
                         "bytes_from_origin": 0, "chunks_from_peers": 0,
                         "bytes_from_peers": 0, "origin_mismatches": 0,
                         "status_queries": 0, "chunks_from_owners": 0,
                         "owner_fallbacks": 0}
        self.peer_errors = {k: 0 for k in ERROR_KINDS}
        # What is being read now, for reports of stalled reads
        # (reading_from): token -> (first chunk, end chunk, from where).
        self._reads_now: dict[int, tuple[int, int, str]] = {}
        self._read_token = 0
        # Where reads queue, per source: demand reads before prefetch
        # (p2p/priority.py).
        self.lanes = Lanes()
        # How long fetches take, by where they go (origin, owner, peer,
        # parent): from the queue to the checked data (fetch_latency()).
        self._latency: dict[str, _Latency] = {}

    # -- identity and status ------------------------------------------

    def identity(self) -> str:
        return self.origin.identity() or self.manifest.identity()

    def describe(self) -> str:
        return (f"image {self.image!r} ({self.mode}; origin "
                f"{self.origin.describe()})")

    def fetch_is_rooted(self, index: int) -> bool:
        """True while chunk ``index`` is being read from the origin or from
        a peer that holds it: a fetch peers may wait for."""
        return index in self._rooted

    def landing(self, index: int) -> asyncio.Future | None:
        """While chunk ``index`` is read here and peers may wait for it: a
        future of its bytes (None if that read failed), resolved as soon
        as the piece carrying the chunk is checked, not when the cache's
        whole fetch ends (which may wait for other hosts). PeerExport
        waits on this, so waits never form a cycle: a future exists for a
        rooted read (it waits for nobody), or for a chunk this host owns
        (never read from another owner; at most from a rooted read)."""
        return self._landing.get(index)

    def expect_owned(self, index: int) -> asyncio.Future | None:
        """For a chunk this host owns whose fetch has begun here but has
        not reached this volume yet (the cache's fetch task not started,
        or waiting for write slots): its landing() future now, resolved
        when the fetch's read of it is checked (None if it fails), as the
        read's own would be. None for a chunk owned elsewhere. PeerExport
        waits on it (bounded) instead of looking again every 5 ms."""
        if not self.owns(index):
            return None
        self._expect((index,))
        return self._landing[index]

    def owns(self, index: int) -> bool:
        """True when this host owns chunk ``index``: it fetches the chunk
        from the origin for the peers asking (PeerExport ``owns``)."""
        owners = self._owners()
        return owners is not None and owners[0] is not None \
            and self._owner_table.owner(owners[1], index) == owners[0]

    def reading_from(self, first: int, last: int
                     ) -> list[tuple[int, int, str]]:
        """The reads in progress here that bring chunks of [first, last):
        (first, end, where) each, where is "the origin", "peer URI",
        "owner URI" or "parent URI" (the wait includes the chunks'
        digests when the manifest is read lazily)."""
        return sorted((max(a, first), min(b, last), where)
                      for a, b, where in self._reads_now.values()
                      if a < last and first < b)

    def _reading(self, a: int, b: int, where: str) -> int:
        self._read_token += 1
        self._reads_now[self._read_token] = (a, b, where)
        return self._read_token

    def stats(self) -> dict:
        now = time.monotonic()
        return dict(
            self.counters, mode=self.mode, image=self.image,
            lanes=self.lanes.stats(), fetch_latency=self.fetch_latency(),
            peer_errors=dict(self.peer_errors),
            avoided=sorted(p.uri for p in self._peers.values()
                           if p.avoided(now)),
            peers={p.uri: dict(p.counters, connections=len(p.clients),
                               avoided=p.avoided(now))
                   for p in self._peers.values()})

    def fetch_latency(self) -> dict:
        """{where: {"fetches", "chunks", "seconds", "digest_wait_s",
        "mean_ms", "p50_ms", "p90_ms"}}
        of the fetches so far, where is origin, owner, peer or parent; a
        fetch is one read of consecutive chunks from one source, timed
        from its queue (lanes) to its checked data (an owner's own
        origin fetch included). Percentiles over the last
        _Latency.KEEP fetches."""
        return {k: v.summary() for k, v in sorted(self._latency.items())}

    def _timed(self, what: str, t0: float, chunks: int,
               digest_wait: float = 0.0) -> None:
        lat = self._latency.get(what)
        if lat is None:
            lat = self._latency[what] = _Latency()
        lat.add(time.monotonic() - t0, chunks, digest_wait)

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        return await self.origin.block_status(offset, length, context)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._abandon(list(self._landing))
        clients = [c for p in self._peers.values() for c in p.clients]
        for p in self._peers.values():
            p.clients = []
        await asyncio.gather(*(c.close(timeout=1.0) for c in clients),
                             return_exceptions=True)
        if self.digest_table is not None:
            await self.digest_table.close()
        await self.origin.close()

    # -- reads -----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, buf)
        return bytes(buf)

    async def read_into(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        length = view.nbytes
        self.check_range(offset, length)
        if length == 0:
            return
        if self._closed:
            raise blockdev.BlockError(errno.EIO, f"{self.describe()} is "
                                      "closed")
        self.counters["reads"] += 1
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs + 1
        start, stop = first * cs, min(last * cs, self.size)
        if self.mode == "mesh":
            # Peers asking for the chunks owned here wait for this read.
            owners = self._owners()
            if owners is not None and owners[0] is not None:
                me, keyed = owners
                owner = self._owner_table.owner
                self._expect(i for i in range(first, last)
                             if owner(keyed, i) == me)
        try:
            if start == offset and stop == offset + length:
                await self._read_chunks(first, last, view)
                return
            # Chunks are checked whole: read them whole, hand out the part.
            tmp = bytearray(stop - start)
            await self._read_chunks(first, last, memoryview(tmp))
        finally:
            # Delivered chunks were offered until now (the caller, the
            # cache, takes over); undelivered ones failed.
            self._abandon(range(first, last))
        view[:] = memoryview(tmp)[offset - start:offset - start + length]

    def _part(self, view: memoryview, first: int, a: int, b: int):
        """The piece of ``view`` (chunk ``first`` at its start) holding
        chunks [a, b)."""
        cs = self.chunk_size
        return view[(a - first) * cs:min(b * cs, self.size) - first * cs]

    async def _read_chunks(self, first: int, last: int,
                           view: memoryview) -> None:
        if self.mode == "tree":
            uris = self._peer_uris()
            parent = self._peer(uris[0]) if uris else None
            if parent is None or parent.avoided(time.monotonic()):
                await self._from_origin(first, last, view)
                return
            self._root(first, last, 1)
            self._expect(range(first, last))
            try:
                missing = await self._from_peer(parent, first, last, view,
                                                what="parent")
            finally:
                self._root(first, last, -1)
            for a, b in index_runs(missing):
                await self._from_origin(a, b, self._part(view, first, a, b))
            return
        await self._fill(first, last, view, frozenset(), True)

    # -- prefetch ----------------------------------------------------------

    def promote(self, first: int, last: int) -> int:
        """A guest now waits for chunks [first, last): prefetch reads of
        them still queued in a lane go at once (p2p/priority.py)."""
        return self.lanes.promote(first, last)

    async def prefetch_ready(self, first: int, last: int, *,
                             own: bool = True) -> list[bool]:
        """For each chunk of [first, last): may a prefetch read it now
        without making another host fetch it for us? True for the chunks
        this host owns (it reads them from the origin itself, behind its
        own demand reads), for those some owner already holds, and for
        every chunk outside mesh mode or without owners. False for a
        chunk another live owner neither holds nor has: that owner's own
        prefetch brings it (each chunk still leaves the origin about
        once, and at the owner it never goes before demand reads); ask
        again later. Uses the owners' block status (cached for
        ``status_ttl``). ``own`` False: the chunks this host owns are not
        ready either (the owners named now may be only those seen so far:
        a host that just joined would find its chunks fetched twice)."""
        ready = [True] * (last - first)
        if self.mode != "mesh" or first >= last:
            return ready
        owners = self._owners()
        if owners is None or owners[0] is None:
            return ready
        me, keyed = owners
        now = time.monotonic()
        table = self._owner_table
        by_owner: dict[str, list[int]] = {}
        for i in range(first, last):
            key = table.owner(keyed, i)
            uri = keyed.get(key)
            if key == me:
                ready[i - first] = own
                continue
            if uri is None or self._peer(uri).avoided(now):
                continue
            by_owner.setdefault(uri, []).append(i)
        if not by_owner:
            return ready
        uris = list(by_owner)
        answers = await asyncio.gather(*(
            self._status(self._peer(uri), first, last) for uri in uris))
        for uri, states in zip(uris, answers):
            for i in by_owner[uri]:
                ready[i - first] = states is not None \
                    and states[i - first] == HELD
        return ready

    # -- mesh ------------------------------------------------------------

    def _peer_uris(self) -> list[str]:
        try:
            return list(self.peers.peers_for(self.image))
        except Exception:
            # Membership trouble must not fail a read: the origin serves.
            LOG.exception("%s: cannot list peers; reading the origin",
                          self.describe())
            return []

    def _owners(self):
        """(self key or None, {key: uri or None}) of the image's owners,
        or None when the directory names none."""
        try:
            owners = list(self.peers.owners_for(self.image))
        except Exception:
            LOG.exception("%s: cannot list the owners; reading without",
                          self.describe())
            return None
        if not owners:
            return None
        keyed = dict(owners)
        me = next((k for k, uri in owners if uri is None), None)
        return me, keyed

    def _peer(self, uri: str) -> _Peer:
        peer = self._peers.get(uri)
        if peer is None:
            peer = self._peers[uri] = _Peer(uri)
        return peer

    async def _fill(self, first: int, last: int, view: memoryview,
                    tried: frozenset, first_try: bool) -> None:
        """Fill chunks [first, last) from holders (on the first try also
        from peers fetching them), else the origin; ``tried`` peers are
        not asked again."""
        now = time.monotonic()
        owners = None
        if first_try and self.mode == "mesh" and not serving_peer.get():
            owners = self._owners()
        peers = [p for p in map(self._peer, self._peer_uris())
                 if p not in tried and not p.avoided(now)]
        if len(peers) > self.max_status_peers:
            peers = random.sample(peers, self.max_status_peers)
        states = {}
        if peers and not self._owned_elsewhere(first, last, owners, now):
            answers = await asyncio.gather(
                *(self._status(p, first, last) for p in peers))
            states = {p: s for p, s in zip(peers, answers) if s is not None}
        pieces = self._plan(first, last, states, first_try, owners, now)
        results = await asyncio.gather(
            *(self._run_piece(peer, kind, a, b,
                              self._part(view, first, a, b), tried)
              for peer, kind, a, b in pieces), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _owned_elsewhere(self, first: int, last: int, owners,
                         now: float) -> bool:
        """True when every chunk of [first, last) is owned by another
        live peer. Such a read goes to the owners (they hold the chunks or
        fetch them once for everyone, and spread the load by themselves:
        each owns its share), so asking peers what they hold first would
        only add a round trip to it (measured: ~1.3 ms of the ~8 ms of a
        cold 8 KiB fetch in a boot storm). A failing owner still costs a
        retry through the holders."""
        if owners is None or owners[0] is None:
            return False
        me, keyed = owners
        table = self._owner_table
        step = table.region_chunks
        for region in range(first // step, (last - 1) // step + 1):
            key = table.owner(keyed, max(first, region * step))
            uri = keyed.get(key)
            if key == me or uri is None or self._peer(uri).avoided(now):
                return False
        return True

    def _plan(self, first: int, last: int, states: dict,
              first_try: bool, owners=None, now: float = 0.0) -> list:
        """(peer or None, kind, a, b) pieces covering [first, last)."""
        owner_peer = {}
        if owners is not None:
            me, keyed = owners
            for key, uri in keyed.items():
                if key != me and uri is not None:
                    peer = self._peer(uri)
                    if not peer.avoided(now):
                        owner_peer[key] = peer
        table = self._owner_table

        def holders(i):
            held = [p for p, s in states.items() if s[i - first] == HELD]
            if held or not first_try:
                return HELD, held
            fetching = [p for p, s in states.items()
                        if s[i - first] == FETCHING]
            if fetching or not owner_peer:
                return FETCHING, fetching
            # Nobody has it: its owner fetches it, unless that is us (or
            # an owner we avoid): then the origin.
            peer = owner_peer.get(table.owner(keyed, i))
            return (OWNER, [peer]) if peer is not None else (FETCHING, [])

        cs = self.chunk_size
        most = max(1, PEER_READ_MAX // cs)
        load = {p: p.load for p in states}
        pieces = []
        i = first
        while i < last:
            kind, who = holders(i)
            j = i + 1
            while j < last and holders(j) == (kind, who):
                j += 1
            if not who:
                pieces.append((None, MISSING, i, j))
                i = j
                continue
            # Split [i, j) evenly among its holders, least loaded first
            # (an owner may not be among the peers asked for status).
            for p in who:
                load.setdefault(p, p.load)
            who = sorted(who, key=lambda p: (load[p], random.random()))
            n = j - i
            parts = min(len(who), n)
            pos = i
            for k in range(parts):
                share = n // parts + (1 if k < n % parts else 0)
                peer = who[k]
                end = pos + share
                while pos < end:
                    b = min(end, pos + most)
                    pieces.append((peer, kind, pos, b))
                    load[peer] += (b - pos) * cs
                    pos = b
            i = j
        return pieces

    async def _run_piece(self, peer, kind, a, b, part, tried) -> None:
        if peer is None:
            await self._from_origin(a, b, part)
            return
        # Reads of held chunks are rooted; in-flight ones wait on a peer,
        # reads from an owner on its fetch (neither is offered to peers).
        rooted = kind == HELD
        if rooted:
            self._root(a, b, 1)
            self._expect(range(a, b))
        try:
            missing = await self._from_peer(
                peer, a, b, part,
                self.owner_timeout if kind == OWNER else self.peer_timeout,
                what="owner" if kind == OWNER else "peer")
        finally:
            if rooted:
                self._root(a, b, -1)
        if kind == OWNER:
            self.counters["chunks_from_owners"] += (b - a) - len(missing)
            self.counters["owner_fallbacks"] += len(missing)
        for m0, m1 in index_runs(missing):
            # Elsewhere: other holders, then the origin (never a peer's
            # fetch in flight: such a wait could chain).
            await self._fill(m0, m1, self._part(part, a, m0, m1),
                             tried | {peer}, False)

    def _expect(self, indices) -> None:
        """Chunks peers may now wait for (landing())."""
        landing = self._landing
        loop = None
        for i in indices:
            if i not in landing:
                loop = loop or asyncio.get_running_loop()
                landing[i] = loop.create_future()

    def _deliver(self, first: int, view: memoryview, indices) -> None:
        """Chunks ``indices`` of ``view`` (chunk ``first`` at its start)
        are checked: wake who waits for them."""
        for i in indices:
            future = self._landing.get(i)
            if future is not None and not future.done():
                future.set_result(
                    self._part(view, first, i, i + 1).toreadonly())

    def _abandon(self, indices) -> None:
        for i in indices:
            future = self._landing.pop(i, None)
            if future is not None and not future.done():
                future.set_result(None)

    def _root(self, a: int, b: int, delta: int) -> None:
        rooted = self._rooted
        for i in range(a, b):
            n = rooted.get(i, 0) + delta
            if n > 0:
                rooted[i] = n
            else:
                rooted.pop(i, None)

    # -- peer status -----------------------------------------------------

    async def _status(self, peer: _Peer, first: int, last: int):
        """Chunk states of [first, last) at ``peer`` (bytes), or None if
        it could not say (it is then avoided)."""
        w = self.status_window
        out = bytearray()
        for window in range(first // w, (last - 1) // w + 1):
            states = await self._window_status(peer, window)
            if states is None:
                return None
            lo = max(first, window * w) - window * w
            hi = min(last, (window + 1) * w) - window * w
            out += states[lo:hi]
        return bytes(out)

    async def _window_status(self, peer: _Peer, window: int):
        now = time.monotonic()
        cached = peer.status.get(window)
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = peer.status_pending.get(window)
        if pending is None:
            pending = asyncio.ensure_future(self._query_status(peer, window))
            peer.status_pending[window] = pending
            pending.add_done_callback(
                lambda f: peer.status_pending.pop(window, None))
        if cached is not None:
            # An expired answer is still safe to plan with (chunks never
            # leave a cache; one reported missing is read from its owner,
            # a claim that went stale costs a retry): use it now, and the
            # fresh one, on its way, serves the next reads. Only a peer
            # never asked about the window makes a read wait for it.
            return cached[1]
        return await asyncio.shield(pending)

    async def _query_status(self, peer: _Peer, window: int):
        cs, w = self.chunk_size, self.status_window
        first = window * w
        last = min(first + w, self.manifest.chunks)
        offset, length = first * cs, min(last * cs, self.size) - first * cs
        self.counters["status_queries"] += 1
        peer.counters["status_queries"] += 1
        try:
            extents = await asyncio.wait_for(
                self._ask_status(peer, offset, length), self.peer_timeout)
        except asyncio.TimeoutError:
            peer.drop()
            self._peer_failed(peer, "timeout", "block status timed out "
                              f"after {self.peer_timeout} s")
            return None
        except _PEER_ERRORS as exc:
            self._peer_failed(peer, _kind(exc), f"block status: {exc}")
            return None
        states = bytearray(last - first)      # unreported chunks: MISSING
        pos = offset
        for ext in extents:
            end = min(pos + ext.length, offset + length)
            if ext.flags & blockdev.STATE_CACHED:
                state = FETCHING if ext.flags & blockdev.STATE_FETCHING \
                    else HELD
                # Chunks whose start lies in the extent.
                for i in range(-(-pos // cs), (end - 1) // cs + 1):
                    if first <= i < last:
                        states[i - first] = state
            pos = end
            if pos >= offset + length:
                break
        states = bytes(states)
        peer.status[window] = (time.monotonic() + self.status_ttl, states)
        return states

    async def _ask_status(self, peer: _Peer, offset: int, length: int):
        """The peer's extents of [offset, offset + length). A server may
        describe less than asked (ours: BLOCK_STATUS_MAX, 64 MiB, per
        reply; a window is 256 MiB): ask again from where each answer
        ends, else the rest would count as missing there."""
        client = await peer.client(self.size, self.peer_timeout,
                                   self.max_peer_connections)
        extents: list[blockdev.Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            got = await client.block_status(pos, end - pos,
                                            blockdev.VMTHUNDER_CACHE)
            described = sum(e.length for e in got)
            if described <= 0:
                break               # the rest stays "missing": safe
            extents += got
            pos += described
        return extents

    # -- peer reads ------------------------------------------------------

    async def _from_peer(self, peer: _Peer, a: int, b: int,
                         part: memoryview,
                         timeout: float | None = None,
                         what: str = "peer") -> list[int]:
        """Read chunks [a, b) from ``peer`` (a ``what``: peer, owner or
        parent) into ``part``; the chunks still missing (all if the read
        failed, the wrong ones otherwise)."""
        t0 = time.monotonic()
        lane = self.lanes.lane(peer.uri)
        kind = await lane.enter(a, b)
        token = self._reading(a, b, f"{what} {peer.uri}")
        waits: list[float] = []
        try:
            missing = await self._read_peer(peer, a, b, part, timeout,
                                            waits)
        finally:
            del self._reads_now[token]
            lane.leave(kind)
        if not missing:
            self._timed(what, t0, b - a, sum(waits))
        return missing

    async def _read_peer(self, peer: _Peer, a: int, b: int,
                         part: memoryview,
                         timeout: float | None = None,
                         waits: list | None = None) -> list[int]:
        cs = self.chunk_size
        nbytes = part.nbytes
        timeout = self.peer_timeout if timeout is None else timeout
        peer.load += nbytes
        loading = self._load_digests(a, b)
        try:
            await asyncio.wait_for(self._peer_read(peer, a * cs, part),
                                   timeout)
        except asyncio.TimeoutError:
            peer.drop()            # a hung peer: drop every connection
            self._peer_failed(peer, "timeout", f"read of chunks "
                              f"{_span(a, b)} timed out after "
                              f"{timeout} s")
            return list(range(a, b))
        except _PEER_ERRORS as exc:
            self._peer_failed(peer, _kind(exc), f"read of chunks "
                              f"{_span(a, b)}: {exc}")
            return list(range(a, b))
        finally:
            peer.load -= nbytes
        t_data = time.monotonic()
        await loading
        if waits is not None:
            waits.append(time.monotonic() - t_data)
        bad = await self._verify(a, part)
        self._deliver(a, part, (i for i in range(a, b) if i not in bad))
        if bad:
            self._peer_failed(peer, "mismatch", f"chunks {bad} do "
                              "not match the manifest", count=len(bad))
        got = (b - a) - len(bad)
        got_bytes = nbytes - sum(self.manifest.chunk_range(i)[1]
                                 for i in bad)
        self.counters["chunks_from_peers"] += got
        self.counters["bytes_from_peers"] += got_bytes
        peer.counters["chunks"] += got
        peer.counters["bytes"] += got_bytes
        return bad

    async def _peer_read(self, peer: _Peer, offset: int,
                         part: memoryview) -> None:
        client = await peer.client(self.size, self.peer_timeout,
                                   self.max_peer_connections)
        step = min(PEER_READ_MAX, client.max_request)
        step = max(step - step % client.min_block, client.min_block)
        try:
            results = await asyncio.gather(*(
                client.read_into(offset + pos, part[pos:pos + step])
                for pos in range(0, part.nbytes, step)),
                return_exceptions=True)
        except BaseException:
            # Cancelled (timed out): a reply still on its way would land
            # in ``part``, which the next source fills. Drop the link.
            peer.drop(client)
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _peer_failed(self, peer: _Peer, kind: str, why: str,
                     count: int = 1) -> None:
        self.peer_errors[kind] += count
        peer.counters[kind] += count
        if kind == "not_held":
            # Its status was stale: ask again next time, no penalty.
            peer.forget_status()
            LOG.debug("%s: peer %s: %s", self.describe(), peer.uri, why)
            return
        peer.avoid_until = time.monotonic() + self.avoid_s
        peer.forget_status()
        LOG.warning("%s: peer %s: %s; avoiding it for %g s",
                    self.describe(), peer.uri, why, self.avoid_s)

    # -- origin ------------------------------------------------------------

    async def _from_origin(self, a: int, b: int, part: memoryview) -> None:
        t0 = time.monotonic()
        lane = self.lanes.lane("origin")
        kind = await lane.enter(a, b)
        token = self._reading(a, b, "the origin")
        waits: list[float] = []
        try:
            await self._read_origin(a, b, part, waits)
        finally:
            del self._reads_now[token]
            lane.leave(kind)
        self._timed("origin", t0, b - a, sum(waits))

    async def _read_origin(self, a: int, b: int, part: memoryview,
                           waits: list | None = None) -> None:
        cs = self.chunk_size
        self._root(a, b, 1)
        self._expect(range(a, b))
        loading = self._load_digests(a, b, from_origin=True)
        try:
            await self.origin.read_into(a * cs, part)
            t_data = time.monotonic()
            await loading
            if waits is not None:
                waits.append(time.monotonic() - t_data)
            bad = await self._verify(a, part)
            for i in bad:
                self.counters["origin_mismatches"] += 1
                LOG.warning("%s: chunk %d from the origin does not match "
                            "the manifest; reading it again",
                            self.describe(), i)
                piece = self._part(part, a, i, i + 1)
                await self.origin.read_into(i * cs, piece)
                if await self._verify(i, piece):
                    self.counters["origin_mismatches"] += 1
                    raise blockdev.BlockError(
                        errno.EIO, f"image {self.image!r}: chunk {i} "
                        f"(offset {i * cs}) from the origin "
                        f"{self.origin.describe()} does not match the "
                        "manifest (read twice)")
            self._deliver(a, part, range(a, b))
        finally:
            self._root(a, b, -1)
        self.counters["chunks_from_origin"] += b - a
        self.counters["bytes_from_origin"] += part.nbytes

    def _load_digests(self, a: int, b: int, from_origin: bool = False
                      ) -> asyncio.Future:
        """Load the manifest digests of chunks [a, b) while their data
        comes (a lazily read manifest); await it before _verify. A failed
        load is the read's error; if the read fails first, nobody asks.
        ``from_origin``: the data comes from the origin, and so do they
        (no round trips through the table's own peers on the path of a
        boot's first fetches; owners read the origin, and a piece of the
        table covers one owner region)."""
        # Digests are loaded at demand priority, whoever asks first: a
        # guest's read may join a prefetch's load of the same page.
        token = priority.set(DEMAND)
        try:
            loading = asyncio.ensure_future(
                self.manifest.load(a, b, from_origin=from_origin))
        finally:
            priority.reset(token)
        if from_origin and self.digest_table is not None:
            self.digest_table.keep(a, b)
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())
        return loading

    async def _verify(self, first: int, view: memoryview) -> list[int]:
        """Chunks of ``view`` (chunk ``first`` at its start) that do not
        match the manifest. Callers have awaited _load_digests for them
        (an unloaded digest fails the check, never passes it)."""
        return sorted(await aio.run_hashing(functools.partial(
            self.manifest.verify_run, first, view), self.chunk_size))


class _Latency:
    """Durations of one kind of fetch: count and sum of all, the last
    KEEP for percentiles."""

    KEEP = 4096
    __slots__ = ("fetches", "chunks", "seconds", "digest_wait", "recent")

    def __init__(self):
        self.fetches = self.chunks = 0
        self.seconds = self.digest_wait = 0.0
        self.recent: collections.deque = collections.deque(maxlen=self.KEEP)

    def add(self, seconds: float, chunks: int,
            digest_wait: float = 0.0) -> None:
        self.fetches += 1
        self.chunks += chunks
        self.seconds += seconds
        self.digest_wait += digest_wait
        self.recent.append(seconds)

    def summary(self) -> dict:
        recent = sorted(self.recent)

        def pct(q: float) -> float | None:
            if not recent:
                return None
            return round(recent[min(len(recent) - 1,
                                    int(q * len(recent)))] * 1e3, 3)
        return {"fetches": self.fetches, "chunks": self.chunks,
                "seconds": round(self.seconds, 6),
                # Of those: waiting, data there, for the chunks' digests
                # (a lazily read manifest's table).
                "digest_wait_s": round(self.digest_wait, 6),
                "mean_ms": round(self.seconds / self.fetches * 1e3, 3)
                if self.fetches else None,
                "p50_ms": pct(0.5), "p90_ms": pct(0.9)}


def _kind(exc: Exception) -> str:
    err = getattr(exc, "errno", None)
    if err == errno.ENOTSUP:
        return "not_held"
    if err == errno.ETIMEDOUT:
        return "timeout"
    return "io"



def _span(a: int, b: int) -> str:
    """Chunks [a, b) for messages."""
    return str(a) if b == a + 1 else f"{a}-{b - 1}"
