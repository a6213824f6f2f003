"""The host's cache capacity: ``[cache] max_bytes``, its watermarks,
eviction, pins (issue 17, item 1; the rule in docs/design.md, "Cache
capacity").

What counts: the blocks the image caches hold on disk (st_blocks of each
cache directory's ``data`` file under the cache directory, attached or
not). VMs' overlays (their own writes) are not cache and do not count.

- A fetched chunk is kept only if it fits under ``max_bytes``; otherwise
  it is served and not kept (CacheLayer.space: reserve/stored). So the
  cap holds, whatever the VMs read.
- Above the high watermark (or when a chunk was not kept), chunks are
  evicted down to the low one:
  first the images no VM uses (attached with no VM and no precache
  running, or only on disk), least recently used first, whole; then, if
  that is not enough, chunks of idle images (VMs, none of which read for
  ``idle_seconds``) that none of their VMs ever read (precached,
  prefetched, fetched for peers).
- Never evicted: a pinned image; an image a VM read in the last
  ``idle_seconds``; a chunk a VM of the image read (since the agent
  started; what an image held when the agent started with its VMs
  counts as read).

Each eviction is CacheLayer.evict (marks cleared and durable, then the
data punched out) or, for a cache directory no one has open, its map
removed (durable) before its data. Evictions run under the agent's lock,
as attach and detach do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import time

from vmthunder.agent.errors import (
    AgentFailure, Conflict, InvalidRequest, NotFound)
from vmthunder.cache.read_watch import VmReads
from vmthunder.redaction import redact_url

LOG = logging.getLogger(__name__)

_KEY = re.compile(r"^[0-9a-f]{24}$")
_HELD_RUNS = re.compile(rb"\x01+")
# How often a used image's last use is written to its cache directory
# (meta.json's mtime: the LRU order survives restarts and detaches).
TOUCH_EVERY_S = 60.0
# Counted with each write to a cache file: a block the file system may
# add for its own use (an extent tree's), counted in st_blocks too. An
# overcount until the next measure, so that the cap holds.
FS_BLOCK = 4096


@dataclasses.dataclass
class CapacityConfig:
    """The [cache] capacity options."""

    max_bytes: int = 0              # 0: no cap
    high_watermark: int = 90        # percent of max_bytes
    low_watermark: int = 80
    idle_seconds: float = 600.0
    check_interval: float = 1.0

    @classmethod
    def from_conf(cls, conf_cache) -> "CapacityConfig":
        config = cls(max_bytes=conf_cache.max_bytes,
                     high_watermark=conf_cache.high_watermark,
                     low_watermark=conf_cache.low_watermark,
                     idle_seconds=conf_cache.idle_seconds)
        config.check()
        return config

    def check(self) -> None:
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"[cache] low_watermark {self.low_watermark} is above "
                f"high_watermark {self.high_watermark}: eviction starts "
                "above the high one and stops at the low one; set low <= "
                "high")

    @property
    def high_bytes(self) -> int:
        return self.max_bytes * self.high_watermark // 100

    @property
    def low_bytes(self) -> int:
        return self.max_bytes * self.low_watermark // 100


class NeedWatch(VmReads):
    """A VM's read watch that also records which chunks of its image's
    cache the VM read (``needed``: one byte per chunk): those an idle
    image keeps. Used only with a cap: it costs 0.25-0.3 us per guest
    read (in process, 20 000 warm random 4 KiB reads through snapshot
    and cache, best of 15: 4.19 -> 4.44 us a read), about 1 % of a
    read's server time over NBD."""

    __slots__ = ("_needed", "_ncs", "_nlen")

    def __init__(self, vm, reads, snapshot, needed: bytearray,
                 chunk_size: int):
        super().__init__(vm, reads, snapshot)
        self._needed = needed
        self._ncs = chunk_size
        self._nlen = len(needed)

    def _mark(self, offset: int, length: int) -> None:
        cs = self._ncs
        a = offset // cs
        b = min((offset + length - 1) // cs + 1, self._nlen)
        if a < b:
            self._needed[a:b] = b"\x01" * (b - a)

    def begin(self, offset: int, length: int,
              _begin=VmReads.begin) -> int:
        # Inlined (every guest read): most reads are within one chunk.
        cs = self._ncs
        a = offset // cs
        if a == (offset + length - 1) // cs:
            if a < self._nlen:
                self._needed[a] = 1
        elif length:
            self._mark(offset, length)
        return _begin(self, offset, length)

    def instant(self, offset: int = 0, length: int = 0) -> None:
        if length:
            self._mark(offset, length)
        VmReads.instant(self, offset, length)


@dataclasses.dataclass
class Entry:
    """One cache directory, as `vmthunder cache list` shows it."""

    key: str
    directory: str
    held_bytes: int
    last_use: float
    name: str | None = None         # the attached image's
    vms: list = dataclasses.field(default_factory=list)
    pinned: bool = False
    state: str = "on disk"          # in use, idle, unused, on disk, busy
    identity: str = ""

    def view(self) -> dict:
        return {"image": self.name, "key": self.key,
                "directory": self.directory, "held_bytes": self.held_bytes,
                "last_use": self.last_use, "vms": self.vms,
                "pinned": self.pinned, "state": self.state,
                "identity": redact_url(self.identity)}


class Capacity:
    """The cap, the accounting (CacheLayer.space) and the evictions of
    one agent's cache directory."""

    def __init__(self, agent, config: CapacityConfig, directory: str):
        self.agent = agent
        self.config = config
        self.directory = directory
        # Bytes on disk at the last measure, written since, and reserved
        # for writes in progress (held = their sum). A measure is taken
        # as the account only while no reserved write is in progress (it
        # could be on disk and reserved at once).
        self.disk_bytes = 0
        self.written = 0
        self.pending = 0
        self.counters = {"evicted_images": 0, "evicted_chunks": 0,
                         "evicted_bytes": 0, "not_kept_bytes": 0}
        # Per image name: the chunks its VMs read, the last time a VM
        # read it (wall clock) and the reads seen at the last check.
        self.needed: dict[str, bytearray] = {}
        self.last_use: dict[str, float] = {}
        self._reads_seen: dict[str, int] = {}
        self._touched: dict[str, float] = {}
        # Images with VMs in the state file, while the agent restores.
        self.restoring: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._full = False          # above the high watermark, stuck
        self._pressure = False      # a chunk was not kept since a shrink

    # -- the space interface of CacheLayer ---------------------------------

    @property
    def held_bytes(self) -> int:
        return self.disk_bytes + self.written + self.pending

    def reserve(self, cache, nbytes: int) -> bool:
        if not self.config.max_bytes:
            return True
        if self.held_bytes + nbytes + FS_BLOCK > self.config.max_bytes:
            self.counters["not_kept_bytes"] += nbytes
            # Below the high watermark too (a long run that does not
            # fit): make room.
            self._pressure = True
            self._wake.set()
            return False
        self.pending += nbytes + FS_BLOCK
        if self.held_bytes > self.config.high_bytes:
            self._wake.set()
        return True

    def stored(self, cache, nbytes: int) -> None:
        if self.config.max_bytes:
            self.pending -= nbytes + FS_BLOCK
            self.written += nbytes + FS_BLOCK

    # -- images ------------------------------------------------------------

    def attached(self, image) -> None:
        """An image's cache was opened (attach, restore)."""
        cache = image.cache
        cache.space = self
        name = image.name
        has_vms = name in self.restoring or any(
            vm.image == name for vm in self.agent.vms.values())
        if name not in self.needed or len(self.needed[name]) != cache.chunks:
            # After a restart with VMs, what the cache holds counts as
            # read by them (what they read before is not known).
            self.needed[name] = (cache.map.states(0, cache.chunks)
                                 if has_vms else bytearray(cache.chunks))
        try:
            self.last_use[name] = os.stat(
                os.path.join(cache.directory, "meta.json")).st_mtime
        except OSError:
            self.last_use[name] = time.time()
        self._reads_seen.pop(name, None)

    def detached(self, name: str) -> None:
        for table in (self.needed, self.last_use, self._reads_seen,
                      self._touched):
            table.pop(name, None)

    def watch(self, vm: str, image, snapshot) -> VmReads:
        """The read watch of a VM's snapshot (read_watch.VmReads); a new
        VM is a use of its image."""
        self.last_use[image.name] = time.time()
        needed = self.needed.get(image.name)
        if not self.config.max_bytes or needed is None:
            return VmReads(vm, image.reads, snapshot)
        return NeedWatch(vm, image.reads, snapshot, needed,
                         image.cache.chunk_size)

    # -- the loop ----------------------------------------------------------

    def start(self) -> None:
        self.restoring = set()
        self.measure()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            # An eviction cancelled midway is safe: its marks are cleared
            # durably before any punch, and CacheLayer.evict returns only
            # once its worker threads are done with the file.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.config.check_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self._note_use()
                self.measure()
                if self.config.max_bytes and (
                        self._pressure
                        or self.held_bytes > self.config.high_bytes):
                    await self.shrink(self.config.low_bytes)
                    # A chunk not kept makes room down to the low
                    # watermark, as soon as something may go.
                    self._pressure = \
                        self.held_bytes > self.config.low_bytes
                    if self._pressure:
                        # Only caches in use or pinned left: look again
                        # in a while, not at every chunk not kept.
                        await asyncio.sleep(self.config.check_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                LOG.exception("cache capacity check failed; retrying")

    def _note_use(self) -> None:
        """Which images' VMs read since the last check (last use now)."""
        now = time.time()
        for name, image in self.agent.images.items():
            reads = image.reads
            seen = reads.hits + reads.misses + len(reads.pending)
            # A VM's read, or a precache: the image is wanted.
            if self._reads_seen.get(name, seen) != seen or reads.pending \
                    or _precaching(image):
                self.last_use[name] = now
                if now - self._touched.get(name, 0) > TOUCH_EVERY_S \
                        and image.cache is not None:
                    self._touched[name] = now
                    try:
                        os.utime(os.path.join(image.cache.directory,
                                              "meta.json"))
                    except OSError:
                        pass
            self._reads_seen[name] = seen

    def measure(self) -> int:
        """Re-count the bytes held on disk (st_blocks); the count."""
        total = sum(entry[2] for entry in self._directories())
        if not self.pending:
            self.disk_bytes, self.written = total, 0
        return total

    def _freed(self, before: int) -> int:
        """Bytes freed since a measure of ``before``, taken off the
        account."""
        freed = max(0, before - sum(e[2] for e in self._directories()))
        self.disk_bytes = max(0, self.disk_bytes - freed)
        self.measure()
        return freed

    def _open_caches(self) -> dict:
        """{cache directory: (image, cache)} of the caches open here
        (images' and their digest tables')."""
        opened = {}
        for image in self.agent.images.values():
            if image.cache is not None:
                opened[image.cache.directory] = (image, image.cache)
            table = getattr(image.volume, "digest_table", None) \
                if image.volume is not None else None
            cache = getattr(table, "cache", None)
            if cache is not None:
                opened[cache.directory] = (None, cache)
        return opened

    def _directories(self):
        """(key, directory, bytes on disk, open (image, cache) or None)
        of each cache directory."""
        opened = self._open_caches()
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        out = []
        for key in names:
            directory = os.path.join(self.directory, key)
            if not _KEY.match(key) or not os.path.isdir(directory):
                continue
            held = opened.get(directory)
            try:
                if held is not None:
                    size = held[1].allocated_bytes()
                else:
                    size = os.stat(os.path.join(directory,
                                                "data")).st_blocks * 512
            except OSError:
                size = 0
            out.append((key, directory, size, held))
        return out

    # -- what is held ------------------------------------------------------

    def entries(self) -> list[Entry]:
        now = time.time()
        vms_of: dict[str, list] = {}
        for vm in self.agent.vms.values():
            vms_of.setdefault(vm.image, []).append(vm.name)
        # Pinned images not attached now (origin down since a restart):
        # their caches stay pinned.
        pinned_on_disk = {i.cache_dir: i.name
                          for i in self.agent.images.values()
                          if i.pinned and i.cache is None and i.cache_dir}
        out = []
        for key, directory, size, held in self._directories():
            meta = _meta(directory)
            entry = Entry(key, directory, size,
                          meta.get("mtime", 0.0),
                          identity=meta.get("identity", ""))
            if held is None and directory in pinned_on_disk:
                entry.name = pinned_on_disk[directory]
                entry.pinned = True
            elif held is not None and held[0] is None:
                entry.state = "busy"            # a digest table
                entry.name = None
            elif held is not None:
                image = held[0]
                entry.name = image.name
                entry.vms = sorted(vms_of.get(image.name, []))
                entry.pinned = image.pinned
                entry.last_use = self.last_use.get(image.name,
                                                   entry.last_use)
                if _precaching(image):
                    entry.state = "in use"
                elif entry.vms:
                    idle = now - entry.last_use >= self.config.idle_seconds
                    entry.state = "idle" if idle else "in use"
                else:
                    entry.state = "unused"
            out.append(entry)
        return out

    def summary(self) -> dict:
        """For `vmthunder status` (and the metrics)."""
        self.measure()
        config = self.config
        return {"max_bytes": config.max_bytes,
                "high_watermark_bytes": config.high_bytes,
                "low_watermark_bytes": config.low_bytes,
                "held_bytes": self.held_bytes,
                **self.counters}

    def listing(self) -> dict:
        """GET /cache."""
        return dict(self.summary(),
                    idle_seconds=self.config.idle_seconds,
                    caches=[e.view() for e in self.entries()])

    # -- eviction ----------------------------------------------------------

    async def shrink(self, target: int) -> None:
        """Evict until at most ``target`` bytes are held (or nothing more
        may go)."""
        entries = self.entries()
        for entry in sorted((e for e in entries
                             if _evictable(e) and e.held_bytes),
                            key=lambda e: e.last_use):
            if self.held_bytes <= target:
                return
            await self._evict_entry(entry, reason="above the high "
                                    "watermark")
        for entry in sorted((e for e in entries if e.state == "idle"
                             and not e.pinned and e.held_bytes),
                            key=lambda e: e.last_use):
            if self.held_bytes <= target:
                return
            await self._evict_unneeded(entry.name)
        full = self.held_bytes > self.config.high_bytes
        if full and not self._full:
            LOG.warning("the caches hold %d bytes, above the high "
                        "watermark (%d of [cache] max_bytes %d), and the "
                        "rest is in use or pinned: chunks that do not fit "
                        "are served, not kept", self.held_bytes,
                        self.config.high_bytes, self.config.max_bytes)
        self._full = full

    async def _evict_entry(self, entry: Entry, reason: str) -> int:
        """Evict one cache whole; bytes freed."""
        async with self.agent._lock:
            before = self.measure()
            if entry.name is not None:
                image = self.agent.images.get(entry.name)
                if image is None or image.cache is None \
                        or image.cache.directory != entry.directory:
                    return 0
                # Checked again under the lock: a VM may have come.
                if any(v.image == entry.name
                       for v in self.agent.vms.values()) \
                        or image.pinned or _precaching(image):
                    return 0
                chunks = await image.cache.evict()
            else:
                chunks = _evict_directory(entry.directory)
                if chunks is None:
                    return 0
            freed = self._freed(before)
        self.counters["evicted_images"] += 1
        self.counters["evicted_chunks"] += chunks
        self.counters["evicted_bytes"] += freed
        LOG.info("cache of %s evicted (%s): %d bytes freed, last used %s",
                 entry.name or f"{entry.key} (not attached)", reason, freed,
                 time.strftime("%Y-%m-%d %H:%M:%S",
                               time.localtime(entry.last_use)))
        return freed

    async def _evict_unneeded(self, name: str) -> int:
        """Evict the chunks of idle image ``name`` its VMs never read."""
        async with self.agent._lock:
            image = self.agent.images.get(name)
            needed = self.needed.get(name)
            if image is None or image.cache is None or image.pinned \
                    or needed is None:
                return 0
            cache = image.cache
            held = cache.map.states(0, cache.chunks)
            spare = (int.from_bytes(held, "little")
                     & ~int.from_bytes(needed, "little"))
            spare = spare.to_bytes(cache.chunks, "little")
            runs = [(m.start(), m.end()) for m in _HELD_RUNS.finditer(spare)]
            if not runs:
                return 0
            before = self.measure()
            chunks = await cache.evict(runs)
            freed = self._freed(before)
        self.counters["evicted_chunks"] += chunks
        self.counters["evicted_bytes"] += freed
        LOG.info("image %s (idle): %d chunks no VM of it read evicted, %d "
                 "bytes freed", name, chunks, freed)
        return freed

    async def evict(self, image: str | None = None,
                    all_unused: bool = False) -> dict:
        """POST /cache/evict: image ``image`` (a name, or the key of a
        cache directory not attached), or every unused one."""
        if (image is None) == (not all_unused):
            raise InvalidRequest(
                'give either "image": NAME (or a cache key from `vmthunder '
                'cache list`) or "all_unused": true')
        entries = self.entries()
        if all_unused:
            victims = [e for e in entries if _evictable(e)]
        else:
            victims = [e for e in entries
                       if e.name == image or (e.name is None
                                              and e.key == image)]
            if not victims:
                raise NotFound(
                    f"no cache of image {image!r}: `vmthunder cache list` "
                    "shows the caches (attached images by name, others by "
                    "key)")
            entry = victims[0]
            if entry.pinned:
                raise Conflict(
                    f"image {image!r} is pinned; unpin it first "
                    f"(`vmthunder image unpin {image}`)")
            if entry.vms:
                raise Conflict(
                    f"image {image!r} is used by VM(s) "
                    f"{', '.join(entry.vms)}: its chunks stay while they "
                    "run; delete them first")
            if entry.state in ("in use", "busy"):
                raise Conflict(
                    f"the cache of {image!r} is in use ("
                    + ("a precache is running" if entry.name else
                       "open by this agent") + "); try again later")
        done = []
        for entry in victims:
            freed = await self._evict_entry(entry, reason="asked")
            done.append({"image": entry.name, "key": entry.key,
                         "freed_bytes": freed})
        return {"evicted": done, "held_bytes": self.held_bytes}


    async def pin(self, name, pinned: bool) -> dict:
        """POST/DELETE /images/NAME/pin: a pinned image is never evicted
        (recorded in the state file)."""
        async with self.agent._lock:
            image = self.agent.images.get(name)
            if image is None:
                raise NotFound(f"no image {name!r} is attached; GET /images "
                               "(`vmthunder image list`) lists them")
            if image.pinned != pinned:
                image.pinned = pinned
                try:
                    self.agent._save()
                except OSError as exc:
                    image.pinned = not pinned
                    raise AgentFailure(
                        f"cannot record the {'pin' if pinned else 'unpin'} "
                        f"of image {name!r} in {self.agent.store.path}: "
                        f"{exc}") from None
                LOG.info("image %s %s", name,
                         "pinned: never evicted" if pinned else "unpinned")
        return {"name": name, "pinned": pinned}


def _evictable(entry: Entry) -> bool:
    return entry.state in ("unused", "on disk") and not entry.pinned


def _precaching(image) -> bool:
    return image.precache is not None and image.precache.running


def _meta(directory: str) -> dict:
    path = os.path.join(directory, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        meta = meta if isinstance(meta, dict) else {}
        meta["mtime"] = os.stat(path).st_mtime
        return meta
    except (OSError, ValueError):
        return {}


def _evict_directory(directory: str) -> int | None:
    """Evict the cache in ``directory`` that no one here has open: its
    map goes first, durably, then its data (a crash between leaves data
    without marks: refetched). None when another process holds it;
    else the chunks it had marked."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info("cache %s is open in another process; not evicted",
                     directory)
            return None
        marked = 0
        try:
            with open(os.path.join(directory, "map"), "rb") as f:
                marked = f.read().count(1)
        except FileNotFoundError:
            pass
        for name in ("map", "data", "meta.json"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
            if name == "map":
                os.fsync(fd)            # no mark left, durably, first
        for sub in ("snapshots", ""):
            try:
                os.rmdir(os.path.join(directory, sub))
            except OSError as exc:      # VMs' files left: keep it
                if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT,
                                     errno.EEXIST):
                    raise
        return marked
    finally:
        os.close(fd)
