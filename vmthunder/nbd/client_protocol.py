"""NBD client side of the protocol, sans I/O.

:class:`NbdClientProtocol` never touches a socket. The transport feeds it
what the server sent (:meth:`~NbdClientProtocol.receive_data`) and gets
back immutable events; it sends whatever
:meth:`~NbdClientProtocol.data_to_send` returns during the handshake and
the bytes the request builders (:meth:`~NbdClientProtocol.read`,
:meth:`~NbdClientProtocol.write`, ...) return afterwards.

Everything the server sends is checked before it turns into an event: a
wrong magic, a reply to a handle that is not in flight, a chunk outside the
range that was asked for, a length the reply cannot have. Any of these
raises :class:`NbdProtocolError`; the connection is then unusable and the
transport must drop it. Data from a broken reply never reaches the caller.

The work is split by job:

- :mod:`vmthunder.nbd.client_handshake`: option negotiation, from the
  greeting to the export (the option order is there);
- this module: feeding the bytes in, then transmission: building and
  checking requests, framing replies and matching them to requests,
  streaming read data into the request's buffer;
- :mod:`vmthunder.nbd.client_replies`: one request in flight and the
  assembly of its reply from structured chunks;
- :mod:`vmthunder.nbd.client_events`: the events, values and errors
  (importable from here too).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from vmthunder.nbd import constants as c
from vmthunder.nbd import wire
from vmthunder.nbd.client_events import (BlockStatusDone, Done, Event,
                                         ExportEntry, ExportList,
                                         HandshakeDone, NbdError,
                                         NbdHandshakeError, NbdProtocolError,
                                         ReadDone, RemoteExport,
                                         RequestFailed, command_name,
                                         describe_errno, errno_from_wire,
                                         option_name)
from vmthunder.nbd.client_handshake import MAX_OPTION_REPLY, ClientHandshake
from vmthunder.nbd.client_replies import (MAX_BLOCK_STATUS_CHUNK,
                                          MAX_ERROR_CHUNK, PendingRequest)
from vmthunder.nbd.wire import U32_MAX, U64_MAX

__all__ = [
    "BlockStatusDone", "Done", "Event", "ExportEntry", "ExportList",
    "HandshakeDone", "MAX_BLOCK_STATUS_CHUNK", "MAX_ERROR_CHUNK",
    "MAX_OPTION_REPLY", "NbdClientProtocol", "NbdError",
    "NbdHandshakeError", "NbdProtocolError", "ReadDone", "RemoteExport",
    "RequestFailed", "SCRATCH_SIZE", "command_name", "describe_errno",
    "errno_from_wire", "option_name",
]

# Receive buffer get_buffer() hands out outside read payloads.
SCRATCH_SIZE = 256 * 1024

# Used per request: bound here, not imported by name (see wire).
REQUEST = wire.REQUEST
SIMPLE_REPLY = wire.SIMPLE_REPLY
STRUCTURED_REPLY = wire.STRUCTURED_REPLY
U32 = wire.U32
U64 = wire.U64


class _State(enum.Enum):
    HANDSHAKE = "handshake"              # ClientHandshake says where
    TRANSMISSION = "transmission"
    FINISHED = "finished"


def _check_u64(what: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{what} must be an integer in [0, 2**64), "
                         f"got {value!r}")


class NbdClientProtocol:
    """The client half of one NBD connection, without I/O.

    ``export_name`` is the export to open (``""`` is the default export);
    ``want_structured`` asks for structured replies (needed for block
    status and sparse reads); ``meta_contexts`` are the metadata contexts
    to negotiate (e.g. ``("base:allocation",)``). With ``list_exports``
    the protocol only lists the server's exports.

    Usage: feed bytes with :meth:`receive_data`, send
    :meth:`data_to_send` after each call during the handshake. After
    :class:`HandshakeDone`, build requests with :meth:`read`,
    :meth:`write`, ... (each returns ``(handle, wire_bytes)``) and match
    the events to the handles.
    """

    def __init__(self, export_name: str = "", want_structured: bool = True,
                 meta_contexts: tuple[str, ...] | list[str] = (), *,
                 list_exports: bool = False):
        self._out = bytearray()
        self._handshake = ClientHandshake(export_name, want_structured,
                                          meta_contexts, list_exports,
                                          self._out)
        self.export_name = export_name
        self.want_structured = self._handshake.want_structured
        self.meta_contexts = self._handshake.meta_contexts
        self.list_mode = self._handshake.list_mode

        self._state = _State.HANDSHAKE
        self._failed: NbdError | None = None
        self._buf = bytearray()
        self.export: RemoteExport | None = None
        self._structured = False

        # Transmission.
        self._next_handle = 1
        self._inflight: dict[int, PendingRequest] = {}
        self._disconnected = False
        # Current reply being received.
        self._sink: PendingRequest | None = None  # data goes to its buffer
        self._sink_at = 0                       # position in that buffer
        self._sink_left = 0
        self._sink_handle = 0
        self._sink_done = False                 # DONE flag on the chunk
        self._sink_simple = False
        self._into_sink = False                 # get_buffer gave the sink
        self._scratch: memoryview | None = None

    # -- public state ---------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self.export is not None

    @property
    def greeting_received(self) -> bool:
        return (self._state is not _State.HANDSHAKE
                or self._handshake.greeting_received)

    @property
    def phase(self) -> str:
        """Where the connection is, for messages ("negotiating options
        (NBD_OPT_GO)", "transmission", ...)."""
        if self._state is _State.HANDSHAKE:
            return self._handshake.phase
        return self._state.value

    @property
    def size(self) -> int:
        return self._require_export().size

    @property
    def flags(self) -> int:
        return self._require_export().flags

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) block size."""
        e = self._require_export()
        return (e.min_block, e.preferred_block, e.max_block)

    @property
    def contexts(self) -> Mapping[str, int]:
        return self._require_export().contexts

    @property
    def structured_replies(self) -> bool:
        return self._require_export().structured_replies

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def data_to_send(self) -> bytes:
        """Bytes the handshake wants sent; empty when there are none."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- input ----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview
                     ) -> list[Event]:
        """Take bytes from the server; return the events they complete.

        Raises :class:`NbdProtocolError` (or :class:`NbdHandshakeError`
        during the handshake); after that every call raises it again.
        """
        if self._failed is not None:
            raise self._failed
        events: list[Event] = []
        if not data:
            return events
        try:
            if self._buf:
                # A partial message is waiting: append and go on from it.
                self._buf += data
                view = memoryview(self._buf)
                try:
                    pos = self._process(view, events)
                finally:
                    view.release()
                del self._buf[:pos]   # O(1) at the front of a bytearray
            else:
                # Common case: parse straight from the caller's buffer and
                # copy only an incomplete tail.
                view = memoryview(data).cast("B")
                try:
                    pos = self._process(view, events)
                    if pos < len(view):
                        self._buf = bytearray(view[pos:])
                finally:
                    view.release()
        except NbdError as exc:
            self._fail(exc)
            raise
        return events

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer for the next bytes from the server (zero-copy input).

        The ``asyncio.BufferedProtocol`` way of feeding the protocol: the
        transport receives into this buffer, then calls
        :meth:`buffer_updated` with the byte count. While read data is
        expected, the buffer is the very place in the request's result
        where it belongs, so payload bytes are copied once, by the kernel.
        """
        if self._failed is None and self._sink is not None \
                and not self._buf:
            self._into_sink = True
            at = self._sink_at
            return self._sink.view[at:at + self._sink_left]
        self._into_sink = False
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH_SIZE))
        return self._scratch

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` arrived in the buffer :meth:`get_buffer` returned."""
        if self._failed is not None:
            raise self._failed
        if not self._into_sink:
            return self.receive_data(self._scratch[:nbytes])
        self._into_sink = False
        events: list[Event] = []
        self._sink_at += nbytes
        self._sink_left -= nbytes
        if self._sink_left == 0:
            try:
                self._end_sink(events)
            except NbdError as exc:
                self._fail(exc)
                raise
        return events

    def eof_received(self) -> None:
        """The server closed the connection.

        Raises the error that explains it if that was not a clean end
        (during the handshake, in the middle of a reply, or with requests
        in flight).
        """
        if self._failed is not None:
            raise self._failed
        state = self._state
        if state is _State.FINISHED:
            return
        if state is _State.HANDSHAKE:
            exc: NbdError = self._handshake.eof_error()
        elif self._buf or self._sink is not None:
            exc = NbdProtocolError(
                "server closed the connection in the middle of a reply")
        elif self._inflight:
            exc = NbdProtocolError(
                f"server closed the connection with "
                f"{len(self._inflight)} request(s) in flight")
        elif self._disconnected:
            self._state = _State.FINISHED
            return
        else:
            exc = NbdProtocolError("server closed the connection")
        self._fail(exc)
        raise exc

    def _fail(self, exc: NbdError) -> None:
        self._failed = exc
        self._sink = None
        self._buf = bytearray()

    # -- requests -------------------------------------------------------

    def read(self, offset: int, length: int,
             into: bytearray | memoryview | None = None
             ) -> tuple[int, bytes]:
        """NBD_CMD_READ; the reply is :class:`ReadDone` with the data.

        With ``into`` (a writable buffer of exactly ``length`` bytes) the
        data is assembled there instead and the reply is :class:`Done`;
        the buffer's contents are undefined if the read fails.
        """
        export = self._check_request("read", offset, length)
        if length > export.max_block:
            raise ValueError(
                f"read length {length} exceeds the server's maximum block "
                f"size {export.max_block}; split the request")
        view = None
        if into is not None:
            view = memoryview(into).cast("B")
            if view.readonly or view.nbytes != length:
                view.release()
                raise ValueError(
                    f"read buffer must be writable and exactly {length} "
                    f"bytes long")
        handle, wire = self._request(c.CMD_READ, 0, offset, length)
        if view is not None:
            pending = self._inflight[handle]
            pending.view = view
            pending.into = True
        return handle, wire

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False) -> tuple[int, bytes]:
        """NBD_CMD_WRITE of ``data``; the bytes returned hold the data."""
        handle, header = self.write_header(offset, memoryview(data).nbytes,
                                           fua)
        return handle, b"".join((header, data))

    def write_header(self, offset: int, length: int,
                     fua: bool = False) -> tuple[int, bytes]:
        """The header of an NBD_CMD_WRITE of ``length`` bytes.

        For senders that avoid copying the payload: send exactly
        ``length`` bytes of data right after this header.
        """
        export = self._check_request("write", offset, length)
        if export.read_only:
            raise ValueError(f"export {self.export_name!r} is read-only")
        if length > export.max_block:
            raise ValueError(
                f"write length {length} exceeds the server's maximum block "
                f"size {export.max_block}; split the request")
        flags = self._fua_flag(export, fua)
        return self._request(c.CMD_WRITE, flags, offset, length)

    def flush(self) -> tuple[int, bytes]:
        export = self._require_transmission()
        if not export.can_flush:
            raise ValueError(f"export {self.export_name!r} does not support "
                             f"flush (no NBD_FLAG_SEND_FLUSH)")
        return self._request(c.CMD_FLUSH, 0, 0, 0)

    def trim(self, offset: int, length: int,
             fua: bool = False) -> tuple[int, bytes]:
        export = self._check_request("trim", offset, length)
        if export.read_only:
            raise ValueError(f"export {self.export_name!r} is read-only")
        if not export.can_trim:
            raise ValueError(f"export {self.export_name!r} does not support "
                             f"trim (no NBD_FLAG_SEND_TRIM)")
        flags = self._fua_flag(export, fua)
        return self._request(c.CMD_TRIM, flags, offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> tuple[int, bytes]:
        export = self._check_request("write_zeroes", offset, length)
        if export.read_only:
            raise ValueError(f"export {self.export_name!r} is read-only")
        if not export.can_write_zeroes:
            raise ValueError(
                f"export {self.export_name!r} does not support write_zeroes "
                f"(no NBD_FLAG_SEND_WRITE_ZEROES)")
        flags = self._fua_flag(export, fua)
        if no_hole:
            flags |= c.CMD_FLAG_NO_HOLE
        return self._request(c.CMD_WRITE_ZEROES, flags, offset, length)

    def block_status(self, offset: int, length: int,
                     req_one: bool = False) -> tuple[int, bytes]:
        """Ask for the extents of every negotiated context."""
        export = self._check_request("block_status", offset, length)
        if not export.contexts:
            raise ValueError(
                f"no metadata context was negotiated with the server for "
                f"export {self.export_name!r}; block status is unavailable")
        flags = c.CMD_FLAG_REQ_ONE if req_one else 0
        return self._request(c.CMD_BLOCK_STATUS, flags, offset, length)

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: no reply comes; send nothing after it."""
        self._require_transmission()
        handle = self._alloc_handle()
        self._disconnected = True
        return REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_DISC, handle, 0, 0)

    def _fua_flag(self, export: RemoteExport, fua: bool) -> int:
        if not fua:
            return 0
        if not export.can_fua:
            raise ValueError(f"export {self.export_name!r} does not support "
                             f"FUA (no NBD_FLAG_SEND_FUA)")
        return c.CMD_FLAG_FUA

    def _require_export(self) -> RemoteExport:
        if self.export is None:
            raise RuntimeError("the NBD handshake has not completed")
        return self.export

    def _require_transmission(self) -> RemoteExport:
        if self._failed is not None:
            raise self._failed
        export = self._require_export()
        if self._disconnected:
            raise RuntimeError("NBD_CMD_DISC was sent; the connection "
                               "takes no more requests")
        return export

    def _check_request(self, what: str, offset: int,
                       length: int) -> RemoteExport:
        export = self._require_transmission()
        _check_u64(f"{what} offset", offset)
        if not isinstance(length, int) or not 1 <= length <= U32_MAX:
            raise ValueError(f"{what} length must be an integer in "
                             f"[1, 2**32), got {length!r}")
        if offset + length > export.size:
            raise ValueError(
                f"{what} offset={offset} length={length} goes past the end "
                f"of export {self.export_name!r} (size {export.size})")
        align = export.min_block
        if align > 1 and (offset % align or (
                length % align and offset + length != export.size)):
            raise ValueError(
                f"{what} offset={offset} length={length} is not aligned to "
                f"the server's minimum block size {align}")
        return export

    def _alloc_handle(self) -> int:
        handle = self._next_handle
        while handle in self._inflight or handle == 0:
            handle = (handle + 1) & U64_MAX
        self._next_handle = (handle + 1) & U64_MAX
        return handle

    def _request(self, command: int, flags: int, offset: int,
                 length: int) -> tuple[int, bytes]:
        handle = self._alloc_handle()
        self._inflight[handle] = PendingRequest(command, offset, length, flags)
        return handle, REQUEST.pack(c.REQUEST_MAGIC, flags, command, handle,
                                    offset, length)

    # -- handshake ------------------------------------------------------

    def _end_handshake(self) -> None:
        export = self._handshake.export
        if export is None:                # the exports were listed
            self._state = _State.FINISHED
            return
        self.export = export
        self._structured = export.structured_replies
        self._state = _State.TRANSMISSION

    # -- parsing --------------------------------------------------------

    def _process(self, view: memoryview, events: list[Event]) -> int:
        """Parse as much of ``view`` as is complete; return bytes used."""
        pos = 0
        end = len(view)
        while pos < end:
            state = self._state
            if state is _State.TRANSMISSION:
                if self._sink is not None:
                    pos = self._feed_sink(view, pos, end, events)
                    continue
                used = self._parse_reply(view, pos, end, events)
            elif state is _State.HANDSHAKE:
                used = self._handshake.receive(view, pos, end, events)
                if self._handshake.done:
                    self._end_handshake()
            else:
                # FINISHED: the ack to NBD_OPT_ABORT, or trailing bytes
                # after the end; nothing to act on.
                return end
            if not used:
                break
            pos += used
        return pos

    def _lookup(self, handle: int, what: str) -> PendingRequest:
        pending = self._inflight.get(handle)
        if pending is None:
            raise NbdProtocolError(
                f"server sent a {what} for handle {handle:#x}, which is not "
                f"a request in flight")
        return pending

    def _parse_reply(self, view: memoryview, pos: int, end: int,
                     events: list[Event]) -> int:
        if end - pos < 4:
            return 0
        (magic,) = U32.unpack_from(view, pos)
        if magic == c.SIMPLE_REPLY_MAGIC:
            return self._parse_simple(view, pos, end, events)
        if magic == c.STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise NbdProtocolError(
                    "server sent a structured reply although structured "
                    "replies were not negotiated")
            return self._parse_chunk(view, pos, end, events)
        raise NbdProtocolError(
            f"bad reply magic {magic:#010x} (expected simple "
            f"{c.SIMPLE_REPLY_MAGIC:#010x} or structured "
            f"{c.STRUCTURED_REPLY_MAGIC:#010x})")

    def _parse_simple(self, view: memoryview, pos: int, end: int,
                      events: list[Event]) -> int:
        if end - pos < SIMPLE_REPLY.size:
            return 0
        _, error, handle = SIMPLE_REPLY.unpack_from(view, pos)
        pending = self._lookup(handle, "simple reply")
        if pending.command == c.CMD_READ and self._structured:
            raise NbdProtocolError(
                f"server sent a simple reply to {pending.describe()} "
                f"although structured replies were negotiated")
        if error:
            self._finish_error(handle, pending, errno_from_wire(error),
                               "", events)
        elif pending.command == c.CMD_READ:
            # The data follows: stream it into the request's buffer.
            self._start_sink(handle, pending, 0, pending.length,
                             done=True, simple=True)
            if pending.length == 0:   # pragma: no cover - length >= 1
                self._end_sink(events)
        elif pending.command == c.CMD_BLOCK_STATUS:
            raise NbdProtocolError(
                f"server answered {pending.describe()} with a simple reply "
                f"without error; block status needs a structured reply")
        else:
            del self._inflight[handle]
            events.append(Done(handle))
        return SIMPLE_REPLY.size

    def _parse_chunk(self, view: memoryview, pos: int, end: int,
                     events: list[Event]) -> int:
        if end - pos < STRUCTURED_REPLY.size:
            return 0
        _, flags, rtype, handle, length = STRUCTURED_REPLY.unpack_from(
            view, pos)
        pending = self._lookup(handle, "structured reply chunk")
        done = bool(flags & c.REPLY_FLAG_DONE)
        body = pos + STRUCTURED_REPLY.size
        avail = end - body
        cmd = pending.command

        if rtype == c.REPLY_TYPE_OFFSET_DATA:
            if cmd != c.CMD_READ:
                raise NbdProtocolError(
                    f"server sent NBD_REPLY_TYPE_OFFSET_DATA to "
                    f"{pending.describe()}")
            if length < 9:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_OFFSET_DATA chunk of length {length} "
                    f"(must be at least 9)")
            if length - 8 > pending.length:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_OFFSET_DATA chunk carries "
                    f"{length - 8} bytes, more than {pending.describe()} "
                    f"asked for")
            if avail < 8:
                return 0
            (offset,) = U64.unpack_from(view, body)
            rel = pending.claim(offset, length - 8, "data")
            self._start_sink(handle, pending, rel, length - 8, done=done,
                             simple=False)
            return STRUCTURED_REPLY.size + 8

        # Every other chunk type is read whole before acting on it.
        if rtype == c.REPLY_TYPE_BLOCK_STATUS:
            limit = MAX_BLOCK_STATUS_CHUNK
        elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
            limit = 12
        else:
            limit = MAX_ERROR_CHUNK
        if length > limit:
            raise NbdProtocolError(
                f"structured reply chunk type {rtype} for "
                f"{pending.describe()} is {length} bytes long; at most "
                f"{limit} is accepted")
        if avail < length:
            return 0
        payload = view[body:body + length]
        try:
            pending.add_chunk(rtype, payload, done, self.export.contexts)
        finally:
            payload.release()
        if done:
            self._finish(handle, pending, events)
        return STRUCTURED_REPLY.size + length

    def _start_sink(self, handle: int, pending: PendingRequest, rel: int,
                    length: int, done: bool, simple: bool) -> None:
        pending.ensure_buffer()
        self._sink = pending
        self._sink_handle = handle
        self._sink_at = rel
        self._sink_left = length
        self._sink_done = done
        self._sink_simple = simple

    def _feed_sink(self, view: memoryview, pos: int, end: int,
                   events: list[Event]) -> int:
        n = min(self._sink_left, end - pos)
        at = self._sink_at
        self._sink.view[at:at + n] = view[pos:pos + n]
        self._sink_at = at + n
        self._sink_left -= n
        if self._sink_left == 0:
            self._end_sink(events)
        return pos + n

    def _end_sink(self, events: list[Event]) -> None:
        pending, handle = self._sink, self._sink_handle
        self._sink = None
        if self._sink_simple:
            pending.covered = pending.length
            pending.ranges = [(0, pending.length)]
            self._finish(handle, pending, events)
        elif self._sink_done:
            self._finish(handle, pending, events)

    def _finish_error(self, handle: int, pending: PendingRequest, err: int,
                      message: str, events: list[Event]) -> None:
        del self._inflight[handle]
        pending.release()
        if not message:
            message = (f"server failed {pending.describe()}: "
                       f"{describe_errno(err)}")
        else:
            message = (f"server failed {pending.describe()}: "
                       f"{describe_errno(err)}: {message}")
        events.append(RequestFailed(handle, err, message))

    def _finish(self, handle: int, pending: PendingRequest,
                events: list[Event]) -> None:
        """The final chunk of a reply has arrived."""
        if pending.error is not None:
            self._finish_error(handle, pending, *pending.error, events)
            return
        cmd = pending.command
        if cmd == c.CMD_READ:
            pending.check_coverage()
            del self._inflight[handle]
            pending.release()
            if pending.into:
                events.append(Done(handle))
            else:
                # One copy into an immutable result; the holes are zero.
                data = bytes(pending.buf) if pending.buf is not None \
                    else bytes(pending.length)
                pending.buf = None
                events.append(ReadDone(handle, data))
        elif cmd == c.CMD_BLOCK_STATUS:
            if not pending.extents:
                raise NbdProtocolError(
                    f"server ended the reply to {pending.describe()} "
                    f"without any block status")
            del self._inflight[handle]
            events.append(BlockStatusDone(handle, dict(pending.extents)))
        else:
            del self._inflight[handle]
            events.append(Done(handle))
