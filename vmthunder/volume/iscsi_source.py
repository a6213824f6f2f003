"""An iSCSI LUN as the bottom layer, read with a userspace initiator.

Compute hosts like the ones this project is built on have no kernel iSCSI
initiator, so the LUN is read with libiscsi (the library QEMU uses,
through :mod:`vmthunder.volume.libiscsi`) driven from the asyncio loop:
no thread does I/O and nothing blocks the loop.

* :func:`parse_iscsi_url` reads ``iscsi://[user[%password]@]host[:port]/
  IQN/LUN`` (libiscsi's and QEMU's syntax).
* :class:`IscsiSession` is one logged-in session to a target, with many
  SCSI commands in flight (bounded), and the recovery policy: when the
  connection drops (target restarted, network cut) commands in flight and
  new ones wait while the portals are tried again in order, for up to
  ``reconnect_timeout`` seconds; then they are re-issued on the new
  session and complete with the right data. If no portal comes back in
  time, they fail with EIO and a message saying so.
* :class:`IscsiSource` is the read-only :class:`~vmthunder.blockdev.
  BlockDevice` on top: widens unaligned reads to the LUN's block size,
  splits large ones, and can check the LUN against the image's chunk
  manifest, read from a second LUN of the same target (the origin's
  convention: image as LUN 1, manifest as LUN 2; its digest table is
  read lazily, only for the chunks fetched).

Errors are :class:`~vmthunder.blockdev.BlockError`: ``ECONNREFUSED``/
``EHOSTUNREACH``/``ETIMEDOUT`` when no portal answers (the message names
every portal tried), ``EACCES`` when the login is refused for bad CHAP
credentials, ``ENOENT`` for an unknown target or LUN, ``EINVAL`` for a
LUN that disagrees with its manifest, ``EIO`` for SCSI errors and a
target that did not come back (the message names target and offset).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import re
import socket
import time
import urllib.parse

from vmthunder import blockdev
from vmthunder.blockdev import BlockError
from vmthunder.volume import libiscsi
from vmthunder.volume import manifest as manifest_mod

LOG = logging.getLogger(__name__)

DEFAULT_PORT = 3260
DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT_TIMEOUT = 60.0
DEFAULT_MAX_INFLIGHT = 32
DEFAULT_MAX_TRANSFER = 1 << 20
# A SCSI command the target has not answered after this long counts as a
# dead connection (reconnect and re-issue): what finds a hung target that
# keeps its TCP connection open. 0 disables. libiscsi counts whole
# seconds, so N means between N-1 and N+1 s.
DEFAULT_COMMAND_TIMEOUT = 30
DEFAULT_INITIATOR = "iqn.2024-01.org.vmthunder.initiator"
# A manifest LUN larger than this is refused (a 1 TiB image with 64 KiB
# chunks has a 1.1 GB manifest; nothing sane is larger).
MAX_MANIFEST_BYTES = 1 << 30
# read() receives into reused buffers of at most this size, this many
# bytes of them kept.
MAX_POOLED_BUFFER = 4 << 20
MAX_POOLED_BYTES = 64 << 20
# How often a command hit by UNIT ATTENTION is retried, and one re-issued
# after a lost connection, before it fails.
MAX_RETRIES = 8
MAX_REISSUES = 16


# -- URLs --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Portal:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class IscsiUrl:
    portal: Portal
    target: str
    lun: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        """The URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        target = urllib.parse.quote(self.target, safe=".-_:")
        return f"iscsi://{user}{self.portal}/{target}/{self.lun}"


def parse_portal(text: str) -> Portal:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"bad iSCSI portal {text!r}: expected HOST[:PORT]")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad iSCSI portal {text!r}: expected "
                             f"[IPV6]:PORT")
        port = rest[1:] if rest else ""
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = text, ""
        elif ":" in host:
            raise ValueError(f"bad iSCSI portal {text!r}: write an IPv6 "
                             f"address in brackets, [ADDR]:PORT")
        elif not port:
            raise ValueError(f"bad iSCSI portal {text!r}: empty port")
    if not host:
        raise ValueError(f"bad iSCSI portal {text!r}: no host")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port {port!r} in iSCSI portal {text!r}")
        return Portal(host, int(port))
    return Portal(host)


def parse_iscsi_url(url: str, *, password: str | None = None) -> IscsiUrl:
    """Parse ``iscsi://[user[%password]@]host[:port]/IQN/LUN``.

    As in libiscsi, ``%`` separates user and password, and the target
    name is percent-decoded (``%3A`` is ``:``; a plain ``:`` works too).
    ``password`` (not in the URL, so not in process lists) overrides the
    one in the URL; a password needs a user.
    """
    if not isinstance(url, str):
        raise TypeError(f"iSCSI URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "iscsi":
        raise ValueError(f"not an iSCSI URL: {_redact(url)!r} (expected "
                         f"iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN)")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    username = url_password = None
    if at:
        username, pct, url_password = userinfo.partition("%")
        if not username:
            raise ValueError(f"iSCSI URL {_redact(url)!r} has an empty user "
                             f"name before '@'")
        if not pct:
            url_password = None
    portal = parse_portal(hostport) if hostport else None
    if portal is None:
        raise ValueError(f"iSCSI URL {_redact(url)!r} has no host")
    path = path.rstrip("/") if slash else ""
    target, slash2, lun_text = path.rpartition("/")
    if not slash2 or not target:
        raise ValueError(f"iSCSI URL {_redact(url)!r} needs a target and a "
                         f"LUN: iscsi://HOST[:PORT]/IQN/LUN")
    target = urllib.parse.unquote(target)
    if "/" in target or not target.strip():
        raise ValueError(f"iSCSI URL {_redact(url)!r}: bad target name "
                         f"{target!r}")
    if not lun_text.isdigit() or int(lun_text) > 16383:
        raise ValueError(f"iSCSI URL {_redact(url)!r}: bad LUN "
                         f"{lun_text!r} (a number from 0 to 16383)")
    if password is not None:
        url_password = password
    if url_password is not None and not username:
        raise ValueError(f"iSCSI URL {_redact(url)!r}: a CHAP password "
                         f"needs a user name (iscsi://USER%PASSWORD@...)")
    return IscsiUrl(portal=portal, target=target, lun=int(lun_text),
                    username=username, password=url_password)


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and "%" in userinfo:
        userinfo = userinfo.partition("%")[0] + "%***"
    return f"{scheme}{sep}{userinfo}{at}{hostport}{slash}{path}"


# -- session -----------------------------------------------------------

class _Command:
    """One SCSI command and its result future.

    The command owns the memory a READ lands in (``view`` and the iovec
    pinning it) until libiscsi reports completion, even when the caller
    has given up waiting.
    """

    __slots__ = ("kind", "lun", "lba", "nbytes", "view", "future",
                 "retries", "reissues", "iov", "where", "busy_since")

    def __init__(self, kind: str, lun: int, future: asyncio.Future, *,
                 lba: int = 0, nbytes: int = 0, view=None, where: str = ""):
        self.kind = kind
        self.lun = lun
        self.lba = lba
        self.nbytes = nbytes
        self.view = view
        self.future = future
        self.retries = 0
        self.reissues = 0
        self.iov = None
        self.where = where
        self.busy_since: float | None = None


class _Conn:
    """Keeps one libiscsi context serviced from the event loop."""

    def __init__(self, ctx: libiscsi.Context, loop, portal: str,
                 after_service, on_broken):
        self.ctx = ctx
        self.loop = loop
        self.portal = portal
        self._after = after_service
        self._on_broken = on_broken
        self._fd = -1
        self._reading = False
        self._writing = False
        self._timer = None
        self.broken: str | None = None
        self.closed = False

    def update(self) -> None:
        """Watch what libiscsi wants now (fd and events may change)."""
        if self.closed:
            return
        fd = self.ctx.fd()
        events = self.ctx.which_events() if fd >= 0 else 0
        if fd != self._fd:
            self._unwatch()
            self._fd = fd
        if fd < 0:
            return
        want_r = bool(events & libiscsi.POLLIN)
        want_w = bool(events & libiscsi.POLLOUT)
        if want_r != self._reading:
            if want_r:
                self.loop.add_reader(fd, self._readable)
            else:
                self.loop.remove_reader(fd)
            self._reading = want_r
        if want_w != self._writing:
            if want_w:
                self.loop.add_writer(fd, self._writable)
            else:
                self.loop.remove_writer(fd)
            self._writing = want_w

    def start_ticks(self, interval: float = 1.0) -> None:
        """Call service(0) now and then: libiscsi scans for timed-out
        commands only from iscsi_service()."""
        def tick():
            self._timer = None
            if not self.closed:
                self._service(0)
                if not self.closed:
                    self._timer = self.loop.call_later(interval, tick)
        if self._timer is None:
            self._timer = self.loop.call_later(interval, tick)

    def _unwatch(self) -> None:
        if self._fd >= 0:
            if self._reading:
                self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
        self._reading = self._writing = False
        self._fd = -1

    def _readable(self) -> None:
        self._service(libiscsi.POLLIN)

    def _writable(self) -> None:
        self._service(libiscsi.POLLOUT)

    def _service(self, revents: int) -> None:
        if self.closed:
            return
        seen = self.ctx.log_count
        rc = self.ctx.service(revents)
        if rc < 0:
            errors = self.ctx.errors_since(seen)
            self.broken = errors[-1] if errors else (
                self.broken or "connection closed by the target")
        if self.broken is not None:
            self._on_broken(self, self.broken)
            return
        self._after(self)
        self.update()

    def mark_broken(self, reason: str) -> None:
        """From a completion (inside service()): handled when it returns."""
        if self.broken is None:
            self.broken = reason

    def close(self) -> None:
        """Stop watching, then destroy the context (its commands in flight
        complete with CANCELLED from inside this call)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwatch()
        self.ctx.destroy()


class IscsiSession:
    """A session to one LUN's target, surviving target restarts.

    ``portals`` are tried in order, at connect and at every reconnect.
    Commands go through :meth:`read_into` and :meth:`read_capacity`; at
    most ``max_inflight`` are outstanding at the target, the rest wait.
    """

    def __init__(self, target: str, portals: list[Portal], lun: int, *,
                 username: str | None = None, password: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 command_timeout: int = DEFAULT_COMMAND_TIMEOUT,
                 header_digest: str = "none-crc32c",
                 initiator_name: str | None = None):
        if not portals:
            raise ValueError("no iSCSI portal given")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, not "
                             f"{max_inflight}")
        if header_digest not in libiscsi.HEADER_DIGESTS:
            raise ValueError(f"bad header digest {header_digest!r}: one of "
                             f"{', '.join(libiscsi.HEADER_DIGESTS)}")
        libiscsi.load()
        self.target = target
        self.portals = list(dict.fromkeys(portals))
        self.lun = lun
        self._username = username
        self._password = password
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_inflight = max_inflight
        self.command_timeout = command_timeout
        self.header_digest = header_digest
        self.initiator_name = initiator_name or (
            f"{DEFAULT_INITIATOR}:{socket.gethostname()}")
        self._loop = asyncio.get_running_loop()
        self._conn: _Conn | None = None
        self.portal: Portal | None = None      # the one connected to
        self._queue: collections.deque[_Command] = collections.deque()
        self._inflight: set[_Command] = set()
        # Commands a dead connection handed back, oldest first; they go
        # to the front of the queue once that connection is closed.
        self._reissue: list[_Command] = []
        self._block_sizes: dict[int, int] = {}
        self._reconnect_task: asyncio.Task | None = None
        self._failure: BlockError | None = None
        self._closing = False
        # Capacity checked after every reconnect: a different LUN behind
        # the same name must not be read as if it were the old one.
        self.expected_capacity: tuple[int, int] | None = None
        self.stats = {"commands": 0, "reconnects": 0, "retries": 0,
                      "reissued": 0}

    # -- public --------------------------------------------------------

    def describe(self) -> str:
        portal = self.portal or self.portals[0]
        return f"iSCSI LUN {self.target}/{self.lun} at {portal}"

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def connect(self) -> None:
        """Log in through the first portal that works (within timeout)."""
        deadline = time.monotonic() + self.timeout
        conn, errors = await self._login_round(deadline, first=True)
        if conn is None:
            raise self._no_portal_error(errors, "")
        self._attach(conn)

    async def read_capacity(self, lun: int) -> tuple[int, int]:
        """``(block_size, blocks)`` of ``lun`` (READ CAPACITY 16)."""
        fut = self._loop.create_future()
        self._submit(_Command("capacity", lun, fut,
                              where=f"LUN {lun} capacity"))
        return await fut

    async def read_into(self, lun: int, lba: int, view: memoryview,
                        where: str) -> None:
        """READ(16) ``len(view)`` bytes at ``lba`` into ``view``.

        ``view`` must be a writable, contiguous memoryview of a bytearray
        whose length is a multiple of the block size; it is written by
        the target until the command completes, even when the awaiting
        caller was cancelled.
        """
        fut = self._loop.create_future()
        self._submit(_Command("read", lun, fut, lba=lba,
                              nbytes=view.nbytes, view=view, where=where))
        await fut

    async def close(self, timeout: float = 5.0) -> None:
        """Wait briefly for commands in flight, log out, disconnect."""
        if self._closing:
            return
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            try:
                await self._reconnect_task
            except BaseException:
                pass
        closed = BlockError(errno.EIO, f"{self.describe()}: closed")
        while self._queue:
            self._finish(self._queue.popleft(), exc=closed)
        conn = self._conn
        if conn is not None:
            deadline = time.monotonic() + timeout
            while self._inflight and self._conn is conn \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self._conn is conn and not conn.closed and \
                    not self._inflight:
                await self._logout(conn, min(1.0, timeout))
            self._conn = None
            conn.close()      # anything still in flight: CANCELLED
        for cmd in list(self._inflight):
            self._finish(cmd, exc=closed)
        self._inflight.clear()

    # -- connecting ----------------------------------------------------

    async def _resolve(self, portal: Portal) -> str:
        """``ip:port`` for libiscsi, whose own resolver would block."""
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in portal.host
                             else socket.AF_INET, portal.host)
            return str(portal)
        except OSError:
            pass
        try:
            infos = await self._loop.getaddrinfo(
                portal.host, portal.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BlockError(errno.EHOSTUNREACH,
                             f"cannot resolve iSCSI portal {portal}: "
                             f"{exc.strerror}") from None
        family, _, _, _, addr = infos[0]
        return str(Portal(addr[0], portal.port))

    async def _login(self, portal: Portal, timeout: float) -> _Conn:
        """A logged-in connection through ``portal``, or BlockError."""
        started = time.monotonic()
        address = await self._resolve(portal)
        timeout = max(0.05, timeout - (time.monotonic() - started))
        try:
            ctx = libiscsi.Context(
                self.initiator_name, self.target,
                header_digest=self.header_digest,
                username=self._username, password=self._password)
        except libiscsi.LibiscsiError as exc:
            raise BlockError(errno.EIO, f"{self._at(portal)}: {exc}") \
                from None
        if self.command_timeout:
            ctx.set_timeout(self.command_timeout)
        done = self._loop.create_future()

        def connected(status, _data):
            if not done.done():
                done.set_result((status, ctx.error()))

        def broken(conn, reason):
            conn.close()
            if not done.done():
                done.set_result((libiscsi.STATUS_ERROR, reason))

        conn = _Conn(ctx, self._loop, str(portal), lambda c: None, broken)
        try:
            ctx.full_connect_async(address, self.lun, connected)
        except libiscsi.LibiscsiError as exc:
            conn.close()
            raise BlockError(errno.EIO, f"{self._at(portal)}: {exc}") \
                from None
        conn.update()
        try:
            status, message = await asyncio.wait_for(
                asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise BlockError(
                errno.ETIMEDOUT,
                f"cannot connect to iSCSI portal {portal} (target "
                f"{self.target}): no answer within {timeout:.1f} s"
            ) from None
        except BaseException:
            conn.close()
            raise
        if status != libiscsi.STATUS_GOOD or conn.closed:
            conn.close()
            raise self._login_error(portal, message)
        return conn

    def _at(self, portal) -> str:
        return f"iSCSI target {self.target} at portal {portal}"

    def _login_error(self, portal: Portal, message: str) -> BlockError:
        low = message.lower()
        if "connect" in low and "log in" not in low:
            reason = message
            for text, err in (("refused", errno.ECONNREFUSED),
                              ("unreachable", errno.EHOSTUNREACH),
                              ("timed out", errno.ETIMEDOUT)):
                if text in low:
                    break
            else:
                err = errno.ECONNREFUSED
            m = re.search(r"socket error (.+?)\(\d+\)", message)
            if m:
                reason = m.group(1).strip()
            return BlockError(err, f"cannot connect to iSCSI portal "
                              f"{portal} (target {self.target}): {reason}")
        if "authentication" in low or "authorization" in low:
            who = (f"CHAP user {self._username!r}" if self._username
                   else "no CHAP credentials")
            return BlockError(
                errno.EACCES,
                f"login to iSCSI target {self.target} at {portal} failed: "
                f"authentication refused ({who}; wrong user or secret?): "
                f"{message}")
        if "target not found" in low:
            return BlockError(
                errno.ENOENT,
                f"login to iSCSI target {self.target} at {portal} failed: "
                f"the portal has no such target: {message}")
        if "testunitready" in low or "sense key" in low:
            return BlockError(
                errno.ENOENT,
                f"iSCSI target {self.target} at {portal}: LUN {self.lun} "
                f"is not usable: {message}")
        return BlockError(
            errno.EIO, f"login to iSCSI target {self.target} at {portal} "
            f"failed: {message or 'connection closed'} (is it an iSCSI "
            "portal?)")

    async def _login_round(self, deadline: float, first: bool = False):
        """Try every portal once in order; ``(conn, errors)``."""
        errors: list[BlockError] = []
        for i, portal in enumerate(self.portals):
            remaining = deadline - time.monotonic()
            if remaining <= 0 and first and errors:
                errors.append(BlockError(
                    errno.ETIMEDOUT, f"portal {portal}: not tried, out of "
                    "time"))
                break
            # Leave the later portals their share of the time; a
            # reconnect round tries every portal, however late.
            share = max(remaining / (len(self.portals) - i),
                        min(1.0, self.timeout))
            try:
                conn = await self._login(portal, share)
            except BlockError as exc:
                LOG.debug("%s", exc)
                errors.append(exc)
                if exc.errno == errno.EACCES and first:
                    # Same credentials everywhere: say so at once.
                    return None, errors
                continue
            if self.expected_capacity is not None:
                try:
                    await self._verify_capacity(conn, portal)
                except BlockError as exc:
                    conn.close()
                    errors.append(exc)
                    if exc.errno == errno.ESTALE:
                        raise
                    continue
            self.portal = portal
            return conn, errors
        return None, errors

    async def _verify_capacity(self, conn: _Conn, portal: Portal) -> None:
        """After a reconnect: is it still the LUN we were reading?"""
        fut = self._loop.create_future()

        def done(status, task):
            try:
                result = _capacity_result(status, task)
            finally:
                libiscsi.Context.free_task(task)
            if not fut.done():
                if isinstance(result, BlockError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

        try:
            conn.ctx.readcapacity16(self.lun, done)
        except libiscsi.LibiscsiError as exc:
            raise BlockError(errno.EIO, f"{self._at(portal)}: {exc}") \
                from None
        conn.update()
        try:
            got = await asyncio.wait_for(asyncio.shield(fut),
                                         max(self.timeout, 1.0))
        except asyncio.TimeoutError:
            fut.cancel()
            raise BlockError(errno.ETIMEDOUT, f"{self._at(portal)}: no "
                             "answer to READ CAPACITY") from None
        if conn.closed:
            raise BlockError(errno.EIO, f"{self._at(portal)}: connection "
                             "lost after login")
        if got != self.expected_capacity:
            raise BlockError(
                errno.ESTALE,
                f"{self._at(portal)}: LUN {self.lun} changed while "
                f"reconnecting (was {self.expected_capacity[1]} blocks of "
                f"{self.expected_capacity[0]} bytes, now {got[1]} of "
                f"{got[0]}); refusing to read a different volume")

    def _no_portal_error(self, errors: list[BlockError],
                         context: str) -> BlockError:
        if len(errors) == 1:
            err = errors[0]
            return BlockError(err.errno, f"{err}{context}")
        codes = {e.errno for e in errors}
        code = codes.pop() if len(codes) == 1 else errno.EHOSTUNREACH
        portals = ", ".join(str(p) for p in self.portals)
        details = "; ".join(str(e) for e in errors)
        return BlockError(code, f"no iSCSI portal of target {self.target} "
                          f"works ({portals}){context}: {details}")

    def _attach(self, conn: _Conn) -> None:
        conn._after = self._serviced
        conn._on_broken = self._broken
        self._conn = conn
        self._failure = None
        conn.update()
        if self.command_timeout:
            conn.start_ticks()
        self._pump()
        conn.update()

    async def _logout(self, conn: _Conn, timeout: float) -> None:
        fut = self._loop.create_future()

        def done(status, _data):
            if not fut.done():
                fut.set_result(status)
        try:
            conn.ctx.logout_async(done)
        except libiscsi.LibiscsiError:
            return
        conn.update()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            pass

    # -- losing and regaining the connection -----------------------------

    def _broken(self, conn: _Conn, reason: str) -> None:
        """The connection died (called outside libiscsi)."""
        if conn is not self._conn or self._closing:
            conn.close()
            self._take_back()
            return
        LOG.warning("%s: connection lost (%s); reconnecting for up to "
                    "%.0f s", self.describe(), reason,
                    self.reconnect_timeout)
        self._conn = None
        # Commands in flight come back CANCELLED from close() and go
        # back to the front of the queue, in their original order.
        conn.close()
        self._take_back()
        self._start_reconnect(reason, self.reconnect_timeout)

    def _take_back(self) -> None:
        self._queue.extendleft(reversed(self._reissue))
        self._reissue.clear()

    def _start_reconnect(self, reason: str, budget: float) -> None:
        if self._reconnect_task is None and not self._closing:
            self._reconnect_task = self._loop.create_task(
                self._reconnect(reason, budget))

    async def _reconnect(self, reason: str, budget: float) -> None:
        lost_at = time.monotonic()
        deadline = lost_at + budget
        delay = 0.05
        errors: list[BlockError] = []
        try:
            while True:
                try:
                    conn, errors = await self._login_round(deadline)
                except BlockError as exc:       # a different LUN now
                    self._fail_all(BlockError(errno.EIO, str(exc)))
                    return
                if conn is not None:
                    self.stats["reconnects"] += 1
                    LOG.warning("%s: reconnected after %.1f s",
                                self.describe(), time.monotonic() - lost_at)
                    self._reconnect_task = None
                    self._attach(conn)
                    return
                now = time.monotonic()
                if now >= deadline:
                    break
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.5)
        finally:
            if self._reconnect_task is asyncio.current_task():
                self._reconnect_task = None
        what = (f"did not come back within {budget:g} s "
                f"(reconnect_timeout) after the connection was lost "
                f"({reason})" if budget > 0 else
                f"is still unreachable ({reason})")
        last = "; ".join(str(e) for e in errors[-len(self.portals):])
        self._fail_all(BlockError(
            errno.EIO, f"iSCSI target {self.target} (LUN {self.lun}, "
            f"portals {', '.join(str(p) for p in self.portals)}) {what}; "
            f"last error: {last or 'none'}"))

    def _fail_all(self, exc: BlockError) -> None:
        LOG.error("%s", exc)
        self._failure = exc
        while self._queue:
            self._finish(self._queue.popleft(), exc=exc)

    # -- commands --------------------------------------------------------

    def _submit(self, cmd: _Command) -> None:
        if self._closing:
            raise BlockError(errno.EIO, f"{self.describe()}: closed")
        self._queue.append(cmd)
        if self._conn is None:
            if self._reconnect_task is None:
                # The target was given up on: one more round of tries.
                self._start_reconnect(
                    str(self._failure) if self._failure else "not connected",
                    0)
            return
        self._pump()
        self._conn.update()

    def _serviced(self, conn: _Conn) -> None:
        self._pump()

    def _pump(self) -> None:
        conn = self._conn
        while conn is not None and self._queue \
                and len(self._inflight) < self.max_inflight:
            cmd = self._queue.popleft()
            if cmd.future.done():           # the caller gave up
                continue
            try:
                self._issue(conn, cmd)
            except libiscsi.LibiscsiError as exc:
                # Not queued: a session libiscsi already knows is dead.
                self._queue.appendleft(cmd)
                conn.mark_broken(str(exc))
                self._loop.call_soon(self._broken_later, conn)
                return
            self._inflight.add(cmd)
            self.stats["commands"] += 1

    def _broken_later(self, conn: _Conn) -> None:
        if conn is self._conn and not conn.closed:
            self._broken(conn, conn.broken or "connection lost")

    def _issue(self, conn: _Conn, cmd: _Command) -> None:
        ctx = conn.ctx

        def done(status, task):
            try:
                self._completed(conn, cmd, status, task)
            finally:
                libiscsi.Context.free_task(task)

        if cmd.kind == "read":
            if cmd.iov is None:
                cmd.iov = libiscsi.iovec_for(cmd.view, 0, cmd.nbytes)
            ctx.read16_into(cmd.lun, cmd.lba, cmd.nbytes,
                            self._block_sizes[cmd.lun], cmd.iov, done)
        else:
            ctx.readcapacity16(cmd.lun, done)

    def set_block_size(self, lun: int, block_size: int) -> None:
        """READ(16) of ``lun`` needs its block size (READ CAPACITY)."""
        self._block_sizes[lun] = block_size

    def _completed(self, conn: _Conn, cmd: _Command, status: int,
                   task: int) -> None:
        """Runs inside libiscsi (service() or destroy())."""
        self._inflight.discard(cmd)
        if status in (libiscsi.STATUS_CANCELLED, libiscsi.STATUS_TIMEOUT,
                      libiscsi.STATUS_ERROR) and not self._closing:
            # The session is gone (or hopeless): re-issue on a new one.
            reason = ("no answer within the command timeout"
                      if status == libiscsi.STATUS_TIMEOUT
                      else "connection closed")
            cmd.reissues += 1
            if cmd.reissues > MAX_REISSUES:
                self._finish(cmd, exc=BlockError(
                    errno.EIO, f"{self.describe()}: {cmd.where}: gave up "
                    f"after {MAX_REISSUES} lost connections ({reason})"))
                return
            self.stats["reissued"] += 1
            self._reissue.append(cmd)
            conn.mark_broken(reason)
            return
        if status == libiscsi.STATUS_CANCELLED:
            self._finish(cmd, exc=BlockError(
                errno.EIO, f"{self.describe()}: closed"))
            return
        if cmd.kind == "capacity":
            result = _capacity_result(status, task)
            if isinstance(result, BlockError) and self._retry(
                    cmd, status, task):
                return
            if isinstance(result, BlockError):
                self._finish(cmd, exc=BlockError(
                    result.errno, f"{self.describe()}: {cmd.where}: "
                    f"{result}"))
            else:
                self._finish(cmd, result=result)
            return
        if status == libiscsi.STATUS_GOOD:
            t = libiscsi.task_struct(task)
            if t.residual_status == libiscsi.RESIDUAL_UNDERFLOW \
                    and t.residual:
                self._finish(cmd, exc=BlockError(
                    errno.EIO, f"{self.describe()}: {cmd.where}: the target "
                    f"sent {cmd.nbytes - t.residual} of {cmd.nbytes} "
                    f"bytes"))
            else:
                self._finish(cmd, result=None)
            return
        if self._retry(cmd, status, task):
            return
        self._finish(cmd, exc=BlockError(
            errno.EIO, f"{self.describe()}: {cmd.where}: "
            f"{_status_text(status, task)}"))

    def _retry(self, cmd: _Command, status: int, task: int) -> bool:
        """Requeue a command hit by a transient condition.

        UNIT ATTENTION (a reset, a changed LUN parameter: reported once)
        is retried at once, a few times. BUSY and TASK SET FULL (a
        target short of resources) are retried with back-off for as
        long as a lost connection would be waited for.
        """
        if status == libiscsi.STATUS_CHECK_CONDITION and task:
            if libiscsi.task_struct(task).sense.key \
                    != libiscsi.SENSE_UNIT_ATTENTION \
                    or cmd.retries >= MAX_RETRIES:
                return False
            delay = 0.0
        elif status in (libiscsi.STATUS_BUSY, libiscsi.STATUS_TASK_SET_FULL,
                        libiscsi.STATUS_TASK_ABORTED):
            now = time.monotonic()
            if cmd.busy_since is None:
                cmd.busy_since = now
            if now - cmd.busy_since > max(self.reconnect_timeout, 1.0):
                return False
            delay = min(0.01 * 2 ** min(cmd.retries, 5), 0.25)
        else:
            return False
        cmd.retries += 1
        self.stats["retries"] += 1
        self._loop.call_later(delay, self._requeue, cmd)
        return True

    def _requeue(self, cmd: _Command) -> None:
        if self._closing:
            self._finish(cmd, exc=BlockError(errno.EIO,
                                             f"{self.describe()}: closed"))
            return
        self._queue.appendleft(cmd)
        if self._conn is not None:
            self._pump()
            self._conn.update()

    @staticmethod
    def _finish(cmd: _Command, *, result=None, exc=None) -> None:
        cmd.iov = None
        if cmd.future.done():
            return
        if exc is not None:
            cmd.future.set_exception(exc)
        else:
            cmd.future.set_result(result)


def _status_text(status: int, task: int) -> str:
    if status == libiscsi.STATUS_CHECK_CONDITION and task:
        sense = libiscsi.task_struct(task).sense
        return ("CHECK CONDITION, "
                + libiscsi.sense_text(sense.key, sense.ascq))
    return f"SCSI status {libiscsi.status_name(status)}"


def _capacity_result(status: int, task: int):
    """``(block_size, blocks)`` from a READ CAPACITY(16) task."""
    if status != libiscsi.STATUS_GOOD:
        return BlockError(errno.EIO, f"READ CAPACITY(16) failed: "
                          f"{_status_text(status, task)}")
    data = libiscsi.task_struct(task).datain
    if data.size < 12 or not data.data:
        return BlockError(errno.EIO, f"READ CAPACITY(16) returned "
                          f"{data.size} bytes, expected 32")
    raw = bytes(data.data[:12])
    last_lba = int.from_bytes(raw[:8], "big")
    block_size = int.from_bytes(raw[8:12], "big")
    if block_size == 0 or block_size & (block_size - 1) \
            or block_size > (1 << 20):
        return BlockError(errno.EIO, f"READ CAPACITY(16): bad block size "
                          f"{block_size}")
    return block_size, last_lba + 1


# -- block device layer ------------------------------------------------

class IscsiSource(blockdev.BlockDevice):
    """A read-only block layer reading one iSCSI LUN.

    Open it with :meth:`open`. Unaligned reads are widened to the LUN's
    block size; reads larger than ``max_transfer`` are split into
    commands sent concurrently. With a manifest attached
    (``manifest_lun``), the size is the manifest's image size (tgtd may
    round a LUN up to whole blocks) and :meth:`identity` names the image
    content, so two exports of one image share a cache.
    """

    capabilities = blockdev.Capabilities(writable=False)

    def __init__(self, session: IscsiSession, url: IscsiUrl,
                 block_size: int, blocks: int, *,
                 max_transfer: int = DEFAULT_MAX_TRANSFER,
                 manifest: manifest_mod.Manifest | None = None):
        self.session = session
        self.url = url
        self.target = url.target
        self.lun = url.lun
        self.block_size = block_size
        self.blocks = blocks
        self.lun_size = block_size * blocks
        self.manifest = manifest
        self.size = manifest.size if manifest is not None else self.lun_size
        step = max(max_transfer - max_transfer % block_size, block_size)
        self.max_transfer = step
        self._bytes_read = 0
        self._reads = 0
        self._closed = False
        self._buffers: dict[int, list[bytearray]] = {}
        self._pooled = 0

    @classmethod
    async def open(cls, url: str | IscsiUrl, *,
                   password: str | None = None,
                   portals: tuple | list = (),
                   manifest_lun: int | None = None,
                   timeout: float = DEFAULT_TIMEOUT,
                   reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
                   max_inflight: int = DEFAULT_MAX_INFLIGHT,
                   max_transfer: int = DEFAULT_MAX_TRANSFER,
                   command_timeout: int = DEFAULT_COMMAND_TIMEOUT,
                   header_digest: str = "none-crc32c",
                   initiator_name: str | None = None) -> IscsiSource:
        """Log in, read the capacity (and the manifest), return the layer.

        ``url`` is ``iscsi://[user[%password]@]host[:port]/IQN/LUN``;
        ``password`` overrides the URL's (keep secrets out of process
        lists). The URL's portal is tried first, then ``portals``
        (``"host[:port]"`` strings or :class:`Portal`), in order, at
        connect and at every reconnect. ``timeout`` bounds the login;
        ``reconnect_timeout`` how long reads wait for a lost target.
        """
        if isinstance(url, str):
            url = parse_iscsi_url(url, password=password)
        elif password is not None:
            url = dataclasses.replace(url, password=password)
        all_portals = [url.portal] + [
            p if isinstance(p, Portal) else parse_portal(p)
            for p in portals]
        if manifest_lun is not None and manifest_lun == url.lun:
            raise ValueError(f"manifest LUN {manifest_lun} is the image "
                             "LUN itself")
        session = IscsiSession(
            url.target, all_portals, url.lun, username=url.username,
            password=url.password, timeout=timeout,
            reconnect_timeout=reconnect_timeout, max_inflight=max_inflight,
            command_timeout=command_timeout, header_digest=header_digest,
            initiator_name=initiator_name)
        await session.connect()
        try:
            block_size, blocks = await asyncio.wait_for(
                session.read_capacity(url.lun), timeout)
            session.expected_capacity = (block_size, blocks)
            session.set_block_size(url.lun, block_size)
            manifest = None
            if manifest_lun is not None:
                manifest = await asyncio.wait_for(
                    _read_manifest(session, url.target, manifest_lun),
                    timeout)
                lun_size = block_size * blocks
                if not manifest.size <= lun_size < manifest.size + 512:
                    raise BlockError(
                        errno.EINVAL,
                        f"iSCSI LUN {url.target}/{url.lun}: LUN size "
                        f"{lun_size} disagrees with its manifest "
                        f"({manifest.size}, LUN {manifest_lun}); refusing "
                        "to serve it")
        except asyncio.TimeoutError:
            await session.close(0)
            raise BlockError(errno.ETIMEDOUT,
                             f"{session.describe()}: no answer within "
                             f"{timeout:g} s after login") from None
        except BaseException:
            await session.close(0)
            raise
        return cls(session, url, block_size, blocks,
                   max_transfer=max_transfer, manifest=manifest)

    def identity(self) -> str:
        if self.manifest is not None:
            return self.manifest.identity()
        return f"iscsi:{self.target}/{self.lun}:{self.lun_size}"

    def describe(self) -> str:
        return self.session.describe()

    def stats(self) -> dict:
        s = self.session.stats
        return {"bytes_read": self._bytes_read, "reads": self._reads,
                "commands": s["commands"], "reconnects": s["reconnects"],
                "retries": s["retries"], "reissued": s["reissued"],
                "in_flight": self.session.in_flight}

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        bs = self.block_size
        start = offset - offset % bs
        stop = -(-(offset + length) // bs) * bs
        buf = self._get_buffer(stop - start)
        view = memoryview(buf)
        await self._read_blocks(start, view, offset, length)
        # Only a read that finished puts its buffer back: after an error
        # or a cancellation the target may still be writing into it.
        data = bytes(view[offset - start:offset - start + length])
        view.release()
        self._put_buffer(buf)
        return data

    def _get_buffer(self, size: int) -> bytearray:
        """A receive buffer; reused, since fresh memory costs a page
        fault per 4 KiB (more than the copy out of it)."""
        free = self._buffers.get(size)
        if free:
            self._pooled -= size
            return free.pop()
        return bytearray(size)

    def _put_buffer(self, buf: bytearray) -> None:
        size = len(buf)
        if size <= MAX_POOLED_BUFFER and \
                self._pooled + size <= MAX_POOLED_BYTES:
            self._buffers.setdefault(size, []).append(buf)
            self._pooled += size

    async def read_into(self, offset: int, buffer) -> None:
        """Fill ``buffer`` (a writable bytearray or memoryview of one)
        from ``offset``; aligned ranges land there with no copy."""
        view = memoryview(buffer).cast("B")
        length = view.nbytes
        self.check_range(offset, length)
        if length == 0:
            return
        bs = self.block_size
        if offset % bs == 0 and length % bs == 0:
            await self._read_blocks(offset, view, offset, length)
            return
        view[:] = await self.read(offset, length)

    async def _read_blocks(self, start: int, view: memoryview,
                           offset: int, length: int) -> None:
        if self._closed:
            raise BlockError(errno.EIO, f"{self.describe()} is closed")
        bs = self.block_size
        total = view.nbytes
        step = self.max_transfer
        aws = []
        for pos in range(0, total, step):
            n = min(step, total - pos)
            aws.append(self.session.read_into(
                self.lun, (start + pos) // bs, view[pos:pos + n],
                f"read at offset {start + pos} length {n}"))
        self._reads += 1
        if len(aws) == 1:
            await aws[0]
        else:
            await asyncio.gather(*aws)
        self._bytes_read += length

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffers.clear()
            self._pooled = 0
            await self.session.close()


async def _read_manifest(session: IscsiSession, target: str,
                         lun: int) -> manifest_mod.Manifest:
    """The manifest on ``lun``: its header and page digests now and,
    for a version 2 manifest, the digest table lazily (only the pieces of
    the chunks this host fetches); a version 1 manifest is read whole."""
    where = f"manifest LUN {lun} of iSCSI target {target}"
    try:
        block_size, blocks = await session.read_capacity(lun)
    except BlockError as exc:
        raise BlockError(errno.EINVAL, f"cannot read the {where}: {exc}") \
            from None
    size = block_size * blocks
    if size > MAX_MANIFEST_BYTES:
        raise BlockError(errno.EINVAL, f"{where} is {size} bytes; a "
                         f"manifest is at most {MAX_MANIFEST_BYTES}")
    session.set_block_size(lun, block_size)

    async def read_lun(offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the LUN, widened to whole
        blocks and split into commands of at most DEFAULT_MAX_TRANSFER."""
        stop = min(offset + length, size)
        start = offset - offset % block_size
        end = -(-stop // block_size) * block_size
        buf = bytearray(end - start)
        view = memoryview(buf)
        step = max(DEFAULT_MAX_TRANSFER - DEFAULT_MAX_TRANSFER % block_size,
                   block_size)
        await asyncio.gather(*(
            session.read_into(lun, (start + pos) // block_size,
                              view[pos:pos + min(step, len(buf) - pos)],
                              f"{where} at offset {start + pos}")
            for pos in range(0, len(buf), step)))
        return bytes(view[offset - start:stop - start])

    try:
        head = manifest_mod.parse_header(
            await read_lun(0, min(size, manifest_mod.HEADER_BYTES)), where)
        if head is None:
            return manifest_mod.Manifest.from_bytes(await read_lun(0, size),
                                                    where=where)
        table_offset = head["table_offset"]
        if table_offset + head["table_bytes"] > size:
            raise manifest_mod.ManifestError(
                f"{where} is {size} bytes, too short for its digest table "
                f"({head['table_bytes']} bytes at {table_offset})")
        pages = await read_lun(head["pages_offset"], head["pages_bytes"])
        return manifest_mod.Manifest.lazy(
            head, pages, lambda off, n: read_lun(table_offset + off, n),
            where=where)
    except manifest_mod.ManifestError as exc:
        raise BlockError(errno.EINVAL, str(exc)) from None
