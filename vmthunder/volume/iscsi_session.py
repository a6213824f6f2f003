"""One iSCSI session, driven by libiscsi from the asyncio loop.

Compute hosts like the ones this project is built on have no kernel iSCSI
initiator, so a LUN is read with libiscsi (the library QEMU uses, through
:mod:`vmthunder.volume.libiscsi`) driven from the asyncio loop: no thread
does I/O and nothing blocks the loop.

:class:`IscsiSession` is one logged-in session to a target, with many
SCSI commands in flight (bounded), and the recovery policy: when the
connection drops (target restarted, network cut) commands in flight and
new ones wait while the portals are tried again in order, for up to
``reconnect_timeout`` seconds; then they are re-issued on the new session
and complete with the right data. If no portal comes back in time, they
fail with EIO and a message saying so.

Errors are :class:`~vmthunder.blockdev.BlockError`: ``ECONNREFUSED``/
``EHOSTUNREACH``/``ETIMEDOUT`` when no portal answers (the message names
every portal tried), ``EACCES`` when the login is refused for bad CHAP
credentials, ``ENOENT`` for an unknown target or LUN, ``EIO`` for SCSI
errors and a target that did not come back (the message names target and
offset).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import re
import socket
import time

from vmthunder.blockdev import BlockError
from vmthunder.volume import libiscsi
from vmthunder.volume.iscsi_url import Portal

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT_TIMEOUT = 60.0
DEFAULT_MAX_INFLIGHT = 32
# Reads longer than this go to the target as several READ commands
# (IscsiSource's max_transfer; the manifest reader).
DEFAULT_MAX_TRANSFER = 1 << 20
# A SCSI command the target has not answered after this long counts as a
# dead connection (reconnect and re-issue): what finds a hung target that
# keeps its TCP connection open. 0 disables. libiscsi counts whole
# seconds, so N means between N-1 and N+1 s.
DEFAULT_COMMAND_TIMEOUT = 30
DEFAULT_INITIATOR = "iqn.2024-01.org.vmthunder.initiator"
# How often a command hit by UNIT ATTENTION is retried, and one re-issued
# after a lost connection, before it fails.
MAX_RETRIES = 8
MAX_REISSUES = 16


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
        # {lun: (block size, blocks)} checked after every reconnect: a
        # different LUN behind the same name must not be read as if it
        # were the old one, and a LUN not back yet (a target being set up
        # again one LUN at a time) is waited for, not read.
        self.expected_capacities: dict[int, tuple[int, int]] = {}
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
            if self.expected_capacities:
                try:
                    for lun, want in self.expected_capacities.items():
                        await self._verify_capacity(conn, portal, lun, want)
                except BlockError as exc:
                    LOG.debug("%s", exc)
                    conn.close()
                    errors.append(exc)
                    if exc.errno == errno.ESTALE:
                        raise
                    continue
            self.portal = portal
            return conn, errors
        return None, errors

    async def _verify_capacity(self, conn: _Conn, portal: Portal, lun: int,
                               want: tuple[int, int]) -> None:
        """After a reconnect: is ``lun`` back, and still the LUN we were
        reading (``want``: its block size and blocks)?"""
        for _ in range(MAX_RETRIES + 1):
            got = await self._read_capacity_on(conn, portal, lun)
            if got is not _UNIT_ATTENTION:
                break
            # A LUN added or reset reports UNIT ATTENTION once to each new
            # login; libiscsi's connect clears it for the login's own LUN
            # only.
        else:
            raise BlockError(errno.EIO, f"{self._at(portal)}: LUN {lun} "
                             "answers READ CAPACITY with UNIT ATTENTION "
                             "again and again")
        if conn.closed:
            raise BlockError(errno.EIO, f"{self._at(portal)}: connection "
                             "lost after login")
        if got != want:
            raise BlockError(
                errno.ESTALE,
                f"{self._at(portal)}: LUN {lun} changed while "
                f"reconnecting (was {want[1]} blocks of {want[0]} bytes, "
                f"now {got[1]} of {got[0]}); refusing to read a different "
                "volume")

    async def _read_capacity_on(self, conn: _Conn, portal: Portal,
                                lun: int):
        """READ CAPACITY(16) of ``lun`` on ``conn`` (not through the
        command queue: the connection is not in use yet); its
        ``(block_size, blocks)``, or _UNIT_ATTENTION."""
        fut = self._loop.create_future()

        def done(status, task):
            try:
                if status == libiscsi.STATUS_CHECK_CONDITION and task and \
                        libiscsi.task_struct(task).sense.key \
                        == libiscsi.SENSE_UNIT_ATTENTION:
                    result = _UNIT_ATTENTION
                else:
                    result = _capacity_result(status, task)
            finally:
                libiscsi.Context.free_task(task)
            if not fut.done():
                if isinstance(result, BlockError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

        try:
            conn.ctx.readcapacity16(lun, done)
        except libiscsi.LibiscsiError as exc:
            raise BlockError(errno.EIO, f"{self._at(portal)}: {exc}") \
                from None
        conn.update()
        try:
            return await asyncio.wait_for(asyncio.shield(fut),
                                          max(self.timeout, 1.0))
        except asyncio.TimeoutError:
            fut.cancel()
            raise BlockError(errno.ETIMEDOUT, f"{self._at(portal)}: no "
                             f"answer to READ CAPACITY of LUN {lun}") \
                from None

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

    def set_block_size(self, lun: int, block_size: int,
                       blocks: int | None = None) -> None:
        """READ(16) of ``lun`` needs its block size (READ CAPACITY). With
        ``blocks`` (its capacity), the LUN is checked after every
        reconnect: waited for until it is back, refused if it changed."""
        self._block_sizes[lun] = block_size
        if blocks is not None:
            self.expected_capacities[lun] = (block_size, blocks)

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


# What _read_capacity_on returns for a UNIT ATTENTION (asked again).
_UNIT_ATTENTION = object()


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
