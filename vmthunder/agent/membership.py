"""Peer membership: which hosts run an agent, and which images each caches.

Every agent joins one tooz group (default ``vmthunder-peers``) with the
capabilities ``{"endpoint": "nbd://HOST:PORT", "images": [...]}``: where it
re-exports its image caches read-only over NBD, and the images it holds a
cache of. An agent that recorded boot traces (agent/trace_recording.py)
adds ``"traces": {IMAGE: {"key", "chunks", "digest"}}``: one small entry
per image, never the trace itself (it is read over NBD). The data path
asks :meth:`Membership.peers_for` which other hosts hold an image; that
answer comes from a snapshot of the group refreshed in the background, so
it costs no I/O.

tooz does the membership (no home-made consensus):

* ``file:///var/lib/vmthunder/coordination`` (the default, embedded, no
  server): members are files in a shared directory, so it covers the agents
  of ONE host (several processes of that host see each other, other hosts do
  not). A member whose file has not been touched for ``timeout`` seconds
  (tooz default 10; ``file://DIR?timeout=N``, whole seconds) is dead.
* ``redis://HOST:6379`` for many hosts. A member's liveness is a key that
  expires ``membership_timeout`` seconds (float) after its last heartbeat;
  ``timeout`` (whole seconds) is the socket timeout. When the URL sets
  neither, :class:`Membership` fills in ``timeout=5`` and
  ``membership_timeout=max(2, 5 * heartbeat_s)`` (tooz would use 30 s for
  both). Example: ``redis://10.0.0.5:6379?timeout=5&membership_timeout=5``.
* ``etcd3+http://HOST:2379`` works the same way (``membership_timeout``
  in whole seconds, same default), through tooz's etcd3gw driver (the
  ``etcd3gw`` package, in requirements.txt); tested against Debian's
  etcd-server 3.4 like Redis (tests/functional/test_membership.py).

tooz is synchronous: all its calls run in one dedicated worker thread of the
:class:`Membership` (one at a time, so the driver never sees two calls at
once), never on the event loop; the driver's own executor is made
synchronous (``executor=synchronous``) unless the URL names one.

If the backend goes away (say Redis restarts without persistence), the last
snapshot is kept, so peers keep being used; one warning is logged, and the
heartbeat/refresh loop retries with back-off. Once the backend answers again
the group is re-created, this member re-joined and its images re-announced,
without restarting the agent. A member that restarts under the same id
replaces its old entry (tooz's MemberAlreadyExist: leave, then join again).

Command line, for humans::

    python -m vmthunder.agent.membership --backend redis://10.0.0.5:6379 list
    python -m vmthunder.agent.membership --backend URL join \\
        --member-id host7 --endpoint nbd://10.201.0.7:10810 --image cirros
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import urllib.parse
from typing import Any, Iterable

import tooz
from tooz import coordination

from vmthunder.redaction import redact_url

LOG = logging.getLogger(__name__)

DEFAULT_GROUP = "vmthunder-peers"
DEFAULT_BACKEND_URL = "file:///var/lib/vmthunder/coordination"

#: Socket timeout (s) filled into redis:// URLs that set none (tooz: 30).
REDIS_DEFAULT_TIMEOUT = 5
#: A redis:// member's lease is this many heartbeats unless the URL says.
LEASE_HEARTBEATS = 5
MIN_LEASE_S = 2.0


def _with_defaults(backend_url: str, heartbeat_s: float) -> tuple[str, dict]:
    """Options to pass to tooz that the URL does not set itself."""
    parsed = urllib.parse.urlsplit(backend_url)
    query = urllib.parse.parse_qs(parsed.query)
    extra: dict[str, str] = {}
    if "executor" not in query:
        # Drivers run their calls in a thread pool of their own by default;
        # ours is already a dedicated thread, and the pool's shutdown costs
        # a second at every stop().
        extra["executor"] = "synchronous"
    lease = max(MIN_LEASE_S, LEASE_HEARTBEATS * heartbeat_s)
    if parsed.scheme == "redis":
        if "timeout" not in query:
            extra["timeout"] = str(REDIS_DEFAULT_TIMEOUT)
        if "membership_timeout" not in query:
            extra["membership_timeout"] = str(lease)
    elif parsed.scheme.startswith("etcd3+"):
        if "membership_timeout" not in query:
            extra["membership_timeout"] = str(math.ceil(lease))
    return parsed.scheme, extra


def _fail_fast_redis(coord: Any) -> None:
    """Make tooz's redis driver give up quickly when Redis is down.

    redis-py (5+) retries a failed command 3 times with exponential back-off
    (up to 10 s), and tooz's redis driver retries connection errors 15 times
    on top: one call to a stopped Redis took 64 s. This loop does its own
    retrying with back-off, so each client gets redis-py's no-retry policy
    (one attempt per tooz try: a refused connection fails in milliseconds).
    Uses the driver's private client factory; without it (other tooz
    versions) nothing changes but the time to notice an outage.
    """
    make_client = getattr(coord, "_make_client", None)
    if make_client is None:
        return
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - redis driver needs redis
        return

    def _make_client(*args, **kwargs):
        client = make_client(*args, **kwargs)
        with contextlib.suppress(Exception):
            client.set_retry(Retry(NoBackoff(), 0))
        return client

    coord._make_client = _make_client


def _lease_of(coord: Any) -> float | None:
    """Seconds a silent member stays listed (driver-specific, best effort)."""
    for attr in ("membership_timeout", "_timeout", "timeout"):
        value = getattr(coord, attr, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# Recorded trace entries read from one member, at most (any member may
# write anything in its capabilities).
MAX_TRACE_ENTRIES = 1024


def _trace_entries(raw) -> dict[str, dict]:
    """A member's "traces" capability, keeping only well-formed entries:
    {image: {"key": str, "chunks": int, "digest": 64 hex}}."""
    entries: dict[str, dict] = {}
    if not isinstance(raw, dict):
        return entries
    for image, entry in list(raw.items())[:MAX_TRACE_ENTRIES]:
        if not isinstance(entry, dict):
            continue
        key, chunks, digest = (entry.get(k, entry.get(k.encode()))
                               for k in ("key", "chunks", "digest"))
        if isinstance(key, bytes):
            key = _text(key)
        if isinstance(digest, bytes):
            digest = _text(digest)
        if isinstance(key, str) and 0 < len(key) <= 64 \
                and isinstance(chunks, int) and not isinstance(chunks, bool) \
                and chunks > 0 and isinstance(digest, str) \
                and len(digest) == 64:
            entries[_text(image)] = {"key": key, "chunks": chunks,
                                     "digest": digest}
    return entries


def _parse_members(raw: dict) -> dict[str, dict]:
    """tooz's {member: capabilities} as {member_id: {endpoint, images,
    traces}}."""
    members: dict[str, dict] = {}
    for member, caps in raw.items():
        endpoint = None
        images: list[str] = []
        traces: dict[str, dict] = {}
        if isinstance(caps, dict):
            ep = caps.get("endpoint", caps.get(b"endpoint"))
            endpoint = _text(ep) if ep else None
            imgs = caps.get("images", caps.get(b"images")) or []
            if isinstance(imgs, (list, tuple)):
                images = sorted({_text(i) for i in imgs})
            traces = _trace_entries(caps.get("traces", caps.get(b"traces")))
        members[_text(member)] = {"endpoint": endpoint, "images": images}
        if traces:
            members[_text(member)]["traces"] = traces
    return dict(sorted(members.items()))


class Membership:
    """This host's membership in the peer group, and a snapshot of it.

    ``start()`` connects, creates the group if needed and joins it;
    heartbeats and refreshes then run in the background until ``stop()``.
    ``peers_for()`` and ``members()`` read the last snapshot and never
    block. ``announce()`` may be called before ``start()``.
    """

    def __init__(self, backend_url: str, member_id: str, endpoint: str, *,
                 group: str = DEFAULT_GROUP, heartbeat_s: float = 1.0,
                 refresh_s: float = 1.0, max_backoff_s: float = 5.0,
                 images: Iterable[str] = ()):
        if not member_id:
            raise ValueError("member_id must not be empty")
        if heartbeat_s <= 0 or refresh_s <= 0 or max_backoff_s <= 0:
            raise ValueError("heartbeat_s, refresh_s and max_backoff_s must "
                             "be positive")
        self.backend_url = backend_url
        self.member_id = member_id
        self.endpoint = endpoint
        self.group = group
        self.heartbeat_s = float(heartbeat_s)
        self.refresh_s = float(refresh_s)
        self.max_backoff_s = float(max_backoff_s)
        self._group_id = group.encode("utf-8")
        self._images: list[str] = sorted(set(images))
        self._traces: dict[str, dict] = {}
        # announce() bumps _version; the worker records what it published,
        # so an announce racing with a join is never lost.
        self._version = 0
        self._published = 0
        self._coord: Any = None
        self._coord_started = False
        self._joined = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._members: dict[str, dict] = {}
        self._peers: dict[str, list[str]] = {}
        self._healthy = False
        self._last_error: str | None = None
        self._last_refresh: float | None = None
        self._outage_since: float | None = None
        self.lease_s: float | None = None

    # -- snapshot (sync, no I/O) ------------------------------------------

    def peers_for(self, image: str) -> list[str]:
        """Endpoints of the OTHER live members that announced ``image``.

        Ordered by member id. From the last snapshot: no I/O.
        """
        return list(self._peers.get(image, ()))

    def members(self) -> dict[str, dict]:
        """{member_id: {"endpoint": str, "images": [str]}}, self included;
        with "traces": {image: entry} for a member offering recorded boot
        traces."""
        members = {}
        for m, d in self._members.items():
            members[m] = {"endpoint": d["endpoint"],
                          "images": list(d["images"])}
            if d.get("traces"):
                members[m]["traces"] = dict(d["traces"])
        return members

    @property
    def images(self) -> list[str]:
        return list(self._images)

    @property
    def healthy(self) -> bool:
        """The last round with the backend succeeded and we are joined."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def snapshot_age(self) -> float | None:
        """Seconds since the snapshot was last refreshed (None: never)."""
        if self._last_refresh is None:
            return None
        return time.monotonic() - self._last_refresh

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Connect, create the group, join; then beat and refresh.

        A backend that cannot be reached now is not fatal: the background
        loop keeps trying (``healthy`` stays False until it succeeds). A
        URL naming no tooz driver raises.
        """
        if self._task is not None:
            raise RuntimeError("Membership already started")
        scheme, extra = _with_defaults(self.backend_url, self.heartbeat_s)
        self._coord = coordination.get_coordinator(
            self.backend_url, self.member_id.encode("utf-8"), **extra)
        if scheme == "redis":
            _fail_fast_redis(self._coord)
        self.lease_s = _lease_of(self._coord)
        if self.lease_s is not None and self.heartbeat_s * 2 > self.lease_s:
            LOG.warning("membership: heartbeat every %.1fs with a lease of "
                        "%.1fs: this member may be seen as dead between "
                        "beats; lower the heartbeat interval or raise the "
                        "lease", self.heartbeat_s, self.lease_s)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"membership-{self.member_id}")
        self._wake = asyncio.Event()
        self._stopping = False
        try:
            await self._round(refresh=True)
        except Exception as exc:  # noqa: BLE001 - retried by the loop
            self._failed(exc)
        self._task = asyncio.create_task(
            self._run(), name=f"membership-{self.member_id}")

    async def stop(self) -> None:
        """Leave the group and disconnect. Idempotent."""
        if self._task is None or self._stopping:
            return
        self._stopping = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        try:
            await asyncio.wait_for(self._call(self._shutdown_sync),
                                   timeout=max(5.0, 2 * self.heartbeat_s))
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            LOG.warning("membership: leaving %s cleanly failed (%s); peers "
                        "drop this member when its lease expires",
                        self.group, exc)
        self._executor.shutdown(wait=False)
        self._members = {}
        self._peers = {}
        self._healthy = False

    async def announce(self, images: Iterable[str],
                       traces: dict | None = None) -> None:
        """Set the images this host holds a cache of (and ``traces``, the
        entries of the boot traces it recorded: {image: {"key",
        "chunks", "digest"}}).

        Published at once when the backend answers; otherwise kept and
        published by the background loop when it is back (no exception).
        """
        self._images = sorted(set(images))
        self._traces = dict(traces or {})
        self._version += 1
        if self._task is None or self._stopping:
            return
        try:
            await self._call(self._publish_sync)
        except Exception as exc:  # noqa: BLE001 - the loop retries
            self._failed(exc)
            self._wake.set()
            return
        self._members = self._with_self(self._members)

    async def __aenter__(self) -> Membership:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- background loop ----------------------------------------------------

    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        tick = min(self.heartbeat_s, self.refresh_s)
        backoff = tick
        next_refresh = time.monotonic() + self.refresh_s
        while True:
            try:
                if self._healthy:
                    await asyncio.wait_for(self._wake.wait(), tick)
                else:
                    await asyncio.wait_for(self._wake.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            refresh = now >= next_refresh or not self._healthy
            try:
                await self._round(refresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried with back-off
                self._failed(exc)
                backoff = min(self.max_backoff_s, max(tick, backoff * 2))
                continue
            backoff = tick
            if refresh:
                next_refresh = now + self.refresh_s

    async def _round(self, refresh: bool) -> None:
        members = await self._call(self._round_sync, refresh)
        if members is not None:
            self._set_snapshot(members)
        if not self._healthy:
            if self._outage_since is not None:
                LOG.warning("membership: %s is back after %.1fs; member %s "
                            "(re)joined %s", redact_url(self.backend_url),
                            time.monotonic() - self._outage_since,
                            self.member_id, self.group)
            else:
                LOG.info("membership: %s joined %s at %s", self.member_id,
                         self.group, redact_url(self.backend_url))
        self._healthy = True
        self._last_error = None
        self._outage_since = None

    def _failed(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            LOG.warning("membership: %s: coordination backend %s failed "
                        "(%s); keeping the last snapshot (%d members), "
                        "retrying with back-off", self.member_id,
                        redact_url(self.backend_url), self._last_error,
                        len(self._members))
        else:
            LOG.debug("membership: still failing: %s", self._last_error)
        self._healthy = False

    def _set_snapshot(self, members: dict[str, dict]) -> None:
        members = self._with_self(members)
        peers: dict[str, list[str]] = {}
        for member, info in members.items():  # sorted by member id
            if member == self.member_id or not info["endpoint"]:
                continue
            for image in info["images"]:
                peers.setdefault(image, []).append(info["endpoint"])
        self._members = members
        self._peers = peers
        self._last_refresh = time.monotonic()

    def _with_self(self, members: dict[str, dict]) -> dict[str, dict]:
        members = dict(members)
        if self._joined:
            members[self.member_id] = {"endpoint": self.endpoint,
                                       "images": list(self._images)}
            if self._traces:
                members[self.member_id]["traces"] = dict(self._traces)
        return dict(sorted(members.items()))

    # -- worker thread (all tooz calls) ------------------------------------

    def _caps(self) -> tuple[dict, int]:
        version = self._version
        caps = {"endpoint": self.endpoint, "images": list(self._images)}
        if self._traces:
            # Only when there are some: membership traffic stays as small.
            caps["traces"] = dict(self._traces)
        return caps, version

    def _round_sync(self, refresh: bool) -> dict[str, dict] | None:
        if not self._coord_started:
            self._coord.start()
            self._coord_started = True
        self._coord.heartbeat()
        if not self._joined:
            self._join_sync()
        elif self._published != self._version:
            self._publish_sync()
        if not refresh:
            return None
        try:
            raw = self._coord.get_members_with_capabilities(
                self._group_id).get()
        except coordination.GroupNotCreated:
            # The backend lost its data (e.g. Redis restarted empty).
            LOG.info("membership: group %s is gone; re-creating it",
                     self.group)
            self._joined = False
            self._join_sync()
            raw = self._coord.get_members_with_capabilities(
                self._group_id).get()
        members = _parse_members(raw)
        if self.member_id not in members:
            # Reaped (lease expired while we were cut off) or lost.
            LOG.info("membership: %s is no longer in %s; re-joining",
                     self.member_id, self.group)
            self._joined = False
            self._join_sync()
        return members

    def _join_sync(self) -> None:
        with contextlib.suppress(coordination.GroupAlreadyExist):
            self._coord.create_group(self._group_id).get()
        caps, version = self._caps()
        try:
            self._coord.join_group(self._group_id, caps).get()
        except coordination.MemberAlreadyExist:
            # A previous incarnation under the same id (crashed, or before
            # its lease expired): replace its entry.
            with contextlib.suppress(coordination.MemberNotJoined):
                self._coord.leave_group(self._group_id).get()
            self._coord.join_group(self._group_id, caps).get()
        self._joined = True
        self._published = version

    def _publish_sync(self) -> None:
        if not self._coord_started or not self._joined:
            return  # the next round joins with the current images
        caps, version = self._caps()
        try:
            self._coord.update_capabilities(self._group_id, caps).get()
        except tooz.NotImplemented:
            # The file driver cannot update capabilities: leave, re-join.
            with contextlib.suppress(coordination.MemberNotJoined):
                self._coord.leave_group(self._group_id).get()
            self._coord.join_group(self._group_id, caps).get()
        except (coordination.GroupNotCreated, coordination.MemberNotJoined):
            self._joined = False
            self._join_sync()
            return
        self._published = version

    def _shutdown_sync(self) -> None:
        if not self._coord_started:
            return
        try:
            if self._joined:
                with contextlib.suppress(coordination.GroupNotCreated,
                                         coordination.MemberNotJoined):
                    self._coord.leave_group(self._group_id).get()
        finally:
            self._joined = False
            self._coord_started = False
            self._coord.stop()


# -- command line -----------------------------------------------------------

def list_members(backend_url: str, group: str = DEFAULT_GROUP) -> dict:
    """One-shot read of the group, without joining it (blocking)."""
    member = f"vmthunder-cli-{socket.gethostname()}-{os.getpid()}"
    scheme, extra = _with_defaults(backend_url, 1.0)
    coord = coordination.get_coordinator(backend_url, member.encode(),
                                         **extra)
    if scheme == "redis":
        _fail_fast_redis(coord)
    coord.start()
    try:
        try:
            raw = coord.get_members_with_capabilities(
                group.encode("utf-8")).get()
        except coordination.GroupNotCreated:
            raw = {}
    finally:
        coord.stop()
    return _parse_members(raw)


async def _join_forever(args) -> int:
    m = Membership(args.backend, args.member_id, args.endpoint,
                   group=args.group, heartbeat_s=args.heartbeat,
                   refresh_s=args.heartbeat, images=args.image)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await m.start()
    print(f"vmthunder-membership: joined member={m.member_id} "
          f"group={m.group} healthy={m.healthy} lease={m.lease_s}",
          flush=True)
    try:
        await stop.wait()
    finally:
        await m.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmthunder.agent.membership",
        description="Inspect (or join, for testing) vmthunder's peer group.")
    parser.add_argument("--backend", default=DEFAULT_BACKEND_URL,
                        help="tooz backend URL, e.g. redis://HOST:6379 "
                             f"(default: {DEFAULT_BACKEND_URL})")
    parser.add_argument("--group", default=DEFAULT_GROUP,
                        help=f"tooz group (default: {DEFAULT_GROUP})")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="print the live members and images")
    ls.add_argument("--json", action="store_true", help="JSON output")
    join = sub.add_parser("join", help="join with fixed capabilities and "
                                       "beat until SIGTERM/SIGINT")
    join.add_argument("--member-id", default=socket.gethostname())
    join.add_argument("--endpoint", required=True,
                      help="this member's peer endpoint, nbd://HOST:PORT")
    join.add_argument("--image", action="append", default=[],
                      help="an image announced (repeatable)")
    join.add_argument("--heartbeat", type=float, default=1.0,
                      help="seconds between heartbeats and refreshes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "join":
        return asyncio.run(_join_forever(args))
    try:
        members = list_members(args.backend, args.group)
    except tooz.ToozError as exc:
        print(f"error: {redact_url(args.backend)}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(members, indent=2, sort_keys=True))
        return 0
    if not members:
        print(f"no live members in group {args.group}")
        return 0
    width = max(len(m) for m in members)
    for member, info in members.items():
        print(f"{member:<{width}}  {info['endpoint'] or '-'}  "
              f"{','.join(info['images']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
