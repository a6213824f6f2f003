"""Asyncio NBD client and a block-device layer on top of it.

The protocol work is in :mod:`vmthunder.nbd.client_protocol` (no I/O);
this module only moves bytes between it and a socket:

* :func:`open_nbd` connects (TCP or unix socket), negotiates, and returns
  an :class:`NbdClient` that keeps any number of requests in flight on one
  connection (one future per handle).
* :func:`list_exports` asks a server for its export names.
* :class:`NbdSource` is a :class:`~vmthunder.blockdev.BlockDevice` reading
  (and, on a writable export, writing) an NBD export, splitting requests
  to the server's block size limits: an NBD peer or origin at the bottom
  of a layer stack.

Addresses are ``"tcp:HOST:PORT"`` (IPv6 as ``tcp:[::1]:PORT``) or
``"unix:PATH"``; :func:`open_nbd` also takes NBD URIs
(``nbd://host:port/export``, ``nbd+unix:///export?socket=PATH``, see
:func:`parse_nbd_uri`).

Errors: every request method raises :class:`~vmthunder.blockdev.BlockError`
(the server's errno, EINVAL for a bad range, EPERM for a write to a
read-only export); a lost or broken connection raises
:class:`NbdConnectionError`, a BlockError with errno EIO whose message
names the address. :func:`open_nbd` raises NbdConnectionError when it
cannot connect, :class:`NbdHandshakeError` when the server refuses the
export, :class:`NbdProtocolError` when the peer does not speak NBD.
"""

from __future__ import annotations

import asyncio
import errno
import os
import urllib.parse

from vmthunder.blockdev import (BASE_ALLOCATION, BlockDevice, BlockError,
                                Capabilities, Extent)
from vmthunder.nbd import client_protocol as cp
from vmthunder.nbd.address import Address, parse_address
from vmthunder.nbd.client_protocol import (ExportEntry, NbdError,
                                           NbdHandshakeError,
                                           NbdProtocolError, RemoteExport)

__all__ = [
    "DEFAULT_PORT", "NbdAddress", "NbdClient", "NbdConnectionError",
    "NbdError", "NbdHandshakeError", "NbdProtocolError", "NbdSource",
    "ExportEntry", "RemoteExport", "list_exports", "open_nbd",
    "parse_address", "parse_nbd_uri",
]

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 30.0
# Trim and write-zeroes carry no payload, but their length field is 32
# bits; larger ranges go in pieces of this size.
_MAX_NO_PAYLOAD = 1 << 30
# Block status queries at most this much per request.
_MAX_STATUS = 1 << 30


class NbdConnectionError(BlockError):
    """No connection, or the connection broke; the message names it."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)


# -- addresses ---------------------------------------------------------

# One address type for servers and clients (address.py).
NbdAddress = Address


def parse_nbd_uri(uri: str) -> tuple[str, str]:
    """Split an NBD URI into ``(address, export_name)``.

    ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default) gives
    ``("tcp:HOST:PORT", "EXPORT")``; ``nbd+unix:///EXPORT?socket=PATH``
    gives ``("unix:PATH", "EXPORT")``. The export name is percent-decoded;
    an empty path names the default export ``""``. TLS URIs (``nbds``) are
    refused: this client does not do TLS.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise ValueError(f"NBD URI {uri!r} asks for TLS, which this client "
                         f"does not support; use nbd:// or nbd+unix://")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith(
        "/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"NBD URI {uri!r} has no host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"NBD URI {uri!r} has a bad port") from None
        address = NbdAddress("tcp", host=parts.hostname, port=port)
        return str(address), export
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(f"NBD URI {uri!r}: nbd+unix:// takes no host "
                             f"(write nbd+unix:///EXPORT?socket=PATH)")
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ValueError(f"NBD URI {uri!r} has no ?socket=PATH")
        return f"unix:{sockets[0]}", export
    raise ValueError(f"not an NBD URI: {uri!r} (expected nbd:// or "
                     f"nbd+unix://)")


def _resolve(address: str | NbdAddress,
             export_name: str | None) -> tuple[NbdAddress, str]:
    if isinstance(address, str) and "://" in address:
        addr_text, uri_export = parse_nbd_uri(address)
        addr = parse_address(addr_text)
        return addr, uri_export if export_name is None else export_name
    return parse_address(address), export_name or ""


# -- transport ---------------------------------------------------------

class _Connection(asyncio.BufferedProtocol):
    """Moves bytes between a socket and an NbdClientProtocol.

    A buffered protocol: read payloads are received straight into the
    buffer of the request they answer (see NbdClientProtocol.get_buffer).
    """

    def __init__(self, proto: cp.NbdClientProtocol, address: NbdAddress):
        loop = asyncio.get_running_loop()
        self.proto = proto
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future = loop.create_future()
        self.lost: asyncio.Future = loop.create_future()
        self.pending: dict[int, asyncio.Future] = {}
        self.error: NbdConnectionError | None = None
        self.server_shutdown = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future] = []

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport       # the server speaks first

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is not None:
            return memoryview(bytearray(65536))     # drained and dropped
        return self.proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return
        try:
            events = self.proto.buffer_updated(nbytes)
        except NbdError as exc:
            self._broken(exc)
            return
        out = self.proto.data_to_send()
        if out:
            self.transport.write(out)
        for event in events:
            self._dispatch(event)

    def eof_received(self) -> bool:
        if self.error is None:
            try:
                self.proto.eof_received()
            except NbdError as exc:
                self._broken(exc)
        return False     # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            why = f": {exc}" if exc else " (closed)"
            self.error = NbdConnectionError(
                errno.EIO, f"connection to NBD server at {self.address} "
                f"lost{why}")
            if exc is not None:
                self.error.__cause__ = exc
        self._fail_all(self.fresh_error())
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # Helpers

    async def drain(self) -> None:
        if self._paused and self.error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _dispatch(self, event: cp.Event) -> None:
        if isinstance(event, (cp.HandshakeDone, cp.ExportList)):
            if not self.handshake.done():
                self.handshake.set_result(event)
            return
        fut = self.pending.pop(event.handle, None)
        if fut is not None and not fut.done():
            fut.set_result(event)
        if (isinstance(event, cp.RequestFailed)
                and event.errno == errno.ESHUTDOWN):
            # The spec wants a soft disconnect once the server says it is
            # shutting down.
            self.server_shutdown = True
        if self.server_shutdown and not self.pending:
            self.disconnect()

    def _broken(self, exc: NbdError) -> None:
        """The server broke the protocol or refused the handshake."""
        if isinstance(exc, NbdHandshakeError):
            first = NbdHandshakeError(
                f"NBD server at {self.address}: {exc}", exc.option,
                exc.reply, exc.server_message)
        else:
            first = type(exc)(f"NBD server at {self.address}: {exc}")
        self.error = NbdConnectionError(
            errno.EIO, f"NBD connection to {self.address} failed: {exc}")
        self.error.__cause__ = exc
        first.__cause__ = None
        self._fail_all(first)
        if self.transport is not None:
            self.transport.abort()

    def fresh_error(self) -> NbdConnectionError:
        """A new instance of the connection's error, to raise once."""
        exc = NbdConnectionError(self.error.errno, str(self.error))
        exc.__cause__ = self.error.__cause__
        return exc

    def _fail_all(self, handshake_exc: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(handshake_exc)
            # Whoever awaits it still gets it; nobody may be left to (a
            # handshake that timed out), and that is not worth a warning.
            self.handshake.exception()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.fresh_error())

    def disconnect(self) -> None:
        """Send NBD_CMD_DISC (once) and close our side."""
        if self.error is not None or self.transport is None:
            return
        if self.transport.is_closing():
            return
        try:
            wire = self.proto.disconnect()
        except (RuntimeError, NbdError):
            self.transport.abort()
            return
        self.transport.write(wire)
        self.transport.close()


async def _connect(address: NbdAddress, proto: cp.NbdClientProtocol,
                   timeout: float | None) -> tuple[_Connection, cp.Event]:
    loop = asyncio.get_running_loop()
    conn: _Connection | None = None

    def factory() -> _Connection:
        nonlocal conn
        conn = _Connection(proto, address)
        return conn

    async def run() -> cp.Event:
        try:
            if address.kind == "unix":
                await loop.create_unix_connection(factory, address.path)
            else:
                await loop.create_connection(factory, address.host,
                                             address.port)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
            # asyncio's strerror is "Connect call failed (...)"; the errno
            # text says why.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise NbdConnectionError(
                err, f"cannot connect to NBD server at {address}: "
                f"{reason}") from exc
        try:
            return await conn.handshake
        except BaseException:
            conn.transport.abort()
            raise

    try:
        event = await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        if conn is None or conn.transport is None:
            what = "connecting"
        elif not proto.greeting_received:
            # Typically a qemu-nbd without --shared=N, busy with another
            # client: the kernel accepts, the server says nothing.
            what = ("connected, but the server sent no NBD greeting (busy "
                    "with another client, or not an NBD server)")
        else:
            what = f"in the handshake, {proto.phase}"
        if conn is not None and conn.transport is not None:
            conn.transport.abort()
        raise NbdConnectionError(
            errno.ETIMEDOUT, f"timed out after {timeout} s with NBD server "
            f"at {address}: {what}") from None
    return conn, event


async def open_nbd(address: str | NbdAddress, export_name: str | None = None,
                   *, meta_contexts: tuple[str, ...] | list[str] = (),
                   structured: bool = True,
                   timeout: float | None = DEFAULT_TIMEOUT) -> NbdClient:
    """Connect to an NBD server and open one export.

    ``address`` is ``tcp:HOST:PORT``, ``unix:PATH`` or an NBD URI (whose
    export name is used unless ``export_name`` is given). ``timeout``
    bounds connecting and the handshake.
    """
    addr, name = _resolve(address, export_name)
    proto = cp.NbdClientProtocol(name, want_structured=structured,
                                 meta_contexts=meta_contexts)
    conn, event = await _connect(addr, proto, timeout)
    return NbdClient(conn, event.export)


async def list_exports(address: str | NbdAddress, *,
                       timeout: float | None = DEFAULT_TIMEOUT
                       ) -> list[ExportEntry]:
    """The exports a server lists (NBD_OPT_LIST), name and description."""
    addr, _ = _resolve(address, None)
    proto = cp.NbdClientProtocol(list_exports=True)
    conn, event = await _connect(addr, proto, timeout)
    # NBD_OPT_ABORT went out with the last reply; close our side.
    conn.transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)
    except asyncio.TimeoutError:
        conn.transport.abort()
    return list(event.exports)


# -- client ------------------------------------------------------------

class NbdClient:
    """One open NBD export; many requests in flight on one connection.

    Made by :func:`open_nbd`. Every request method is a coroutine; they
    may run concurrently. Lengths are limited to ``max_request`` bytes for
    read and write (split larger ones, or use :class:`NbdSource`).
    """

    def __init__(self, conn: _Connection, export: RemoteExport):
        self._conn = conn
        self._proto = conn.proto
        self.export = export
        self.address = str(conn.address)
        self.export_name = export.name
        self._closing = False

    # Negotiated facts.

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def read_only(self) -> bool:
        return self.export.read_only

    @property
    def contexts(self) -> tuple[str, ...]:
        """Metadata contexts the server agreed to."""
        return tuple(self.export.contexts)

    @property
    def min_block(self) -> int:
        return self.export.min_block

    @property
    def max_request(self) -> int:
        """Largest read or write one request may carry."""
        return self.export.max_block

    @property
    def closed(self) -> bool:
        return self._closing or self._conn.error is not None

    @property
    def in_flight(self) -> int:
        return len(self._conn.pending)

    def describe(self) -> str:
        return f"NBD export {self.export_name!r} at {self.address}"

    def __repr__(self) -> str:
        return f"<NbdClient {self.describe()} size={self.size}>"

    # Requests.

    def _check_open(self) -> None:
        if self._conn.error is not None:
            raise self._conn.fresh_error()
        if self._closing:
            raise NbdConnectionError(
                errno.EIO, f"{self.describe()}: the client is closed")
        if self._conn.server_shutdown:
            raise NbdConnectionError(
                errno.ESHUTDOWN,
                f"{self.describe()}: the server is shutting down")

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if (not isinstance(offset, int) or not isinstance(length, int)
                or offset < 0 or length < 0):
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: {what} offset={offset!r} "
                f"length={length!r}: both must be non-negative integers")
        if offset + length > self.size:
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: {what} offset={offset} "
                f"length={length} goes past the end of the export "
                f"(size {self.size})")

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise BlockError(errno.EPERM, f"{self.describe()} is read-only; "
                             f"cannot {what}")

    async def _submit(self, build, *args, payload=None) -> cp.Event:
        self._check_open()
        try:
            handle, wire = build(*args)
        except ValueError as exc:
            raise BlockError(errno.EINVAL,
                             f"{self.describe()}: {exc}") from None
        fut = asyncio.get_running_loop().create_future()
        self._conn.pending[handle] = fut
        self._conn.transport.write(wire)
        if payload is not None:
            # Right behind its header, without joining the two.
            self._conn.transport.write(payload)
        await self._conn.drain()
        event = await fut
        if isinstance(event, cp.RequestFailed):
            raise BlockError(event.errno,
                             f"{self.describe()}: {event.message}")
        return event

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (one NBD_CMD_READ)."""
        self._check_range("read", offset, length)
        if length == 0:
            return b""
        if length > self.max_request:
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: read length {length} is "
                f"larger than the server's maximum request "
                f"{self.max_request}; split it (NbdSource does)")
        event = await self._submit(self._proto.read, offset, length)
        return event.data

    async def read_into(self, offset: int,
                        buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` (writable) from ``offset`` (one NBD_CMD_READ).

        The data goes straight from the socket into ``buffer``; its
        contents are undefined if the read fails.
        """
        length = memoryview(buffer).nbytes
        self._check_range("read", offset, length)
        if length == 0:
            return
        if length > self.max_request:
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: read length {length} is "
                f"larger than the server's maximum request "
                f"{self.max_request}; split it (NbdSource does)")
        await self._submit(self._proto.read, offset, length, buffer)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset``; ``fua`` makes it durable first."""
        length = memoryview(data).nbytes
        self._check_range("write", offset, length)
        self._check_writable("write")
        if length == 0:
            return
        if length > self.max_request:
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: write length {length} "
                f"is larger than the server's maximum request "
                f"{self.max_request}; split it (NbdSource does)")
        use_fua = fua and self.export.can_fua
        await self._submit(self._proto.write_header, offset, length,
                           use_fua, payload=data)
        if fua and not use_fua:
            await self.flush()

    async def flush(self) -> None:
        """NBD_CMD_FLUSH; a no-op when the server does not offer it."""
        self._check_open()
        if self.export.can_flush:
            await self._submit(self._proto.flush)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_range("trim", offset, length)
        self._check_writable("trim")
        if not self.export.can_trim:
            raise BlockError(errno.ENOTSUP,
                             f"{self.describe()} does not support trim")
        if length == 0:
            return
        await self._submit(self._proto.trim, offset, length,
                           fua and self.export.can_fua)

    async def write_zeroes(self, offset: int, length: int,
                           fua: bool = False) -> None:
        self._check_range("write_zeroes", offset, length)
        self._check_writable("write zeroes")
        if not self.export.can_write_zeroes:
            raise BlockError(errno.ENOTSUP, f"{self.describe()} does not "
                             f"support write_zeroes")
        if length == 0:
            return
        await self._submit(self._proto.write_zeroes, offset, length,
                           fua and self.export.can_fua)

    async def block_status(self, offset: int, length: int,
                           context: str = BASE_ALLOCATION, *,
                           req_one: bool = False) -> list[Extent]:
        """Extents of ``context`` from ``offset`` on.

        The server may describe less than ``length`` (never more: longer
        answers are clipped); call again from where the extents end.
        """
        self._check_range("block_status", offset, length)
        context_id = self.export.contexts.get(context)
        if context_id is None:
            have = ", ".join(self.contexts) or "none"
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: meta context {context!r} "
                f"was not negotiated (negotiated: {have}); pass it in "
                f"meta_contexts when opening")
        if length == 0:
            return []
        event = await self._submit(self._proto.block_status, offset, length,
                                   req_one)
        extents = event.extents.get(context_id)
        if not extents:
            raise BlockError(
                errno.EIO, f"{self.describe()}: server answered block status "
                f"without extents for {context!r}")
        return extents

    def abort(self) -> None:
        """Drop the connection at once: requests in flight fail with
        NbdConnectionError, and no more reply data lands in the buffers
        of read_into() requests (give up on a slow server safely)."""
        self._closing = True
        if self._conn.transport is not None:
            self._conn.transport.abort()

    async def close(self, timeout: float = 10.0) -> None:
        """Wait for requests in flight, send NBD_CMD_DISC, close.

        Idempotent; after ``timeout`` seconds the connection is dropped
        whatever is still pending.
        """
        conn = self._conn
        if not self._closing:
            self._closing = True
            if conn.pending and conn.error is None:
                await asyncio.wait(list(conn.pending.values()),
                                   timeout=timeout)
            if conn.error is None:
                conn.disconnect()
            elif conn.transport is not None:
                conn.transport.abort()
        try:
            await asyncio.wait_for(asyncio.shield(conn.lost), timeout)
        except asyncio.TimeoutError:
            conn.transport.abort()
            await conn.lost

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


# -- block device layer ------------------------------------------------

def _pieces(offset: int, length: int, step: int):
    """(offset, length) pieces of at most ``step`` bytes."""
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n


class NbdSource(BlockDevice):
    """A block layer reading an NBD export (an origin or a peer).

    Capabilities follow the server: writable when the export is not
    read-only, block status for the contexts negotiated. Reads and writes
    larger than the server's maximum request are split (and sent
    concurrently); unaligned reads are widened to the server's minimum
    block size.
    """

    def __init__(self, client: NbdClient, *, own_client: bool = True):
        self.client = client
        self._own = own_client
        self.size = client.size
        contexts = tuple(client.contexts)
        if BASE_ALLOCATION not in contexts:
            contexts = (BASE_ALLOCATION,) + contexts
        self.capabilities = Capabilities(
            writable=not client.read_only,
            block_status=bool(client.contexts),
            contexts=contexts)
        self._stats = {"reads": 0, "bytes_read": 0, "writes": 0,
                       "bytes_written": 0, "requests": 0,
                       "block_status": 0}

    @classmethod
    async def open(cls, address: str | NbdAddress,
                   export_name: str | None = None, *,
                   meta_contexts: tuple[str, ...] | list[str] = (
                       BASE_ALLOCATION,),
                   timeout: float | None = DEFAULT_TIMEOUT) -> NbdSource:
        client = await open_nbd(address, export_name,
                                meta_contexts=meta_contexts, timeout=timeout)
        return cls(client)

    def describe(self) -> str:
        return self.client.describe()

    def stats(self) -> dict:
        return dict(self._stats, in_flight=self.client.in_flight)

    def _step(self) -> int:
        """Largest aligned piece for one read or write request."""
        align = self.client.min_block
        step = self.client.max_request
        return max(step - step % align, align)

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        align = self.client.min_block
        start = offset - offset % align
        stop = min(-(-(offset + length) // align) * align, self.size)
        pieces = list(_pieces(start, stop - start, self._step()))
        self._stats["reads"] += 1
        self._stats["requests"] += len(pieces)
        if len(pieces) == 1 and start == offset and stop == offset + length:
            data = await self.client.read(offset, length)
        else:
            # Every piece lands in place in one buffer; one copy out.
            buf = bytearray(stop - start)
            view = memoryview(buf)
            await asyncio.gather(*(
                self.client.read_into(o, view[o - start:o - start + n])
                for o, n in pieces))
            data = bytes(view[offset - start:offset - start + length])
        self._stats["bytes_read"] += length
        return data

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        length = view.nbytes
        self.check_range(offset, length)
        if self.client.read_only:
            raise BlockError(errno.EPERM, f"{self.describe()} is read-only")
        self._check_aligned("write", offset, length)
        if length == 0:
            return
        pieces = list(_pieces(offset, length, self._step()))
        self._stats["writes"] += 1
        self._stats["requests"] += len(pieces)
        await asyncio.gather(*(
            self.client.write(o, view[o - offset:o - offset + n], fua)
            for o, n in pieces))
        self._stats["bytes_written"] += length

    def _check_aligned(self, what: str, offset: int, length: int) -> None:
        align = self.client.min_block
        if align > 1 and (offset % align or (
                length % align and offset + length != self.size)):
            raise BlockError(
                errno.EINVAL, f"{self.describe()}: {what} offset={offset} "
                f"length={length} is not aligned to the server's minimum "
                f"block size {align}")

    def _no_payload_step(self) -> int:
        align = self.client.min_block
        return _MAX_NO_PAYLOAD - _MAX_NO_PAYLOAD % align

    async def write_zeroes(self, offset: int, length: int,
                           fua: bool = False) -> None:
        self.check_range(offset, length)
        if self.client.read_only:
            raise BlockError(errno.EPERM, f"{self.describe()} is read-only")
        self._check_aligned("write_zeroes", offset, length)
        if length == 0:
            return
        if self.client.export.can_write_zeroes:
            pieces = list(_pieces(offset, length, self._no_payload_step()))
            await asyncio.gather(*(self.client.write_zeroes(o, n, fua)
                                   for o, n in pieces))
        else:
            step = self._step()
            zeroes = memoryview(bytes(min(step, length)))
            for o, n in _pieces(offset, length, step):
                await self.client.write(o, zeroes[:n], fua)
        self._stats["requests"] += 1

    async def trim(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        export = self.client.export
        if length == 0 or export.read_only or not export.can_trim:
            return           # trim is advice
        align = self.client.min_block
        start = -(-offset // align) * align      # shrink to aligned blocks
        stop = (offset + length) // align * align
        if stop <= start:
            return
        await asyncio.gather(*(
            self.client.trim(o, n)
            for o, n in _pieces(start, stop - start,
                                self._no_payload_step())))

    async def flush(self) -> None:
        await self.client.flush()

    async def block_status(self, offset: int, length: int,
                           context: str = BASE_ALLOCATION) -> list[Extent]:
        self.check_range(offset, length)
        if context not in self.client.export.contexts:
            return await super().block_status(offset, length, context)
        if length == 0:
            return []
        self._stats["block_status"] += 1
        align = self.client.min_block
        end = offset + length
        covered = offset          # described up to here
        result: list[Extent] = []
        while covered < end:
            # Ask from the aligned block that holds ``covered``.
            pos = covered - covered % align
            want = min(-(-(end - pos) // align) * align, self.size - pos,
                       _MAX_STATUS)
            self._stats["requests"] += 1
            extents = await self.client.block_status(pos, want, context)
            before = covered
            for ext in extents:
                lo, hi = max(pos, covered), min(pos + ext.length, end)
                if hi > lo:
                    if result and result[-1].flags == ext.flags:
                        last = result.pop()
                        result.append(Extent(last.length + hi - lo,
                                             ext.flags))
                    else:
                        result.append(Extent(hi - lo, ext.flags))
                    covered = hi
                pos += ext.length
                if covered >= end:
                    break
            if covered == before:
                raise BlockError(
                    errno.EIO, f"{self.describe()}: block status for "
                    f"{context!r} at offset {covered} made no progress")
        return result

    async def close(self) -> None:
        if self._own:
            await self.client.close()
