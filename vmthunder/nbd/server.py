"""asyncio transport for the NBD server: sockets in, block devices out.

All protocol decisions are in server_protocol.py; this module moves bytes
between sockets and the protocol object, runs each request against the
export's block device, and keeps memory bounded and shared fairly.

Memory budget (the rules the hostile-input tests hold us to):

- Every request is charged before it starts: reads their length, write
  payloads their length *before* the payload is read off the socket,
  CACHE one slice at a time, BLOCK_STATUS a fixed cost; the charge stays
  until the reply's bytes have left the socket (file ranges sent with
  sendfile cost nothing).
- Two caps: the server's (``max_inflight``) and each connection's
  (``max_inflight_per_client``). A connection over its own cap waits for
  its own replies to leave, so a client that does not read its replies
  only stops itself.
- A connection with nothing charged may always start one request of at
  most ``RESERVE_BYTES``, even past the server cap: however many clients
  hold the shared budget, another client's small read is answered.
- So the server holds at most max_inflight + max_connections x
  RESERVE_BYTES of request and reply data, plus one socket read
  (256 KiB) per connection.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import os
import socket

from vmthunder import aio
from vmthunder import blockdev
from vmthunder.nbd import constants as c
from vmthunder.nbd import server_protocol as sp
from vmthunder.nbd.address import Address
from vmthunder.nbd.writer import FileRange, ReplyWriter

LOG = logging.getLogger(__name__)

# errno values the NBD spec allows on the wire; anything else is EIO.
_WIRE_ERRORS = {errno.EPERM: c.EPERM, errno.EIO: c.EIO,
                errno.ENOMEM: c.ENOMEM, errno.EINVAL: c.EINVAL,
                errno.ENOSPC: c.ENOSPC, errno.EOVERFLOW: c.EOVERFLOW,
                errno.ENOTSUP: c.ENOTSUP, errno.ESHUTDOWN: c.ESHUTDOWN}
_MAX_EXTENTS = 4096
# A connection with nothing charged may start one request this large past
# the server's cap (see the module doc).
RESERVE_BYTES = 128 * 1024
# NBD_CMD_CACHE is served this much at a time, each slice charged.
CACHE_SLICE = 1024 * 1024
# What one BLOCK_STATUS is charged (its extents, before they are merged),
# and the most it describes at once (the spec lets a reply cover less
# than asked; clients ask again from where it ended).
BLOCK_STATUS_COST = 64 * 1024
BLOCK_STATUS_MAX = 64 * 1024 * 1024
# Reads at least this large are sent with sendfile(2) when the data is in
# a local file's page cache: no copy through Python. Smaller ones cost
# more in the residency check than the copy they save.
ZERO_COPY_MIN = 64 * 1024



@dataclasses.dataclass
class Export:
    name: str
    device: blockdev.BlockDevice
    read_only: bool
    description: str = ""
    # A vmthunder.trace.TraceRecorder when requests are traced.
    recorder: object = None

    def info(self) -> sp.ExportInfo:
        return sp.ExportInfo(
            name=self.name, size=self.device.size,
            read_only=self.read_only or
            not self.device.capabilities.writable,
            description=self.description,
            contexts=tuple(self.device.capabilities.contexts))


@dataclasses.dataclass(frozen=True)
class NbdLimits:
    """What one server lets its clients use (the [nbd] options)."""

    max_request: int = 32 * 1024 * 1024
    max_inflight: int = 64 * 1024 * 1024
    max_inflight_per_client: int = 16 * 1024 * 1024
    max_connections: int = 256
    # A write payload that is charged but has not all arrived this many
    # seconds later drops its connection: it holds budget others need.
    payload_timeout: float = 30.0

    @classmethod
    def from_conf(cls, nbd_conf) -> NbdLimits:
        return cls(max_request=nbd_conf.max_request_bytes,
                   max_inflight=nbd_conf.max_inflight_bytes,
                   max_inflight_per_client=min(
                       nbd_conf.max_inflight_per_client_bytes,
                       nbd_conf.max_inflight_bytes),
                   max_connections=nbd_conf.max_connections,
                   payload_timeout=nbd_conf.write_payload_timeout)


class NbdServer:
    """Serves ``exports`` to NBD clients.

    ``upload_limit`` (a vmthunder.ratelimit.RateLimit, shared by every
    connection): read replies wait their turn on it before they are
    queued, so the data sent to all clients together stays under its
    rate (the agent's peer server, [agent] peer_upload_rate). A read
    that would wait more than ``upload_max_wait`` seconds is refused at
    once with ENOTSUP ("not now": a peer reads the chunk elsewhere,
    before its own timeout would make it avoid this host).
    """

    def __init__(self, limits: NbdLimits = NbdLimits(), *,
                 upload_limit=None, upload_max_wait: float = 1.0):
        self.limits = limits
        self.upload_limit = upload_limit
        self.upload_max_wait = upload_max_wait
        # Bytes of read replies sent (all clients), reads refused because
        # the upload limit's queue was full.
        self.read_bytes = 0
        self.upload_refused = 0
        self.max_request = limits.max_request
        self.max_inflight = limits.max_inflight
        self.max_inflight_per_client = limits.max_inflight_per_client
        self.max_connections = limits.max_connections
        self.exports: dict[str, Export] = {}
        self._infos: dict[str, sp.ExportInfo] = {}
        self.default_export: str | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[NbdConnection] = set()
        self.inflight_bytes = 0
        # Connections with requests waiting for budget, oldest first.
        self._throttled: dict[NbdConnection, None] = {}
        self._admitting = False
        self.addresses: list[Address] = []

    def add_export(self, name: str, device: blockdev.BlockDevice, *,
                   read_only: bool = False, description: str = "") -> Export:
        if name in self.exports:
            raise ValueError(f"export {name!r} exists already")
        export = Export(name, device, read_only, description)
        self.exports[name] = export
        self._infos[name] = export.info()
        return export

    def remove_export(self, name: str) -> Export:
        self._infos.pop(name, None)
        export = self.exports.pop(name)
        for conn in list(self._connections):
            if conn.export is export:
                conn.abort(f"export {name!r} was removed")
        return export

    async def listen(self, address: Address) -> Address:
        """Start serving on ``address``; returns it with the real port."""
        if address.kind == "unix":
            if os.path.exists(address.path):
                # A stale socket from a killed server blocks bind().
                os.unlink(address.path)
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: NbdConnection(self), address.path)
            bound = address
        else:
            server = await asyncio.get_running_loop().create_server(
                lambda: NbdConnection(self), address.host, address.port,
                reuse_address=True)
            port = server.sockets[0].getsockname()[1]
            bound = Address("tcp", host=address.host, port=port)
        self._servers.append(server)
        self.addresses.append(bound)
        LOG.info("NBD server listening on %s (exports: %s)", bound,
                 ", ".join(repr(n) for n in self.exports) or "none")
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.abort("server shutting down")
        for server in self._servers:
            await server.wait_closed()
        for address in self.addresses:
            if address.kind == "unix":
                try:
                    os.unlink(address.path)
                except FileNotFoundError:
                    pass
        self._servers.clear()

    # The budget (module doc). Connections whose next request does not
    # fit wait, unstarted, oldest first, and stop being read; requests
    # start again as replies leave.

    def _admit(self, conn: NbdConnection, cost: int) -> str | None:
        """Charge ``cost`` to ``conn`` if the caps allow; None if they
        did, else which cap stopped it ("own" or "shared")."""
        if conn.charged:
            if conn.charged + cost > self.max_inflight_per_client:
                return "own"
            if self.inflight_bytes + cost > self.max_inflight:
                return "shared"
        elif self.inflight_bytes + cost > self.max_inflight \
                and cost > RESERVE_BYTES and self.inflight_bytes:
            return "shared"
        conn.charged += cost
        self.inflight_bytes += cost
        return None

    def _defer(self, conn: NbdConnection) -> None:
        if conn not in self._throttled:
            self._throttled[conn] = None
            conn.throttle(True)

    def _release(self, conn: NbdConnection, nbytes: int) -> None:
        conn.charged -= nbytes
        self.inflight_bytes -= nbytes
        if self._throttled and not self._admitting:
            self._admitting = True
            try:
                self._admit_waiting()
            finally:
                self._admitting = False

    def _admit_waiting(self) -> None:
        # Oldest first. A connection stopped by its own cap does not hold
        # up the others; one stopped by the shared cap does (so large
        # requests are not starved by small ones), except for requests
        # that fit the reserve of connections with nothing charged.
        shared_full = False
        for conn in list(self._throttled):
            if not conn.start_deferred(reserve_only=shared_full):
                if conn.blocked_by == "shared":
                    shared_full = True
                continue
            del self._throttled[conn]
            conn.throttle(False)


class NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer):
        self.server = server
        self.proto = sp.NbdServerProtocol(
            server._infos, max_request=server.max_request,
            default_export=server.default_export, gate_payloads=True)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.peer = "?"
        self._tasks: set[asyncio.Task] = set()
        # Reasons reading is paused: "budget" (server-wide bytes in
        # flight) and "writes" (the client is not reading its replies).
        self._pauses: set[str] = set()
        self._closing = False
        # Requests parsed but waiting for the in-flight budget.
        self._deferred: collections.deque = collections.deque()
        # Sends the replies once transmission starts (writer.py).
        self._writer: ReplyWriter | None = None
        # Bytes of the budget this connection holds (module doc), and
        # which cap stopped its oldest waiting request ("own"/"shared").
        self.charged = 0
        self.blocked_by: str | None = None
        # A write payload charged before it is read: its length, and the
        # timer that drops a client that never sends it.
        self._payload_charged = 0
        self._payload_timer: asyncio.TimerHandle | None = None
        # Bytes already read wait to be parsed (scheduled by
        # start_deferred): the connection does not close before.
        self._parse_pending = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (f"{peer[0]}:{peer[1]}"
                     if isinstance(peer, tuple) else "unix socket")
        if len(self.server._connections) >= self.server.max_connections:
            LOG.warning("refusing client %s: %d connections already "
                        "(max_connections)", self.peer,
                        len(self.server._connections))
            transport.abort()
            return
        transport.set_write_buffer_limits(high=8 * 1024 * 1024)
        self.server._connections.add(self)
        transport.write(self.proto.greeting())

    def data_received(self, data: bytes) -> None:
        while True:
            self._handle(*self.proto.receive(data))
            want = self.proto.awaiting_payload
            if not want or self._waiting_payload():
                return
            # A write's payload is charged before it is read off the
            # socket (the protocol leaves it unread until accepted).
            if self._deferred or not self._admit(want):
                self._deferred.append((None, want))
                self.server._defer(self)
                return
            self._payload_arrives(want)
            data = b""              # parse what it had buffered

    def _handle(self, out: bytes, events: list) -> None:
        if out:
            self._send(out)
        for event in events:
            if isinstance(event, sp.Request):
                self._start(event)
            elif isinstance(event, sp.Negotiated):
                self.export = self.server.exports.get(event.export.name)
                self._start_writer()
                LOG.info("client %s opened export %r (%s replies, "
                         "contexts %s)", self.peer, event.export.name,
                         "structured" if event.structured else "simple",
                         sorted(event.contexts.values()) or "none")
            elif isinstance(event, sp.Closed):
                log = LOG.warning if event.error else LOG.debug
                log("client %s: %s", self.peer, event.reason)
                self._close_when_done()

    def eof_received(self):
        self._close_when_done()
        return True

    def connection_lost(self, exc):
        self.server._connections.discard(self)
        self.server._throttled.pop(self, None)
        self._deferred.clear()
        if self._payload_charged:
            self._payload_done()
        for task in self._tasks:
            task.cancel()           # each gives its charge back
        if self._writer is not None:
            self._writer.close()    # gives back what it still queued
        LOG.debug("client %s disconnected", self.peer)

    def pause_writing(self):
        self.throttle(True, "writes")

    def resume_writing(self):
        self.throttle(False, "writes")

    # -- flow control -------------------------------------------------------

    def throttle(self, on: bool, reason: str = "budget") -> None:
        was_paused = bool(self._pauses)
        if on:
            self._pauses.add(reason)
        else:
            self._pauses.discard(reason)
        if self.transport is None or self.transport.is_closing():
            return
        if self._pauses and not was_paused:
            self.transport.pause_reading()
        elif was_paused and not self._pauses:
            self.transport.resume_reading()

    def abort(self, reason: str) -> None:
        LOG.info("closing connection of %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()

    def _close_when_done(self) -> None:
        # Let requests already read finish and send their replies first
        # (NBD_CMD_DISC asks for exactly that).
        self._closing = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._closing and not self._tasks and not self._deferred \
                and not self._parse_pending:
            self._close_after_replies()

    # -- requests -----------------------------------------------------------

    def _cost(self, req: sp.Request) -> int:
        cmd = req.command
        if cmd in (c.CMD_READ, c.CMD_WRITE):
            return req.length
        if cmd in (c.CMD_CACHE, c.CMD_WRITE_ZEROES):
            return min(req.length, CACHE_SLICE)
        if cmd == c.CMD_BLOCK_STATUS:
            return BLOCK_STATUS_COST
        return 0

    def _admit(self, cost: int) -> bool:
        """Charge ``cost`` if the caps allow (False: it must wait)."""
        self.blocked_by = self.server._admit(self, cost)
        return self.blocked_by is None

    def _start(self, req: sp.Request) -> None:
        if req.command == c.CMD_WRITE and self._payload_charged:
            # Its payload was charged before it was read.
            cost = self._payload_charged
            self._payload_done(release=False)
            self._run(req, cost)
            return
        cost = self._cost(req)
        if self._deferred or not self._admit(cost):
            self._deferred.append((req, cost))
            self.server._defer(self)
            return
        self._run(req, cost)

    def start_deferred(self, reserve_only: bool = False) -> bool:
        """Start waiting requests that fit the budget; True if none wait.
        ``reserve_only``: an older connection waits for the shared budget;
        only a request that fits this connection's reserve may start."""
        while self._deferred:
            req, cost = self._deferred[0]
            if reserve_only and (self.charged or cost > RESERVE_BYTES):
                self.blocked_by = "shared"
                return False
            if not self._admit(cost):
                return False
            self._deferred.popleft()
            if req is None:
                self._payload_arrives(cost)
                # Its bytes already read are parsed from the loop, not
                # from inside the budget's bookkeeping (and before the
                # connection may close: they may end with NBD_CMD_DISC).
                self._parse_pending = True
                asyncio.get_running_loop().call_soon(self._parse_buffered)
            else:
                self._run(req, cost)
        self._close_if_done()
        return True

    def _waiting_payload(self) -> bool:
        return bool(self._deferred) and self._deferred[-1][0] is None

    def _parse_buffered(self) -> None:
        self._parse_pending = False
        if self.transport is not None and not self.transport.is_closing():
            self.data_received(b"")
            self._close_if_done()

    def _payload_arrives(self, length: int) -> None:
        # Charged: read the payload, if it comes in time.
        self.proto.accept_payload()
        self._payload_charged = length
        timeout = self.server.limits.payload_timeout
        self._payload_timer = asyncio.get_running_loop().call_later(
            timeout, self.abort,
            f"the payload of a {length}-byte write did not arrive within "
            f"{timeout:g} s (write_payload_timeout)")

    def _payload_done(self, release: bool = True) -> None:
        if self._payload_timer is not None:
            self._payload_timer.cancel()
            self._payload_timer = None
        if release:
            self.server._release(self, self._payload_charged)
        self._payload_charged = 0

    def _run(self, req: sp.Request, cost: int) -> None:
        limit = self.server.upload_limit
        if req.command == c.CMD_READ and req.length < ZERO_COPY_MIN \
                and self.export.recorder is None \
                and (limit is None or not limit.backlog()):
            # Fast path: a small read the device has at hand is answered
            # here, as _serve would answer it, with no coroutine.
            try:
                data = self.export.device.read_now(req.offset, req.length)
            except Exception:                   # noqa: BLE001
                data = None         # _serve reports it as it should
            if data is not None:
                if self.transport is not None \
                        and not self.transport.is_closing():
                    self._send(self.proto.reply_read_header(
                        req.handle, req.offset, req.length), data)
                    self.server.read_bytes += req.length
                    if limit is not None:
                        limit.reserve(req.length)     # no backlog: no wait
                self.server._release(self, cost)
                return
        task = aio.start_eager(self._serve(req, cost))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._close_if_done()

    def _close_after_replies(self) -> None:
        if self.transport is None:
            return
        writer = self._writer
        if writer is not None and writer.queued_bytes and not writer.closed:
            writer.on_drained = self.transport.close
        else:
            self.transport.close()

    async def _serve(self, req: sp.Request, cost: int) -> None:
        recorder = self.export.recorder
        issued = recorder.issue() if recorder is not None else 0.0
        limit = self.server.upload_limit if req.command == c.CMD_READ \
            else None
        try:
            if limit is not None:
                self._upload_turn_near(limit)
            reply = await self._execute(req)
            if limit is not None:
                # The data waits here (charged to the budget) for its
                # turn under the upload limit.
                await limit.acquire(req.length)
        except blockdev.BlockError as exc:
            LOG.debug("client %s: request %d failed: %s", self.peer,
                      req.command, exc)
            reply = self.proto.reply_error(
                req.handle, _WIRE_ERRORS.get(exc.errno, c.EIO), str(exc))
        except asyncio.CancelledError:
            self.server._release(self, cost)
            raise
        except Exception as exc:
            LOG.exception("client %s: request %d at offset %d failed",
                          self.peer, req.command, req.offset)
            reply = self.proto.reply_error(
                req.handle, c.EIO, f"internal error: {exc}")
        if recorder is not None:
            recorder.record(req.command, req.offset, req.length, issued)
        if self.transport is None or self.transport.is_closing():
            self.server._release(self, cost)
            return
        # The reply's bytes take the place of the request's charge.
        if isinstance(reply, tuple):
            self._send(*reply)
            if req.command == c.CMD_READ:
                self.server.read_bytes += req.length
        else:
            self._send(reply)
        self.server._release(self, cost)

    def _upload_turn_near(self, limit) -> None:
        """Refuse a read whose reply would wait too long for the upload
        limit (the client reads it elsewhere)."""
        wait = limit.backlog()
        if wait > self.server.upload_max_wait:
            self.server.upload_refused += 1
            raise blockdev.BlockError(
                errno.ENOTSUP, f"upload limit of this host reached "
                f"({limit.rate * 8 / 1e6:g} Mbit/s, replies queued for "
                f"{wait:.1f} s): read it elsewhere")

    def _start_writer(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is None or self._writer is not None:
            return
        try:
            own = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as exc:
            LOG.warning("client %s: no zero-copy replies: %s", self.peer, exc)
            return
        self._writer = ReplyWriter(
            asyncio.get_running_loop(), own,
            on_error=self.abort,
            on_pressure=lambda on: self.throttle(on, "writes"),
            on_sent=lambda n: self.server._release(self, n),
            may_send=lambda: not self.transport.get_write_buffer_size())

    def _send(self, *parts) -> None:
        """Queue reply parts: bytes, or FileRanges when a writer runs."""
        writer = self._writer
        if writer is not None:
            if writer.closed:
                return              # the connection is gone: nothing to send
            # Queued bytes are charged until they have left (the writer's
            # on_sent gives them back); file ranges cost no memory of ours.
            held = 0
            for p in parts:
                if type(p) is not FileRange:
                    held += len(p)
            self.charged += held
            self.server.inflight_bytes += held
            writer.write(*parts)
        else:
            # Handshake, or no socket of our own: the transport's flow
            # control (pause_writing) bounds what it buffers.
            self.transport.writelines(parts)

    async def _execute(self, req: sp.Request):
        device = self.export.device
        cmd = req.command
        if cmd == c.CMD_READ:
            if req.length >= ZERO_COPY_MIN and self._writer is not None:
                extent = device.local_extent(req.offset, req.length)
                if extent is not None:
                    return (self.proto.reply_read_header(
                        req.handle, req.offset, req.length),
                        FileRange(extent[0], extent[1], req.length))
            parts = await device.read_parts(req.offset, req.length)
            got = sum(len(p) for p in parts)
            if got != req.length:
                # The reply header promises req.length bytes: sending
                # fewer would desynchronise the stream. Fail this request.
                raise blockdev.BlockError(
                    errno.EIO, f"{device.describe()} returned {got} "
                    f"of {req.length} bytes at offset {req.offset}")
            return (self.proto.reply_read_header(req.handle, req.offset,
                                                 req.length), *parts)
        fua = bool(req.flags & c.CMD_FLAG_FUA)
        if cmd == c.CMD_WRITE:
            await device.write(req.offset, req.data, fua=fua)
        elif cmd == c.CMD_FLUSH:
            await device.flush()
        elif cmd == c.CMD_TRIM:
            await device.trim(req.offset, req.length)
            if fua:
                await device.flush()
        elif cmd == c.CMD_WRITE_ZEROES:
            if req.flags & c.CMD_FLAG_FAST_ZERO:
                # We cannot promise zeroing is faster than writing.
                raise blockdev.BlockError(errno.ENOTSUP,
                                          "fast zero is not supported")
            await device.write_zeroes(req.offset, req.length, fua=fua)
        elif cmd == c.CMD_CACHE:
            # Advisory prefetch: pull the range into the cache below, a
            # slice at a time (the request is charged one slice).
            pos, end = req.offset, req.offset + req.length
            while pos < end:
                n = min(CACHE_SLICE, end - pos)
                await device.read(pos, n)
                pos += n
        elif cmd == c.CMD_BLOCK_STATUS:
            return await self._block_status(device, req)
        return self.proto.reply_ok(req.handle)

    async def _block_status(self, device, req: sp.Request) -> bytes:
        by_id = {}
        one = bool(req.flags & c.CMD_FLAG_REQ_ONE)
        # Describe at most BLOCK_STATUS_MAX (bounded work and memory);
        # clients ask again from where the reply ends.
        length = min(req.length, BLOCK_STATUS_MAX)
        for ctx_id, name in self.proto.contexts.items():
            extents = await device.block_status(req.offset, length, name)
            merged: list[list[int]] = []
            for ext in extents:
                if merged and merged[-1][1] == ext.flags:
                    merged[-1][0] += ext.length
                elif ext.length:
                    merged.append([ext.length, ext.flags])
            if one:
                merged = merged[:1]
            by_id[ctx_id] = [tuple(m) for m in merged[:_MAX_EXTENTS]]
        return self.proto.reply_block_status(req.handle, by_id)
