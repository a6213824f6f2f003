"""Is this agent well? ``/healthz`` (on the API socket and the metrics
listener), and the watchdog that finds stalled guest reads.

Health is 200 when every check passes, else 503 naming what is wrong:

- the agent answers (the event loop runs: it is the one answering);
- every attached image's origin is reachable: a file origin still exists
  and is readable (the agent reads it through an open descriptor, but a
  restart would not find it), an iSCSI or export origin's portal accepts
  a TCP connection (one of the [iscsi] portals will do). Checked at most
  every ORIGIN_CHECK_TTL seconds per origin, each check bounded by
  ORIGIN_CHECK_TIMEOUT; an image recorded but not attached (its origin
  failed at restore) is a problem too;
- with peers in mesh mode, the coordination backend answered the last
  heartbeat (Membership.healthy: no I/O here);
- the cache and state directories' file systems have at least
  ``[agent] health_min_free_mib`` free.

Stalled reads: a guest read waiting ``[agent] stalled_read_seconds`` or
longer is logged once, with what it waits for (the origin, a peer, an
owner, a parent, or a fetch still queued, and which chunks), and counted
(``stalled_reads`` in the image's status, vmthunder_stalled_reads_total);
its end is logged too (vmthunder/cache/read_watch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
import urllib.parse

from vmthunder import stack
from vmthunder.cache.cache_layer import FETCHING, HELD
from vmthunder.cache.chunkmap import index_runs
from vmthunder.redaction import redact_url

LOG = logging.getLogger(__name__)

ORIGIN_CHECK_TTL = 5.0
ORIGIN_CHECK_TIMEOUT = 2.0
MiB = 1024 * 1024


def _chunks(a: int, b: int) -> str:
    return f"chunk {a}" if b == a + 1 else f"chunks {a}-{b - 1}"


def waiting_for(image, offset: int, length: int) -> str:
    """What a guest read of [offset, offset + length) of ``image`` (an
    agent Image) waits for, in words."""
    cache = image.cache
    if cache is None:
        return "its image's cache, which is closed"
    end = min(offset + length, cache.size)
    if offset >= end:
        return "nothing below its disk (zeros past the image)"
    cs = cache.chunk_size
    first, last = offset // cs, (end - 1) // cs + 1
    states = cache.chunk_states(first, last)
    fetching = [i for i, s in enumerate(states, first) if s == FETCHING]
    missing = [i for i, s in enumerate(states, first)
               if s not in (FETCHING, HELD)]
    parts = []
    if fetching:
        volume = image.volume
        covered: set[int] = set()
        if volume is not None:
            for a, b, where in volume.reading_from(fetching[0],
                                                   fetching[-1] + 1):
                if where == "the origin":
                    where = f"the origin ({volume.origin.describe()})"
                parts.append(f"{_chunks(a, b)} from {where}")
                covered.update(range(a, b))
            rest = [i for i in fetching if i not in covered]
            for a, b in index_runs(rest):
                parts.append(f"{_chunks(a, b)}: fetch queued (waiting for "
                             "memory for fetched chunks, or for digests)")
        else:
            for a, b in index_runs(fetching):
                parts.append(f"{_chunks(a, b)} from the origin "
                             f"({cache.source.describe()})")
    for a, b in index_runs(missing):
        parts.append(f"{_chunks(a, b)}: not held and no fetch yet")
    if not parts:
        parts.append(f"{_chunks(first, last)} held: the local disk (cache "
                     f"file {cache.directory}/data or the VM's overlay)")
    return "; ".join(parts)


class StallWatch:
    """Every so often, looks at the guest reads in progress of every image
    and reports (once each) those waiting ``threshold`` seconds or more.
    ``threshold`` 0: off."""

    def __init__(self, images: dict, threshold: float):
        self.images = images            # the agent's {name: Image}
        self.threshold = threshold
        self._task: asyncio.Task | None = None

    @property
    def period(self) -> float:
        return min(1.0, max(0.05, self.threshold / 4))

    def start(self) -> None:
        if self.threshold > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                self.check()
            except Exception:         # never let the watchdog die
                LOG.exception("stalled-read check failed")

    def check(self, now: float | None = None) -> int:
        """Report the newly stalled reads; how many there were."""
        now = time.monotonic() if now is None else now
        found = 0
        for image in list(self.images.values()):
            reads = image.reads
            for pending in reads.stalled_now(self.threshold, now):
                if pending.reported:
                    continue
                reads.report(pending)
                found += 1
                LOG.warning(
                    "stalled read: VM %s (image %s) has waited %.1f s for "
                    "%d bytes at offset %d: %s", pending.vm, image.name,
                    now - pending.started, pending.length, pending.offset,
                    waiting_for(image, pending.offset, pending.length))
        return found

    def stalled_now(self) -> int:
        """Guest reads waiting ``threshold`` seconds or more right now."""
        if self.threshold <= 0:
            return 0
        return sum(len(i.reads.stalled_now(self.threshold))
                   for i in self.images.values())


# -- health --------------------------------------------------------------

async def _connect(host: str, port: int, timeout: float) -> None:
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                       timeout)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def _check_file(path: str) -> None:
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(f"{path} is no longer a regular file or block device")
    if not os.access(path, os.R_OK):
        raise OSError(f"{path} is not readable")


async def check_origin(text: str, iscsi=None, exports=None,
                       timeout: float = ORIGIN_CHECK_TIMEOUT, cinder=None
                       ) -> str | None:
    """None when origin ``text`` is reachable, else what is wrong (for
    cinder://ID: Cinder's endpoint, when [cinder] endpoint names it)."""
    from vmthunder.volume.iscsi_url import parse_iscsi_url, parse_portal
    what = "iSCSI portal "
    try:
        origin = stack.Origin.parse(text, absolute=True)
        if origin.kind == "file":
            await asyncio.wait_for(asyncio.to_thread(_check_file,
                                                     origin.target),
                                   timeout)
            return None
        if origin.kind == "iscsi":
            portals = [parse_iscsi_url(origin.target).portal]
        elif origin.kind == "cinder":
            endpoint = getattr(cinder, "endpoint", None)
            if not endpoint:
                return None if cinder is not None else \
                    f"{origin}: no [cinder] settings to reach Cinder"
            url = urllib.parse.urlsplit(endpoint)
            portals = [parse_portal(f"{url.hostname}:" + str(
                url.port or (443 if url.scheme == "https" else 80)))]
            what = "Cinder endpoint "
        else:
            if exports is None:
                return f"{origin}: no [export] settings to resolve it"
            portals = [parse_portal(exports.portal)]
        if iscsi is not None and origin.kind != "cinder":
            portals += [parse_portal(p) for p in iscsi.portals]
    except OSError as exc:
        if exc.filename and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc) or type(exc).__name__
    except ValueError as exc:
        return str(exc) or type(exc).__name__
    except asyncio.TimeoutError:
        return f"no answer from the file system within {timeout} s"
    errors = []
    for portal in dict.fromkeys(portals):
        try:
            await _connect(portal.host, portal.port, timeout)
            return None
        except asyncio.TimeoutError:
            errors.append(f"{portal}: no answer within {timeout} s")
        except OSError as exc:
            errors.append(f"{portal}: {exc.strerror or exc}")
    return what + "; ".join(errors)


class Health:
    """The checks behind /healthz for one agent."""

    def __init__(self, agent, *, min_free_bytes: int = 0,
                 ttl: float = ORIGIN_CHECK_TTL,
                 timeout: float = ORIGIN_CHECK_TIMEOUT):
        self.agent = agent
        self.min_free_bytes = min_free_bytes
        self.ttl = ttl
        self.timeout = timeout
        # origin text -> (checked at, problem or None)
        self._origins: dict[str, tuple[float, str | None]] = {}
        self._checking: dict[str, asyncio.Future] = {}
        self._problems: list[str] = []

    async def origin_problem(self, origin: str) -> str | None:
        now = time.monotonic()
        cached = self._origins.get(origin)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        pending = self._checking.get(origin)
        if pending is None:
            config = self.agent.config
            pending = asyncio.ensure_future(check_origin(
                origin, config.iscsi, config.exports, self.timeout,
                getattr(config, "cinder", None)))
            self._checking[origin] = pending

            def done(task, origin=origin):
                self._checking.pop(origin, None)
                if not task.cancelled() and task.exception() is None:
                    self._origins[origin] = (time.monotonic(),
                                             task.result())
            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    def _disk(self) -> dict:
        config = self.agent.config
        seen = {}
        for what, path in (("cache", config.cache.directory),
                           ("state", config.state_dir)):
            try:
                # Not made yet (no image attached): where it will be.
                where = os.path.abspath(path)
                while not os.path.exists(where) and where != "/":
                    where = os.path.dirname(where)
                st = os.statvfs(where)
                dev = os.stat(where).st_dev
            except OSError as exc:
                seen[path] = {"what": what, "ok": False,
                              "error": exc.strerror or str(exc)}
                continue
            if any(v.get("dev") == dev for v in seen.values()):
                continue
            free = st.f_bavail * st.f_frsize
            seen[path] = {"what": what, "dev": dev, "free_bytes": free,
                          "ok": free >= self.min_free_bytes}
        for info in seen.values():
            info.pop("dev", None)
        return seen

    async def report(self) -> tuple[bool, dict]:
        """(healthy, the JSON body of /healthz)."""
        agent = self.agent
        problems: list[str] = []
        checks: dict = {"agent": {
            "ok": True, "uptime_s": round(time.monotonic() - agent.started,
                                          3),
            "images": len(agent.images), "vms": len(agent.vms)}}

        images = list(agent.images.values())
        answers = await asyncio.gather(
            *(self.origin_problem(i.origin) for i in images))
        origins = {}
        for image, problem in zip(images, answers):
            entry = {"origin": redact_url(image.origin), "ok": True}
            if image.cache is None:
                entry.update(ok=False, error=f"not attached: {image.error}")
                problems.append(f"image {image.name}: not attached "
                                f"({image.error})")
            if problem is not None:
                entry.update(ok=False, unreachable=problem)
                problems.append(f"image {image.name}: origin "
                                f"{redact_url(image.origin)} unreachable: "
                                f"{problem}")
            origins[image.name] = entry
        checks["origins"] = origins

        membership = agent.peering.membership
        if membership is not None:
            coord = {"ok": membership.healthy,
                     "backend": redact_url(membership.backend_url)}
            if not membership.healthy:
                coord["error"] = membership.last_error or "not joined yet"
                problems.append(f"coordination backend "
                                f"{coord['backend']} unreachable: "
                                f"{coord['error']}")
            checks["coordination"] = coord

        disks = await asyncio.to_thread(self._disk)
        for path, info in disks.items():
            info["min_free_bytes"] = self.min_free_bytes
            if not info["ok"]:
                why = info.get("error") or (
                    f"{info['free_bytes'] // MiB} MiB free, below "
                    f"{self.min_free_bytes // MiB} MiB ([agent] "
                    "health_min_free_mib)")
                problems.append(f"{info['what']} disk {path}: {why}")
        checks["disk"] = disks
        checks["stalled_reads_now"] = agent.stall_watch.stalled_now()
        healthy = not problems
        if problems != self._problems:
            # Logged as it changes, not at every probe.
            if problems:
                LOG.warning("health: unhealthy: %s", "; ".join(problems))
            else:
                LOG.info("health: healthy again")
            self._problems = problems
        return healthy, {"status": "ok" if healthy else "unhealthy",
                         "problems": problems, "checks": checks}
