"""asyncio transport for the NBD server: sockets in, block devices out.

All protocol decisions are in server_protocol.py; this module moves bytes
between sockets and the protocol object, runs each request against the
export's block device, and keeps memory bounded (a server-wide budget of
bytes in flight; a client that does not read its replies stops being
read).
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
# Replies carrying at least this many bytes keep their request's budget
# until they are sent.
_CHARGE_UNTIL_SENT = 64 * 1024
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
    # A vmthunder.bench.trace.TraceRecorder when requests are traced.
    recorder: object = None

    def info(self) -> sp.ExportInfo:
        return sp.ExportInfo(
            name=self.name, size=self.device.size,
            read_only=self.read_only or
            not self.device.capabilities.writable,
            description=self.description,
            contexts=tuple(self.device.capabilities.contexts))


class NbdServer:
    def __init__(self, *, max_request: int = 32 * 1024 * 1024,
                 max_inflight: int = 64 * 1024 * 1024):
        self.max_request = max_request
        self.max_inflight = max_inflight
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

    # Budget of bytes in flight (requests being served and replies not
    # yet sent), shared by all connections. A request that does not fit
    # waits, unstarted, in its connection's queue, and that connection
    # stops reading; requests start again, oldest connection first, as
    # replies leave.

    def _admit(self, cost: int) -> bool:
        if self.inflight_bytes and \
                self.inflight_bytes + cost > self.max_inflight:
            return False
        self.inflight_bytes += cost
        return True

    def _defer(self, conn: NbdConnection) -> None:
        if conn not in self._throttled:
            self._throttled[conn] = None
            conn.throttle(True)

    def _release(self, nbytes: int) -> None:
        self.inflight_bytes -= nbytes
        if self._throttled and not self._admitting:
            self._admitting = True
            try:
                self._admit_waiting()
            finally:
                self._admitting = False

    def _admit_waiting(self) -> None:
        for conn in list(self._throttled):
            if not conn.start_deferred():
                return              # budget full: the rest wait too
            del self._throttled[conn]
            conn.throttle(False)


class NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer):
        self.server = server
        self.proto = sp.NbdServerProtocol(
            server._infos, max_request=server.max_request,
            default_export=server.default_export)
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

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (f"{peer[0]}:{peer[1]}"
                     if isinstance(peer, tuple) else "unix socket")
        transport.set_write_buffer_limits(high=8 * 1024 * 1024)
        self.server._connections.add(self)
        transport.write(self.proto.greeting())

    def data_received(self, data: bytes) -> None:
        out, events = self.proto.receive(data)
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
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
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
        if not self._tasks and not self._deferred:
            self._close_after_replies()

    # -- requests -----------------------------------------------------------

    def _start(self, req: sp.Request) -> None:
        cost = req.length if req.command in (c.CMD_READ, c.CMD_WRITE) else 0
        if self._deferred or not self.server._admit(cost):
            self._deferred.append((req, cost))
            self.server._defer(self)
            return
        self._run(req, cost)

    def start_deferred(self) -> bool:
        """Start waiting requests that fit the budget; True if none wait."""
        while self._deferred:
            req, cost = self._deferred[0]
            if not self.server._admit(cost):
                return False
            self._deferred.popleft()
            self._run(req, cost)
        if self._closing and not self._tasks:
            self._close_after_replies()
        return True

    def _run(self, req: sp.Request, cost: int) -> None:
        task = aio.start_eager(self._serve(req, cost))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._closing and not self._tasks and not self._deferred:
            self._close_after_replies()

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
        try:
            reply = await self._execute(req)
        except blockdev.BlockError as exc:
            LOG.debug("client %s: request %d failed: %s", self.peer,
                      req.command, exc)
            reply = self.proto.reply_error(
                req.handle, _WIRE_ERRORS.get(exc.errno, c.EIO), str(exc))
        except asyncio.CancelledError:
            self.server._release(cost)
            raise
        except Exception as exc:
            LOG.exception("client %s: request %d at offset %d failed",
                          self.peer, req.command, req.offset)
            reply = self.proto.reply_error(
                req.handle, c.EIO, f"internal error: {exc}")
        if recorder is not None:
            recorder.record(req.command, req.offset, req.length, issued)
        if self.transport is None or self.transport.is_closing():
            self.server._release(cost)
            return
        parts = reply if isinstance(reply, tuple) else (reply,)
        if cost < _CHARGE_UNTIL_SENT or isinstance(parts[-1], FileRange):
            # Small replies, and file ranges (no memory of ours), free the
            # budget now; the writer's own pressure bounds them.
            self.server._release(cost)
            self._send(*parts)
        else:
            # Large replies stay charged until they have left: queued
            # replies are memory too.
            self._send(*parts, sent=lambda: self.server._release(cost))

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
            may_send=lambda: not self.transport.get_write_buffer_size())

    def _send(self, *parts, sent=None) -> None:
        """Queue reply parts: bytes, or FileRanges when a writer runs."""
        if self._writer is not None:
            self._writer.write(*parts, sent=sent)
        else:
            # The transport's own flow control (pause_writing) bounds
            # what it buffers.
            self.transport.writelines(parts)
            if sent is not None:
                sent()

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
            # Advisory prefetch: pull the range into the cache below.
            await device.read(req.offset, req.length)
        elif cmd == c.CMD_BLOCK_STATUS:
            return await self._block_status(device, req)
        return self.proto.reply_ok(req.handle)

    async def _block_status(self, device, req: sp.Request) -> bytes:
        by_id = {}
        one = bool(req.flags & c.CMD_FLAG_REQ_ONE)
        for ctx_id, name in self.proto.contexts.items():
            extents = await device.block_status(req.offset, req.length, name)
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
