"""NBD client side of the protocol, sans I/O.

:class:`NbdClientProtocol` never touches a socket. The transport feeds it
what the server sent (:meth:`~NbdClientProtocol.receive_data`) and gets
back immutable events; it sends whatever
:meth:`~NbdClientProtocol.data_to_send` returns during the handshake and
the bytes the request builders (:meth:`~NbdClientProtocol.read`,
:meth:`~NbdClientProtocol.write`, ...) return afterwards.

Handshake (fixed newstyle), in order:

1. ``NBD_OPT_STRUCTURED_REPLY`` (if wanted); a refusal means simple
   replies only.
2. ``NBD_OPT_SET_META_CONTEXT`` for the contexts asked (needs structured
   replies); the server answers the ids of those it knows.
3. ``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE``; if the server does
   not know ``NBD_OPT_GO`` (``NBD_REP_ERR_UNSUP``) the client falls back to
   ``NBD_OPT_EXPORT_NAME``.

A protocol made with ``list_exports=True`` sends ``NBD_OPT_LIST`` instead,
reports :class:`ExportList` and ends the session with ``NBD_OPT_ABORT``.

Everything the server sends is checked before it turns into an event: a
wrong magic, a reply to a handle that is not in flight, a chunk outside the
range that was asked for, a length the reply cannot have. Any of these
raises :class:`NbdProtocolError`; the connection is then unusable and the
transport must drop it. Data from a broken reply never reaches the caller.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import os
import types
from collections.abc import Mapping

from vmthunder.blockdev import Extent
from vmthunder.nbd import constants as c

from vmthunder.nbd.wire import (BLOCK_DESCRIPTOR, ERROR_HEAD,
                                EXPORT_NAME_PADDING, EXPORT_NAME_REPLY,
                                GREETING, INFO_BLOCK_SIZE, INFO_EXPORT,
                                OFFSET_HOLE, OPT_HEADER, OPT_REPLY, REQUEST,
                                SIMPLE_REPLY, STRUCTURED_REPLY, U16, U32,
                                U32_MAX, U64, U64_MAX)

# Limits on what the server may make us buffer. Option replies carry a few
# strings of at most 4 KiB; an error chunk carries one.
MAX_OPTION_REPLY = 64 * 1024
MAX_ERROR_CHUNK = 64 * 1024
# A block status chunk holds one 8-byte descriptor per extent.
MAX_BLOCK_STATUS_CHUNK = 4 + 8 * (8 * 1024 * 1024)
# Receive buffer get_buffer() hands out outside read payloads.
SCRATCH_SIZE = 256 * 1024

# Wire error values (the spec fixes them to the Linux numbers) and the
# local errno each one means. Anything else is reported as EIO.
_WIRE_ERRNO = {
    c.EPERM: _errno.EPERM,
    c.EIO: _errno.EIO,
    c.ENOMEM: _errno.ENOMEM,
    c.EINVAL: _errno.EINVAL,
    c.ENOSPC: _errno.ENOSPC,
    c.EOVERFLOW: _errno.EOVERFLOW,
    c.ENOTSUP: _errno.ENOTSUP,
    c.ESHUTDOWN: _errno.ESHUTDOWN,
}

_OPTION_NAMES = {
    c.OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    c.OPT_ABORT: "NBD_OPT_ABORT",
    c.OPT_LIST: "NBD_OPT_LIST",
    c.OPT_STARTTLS: "NBD_OPT_STARTTLS",
    c.OPT_INFO: "NBD_OPT_INFO",
    c.OPT_GO: "NBD_OPT_GO",
    c.OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    c.OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    c.OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

_REP_ERROR_NAMES = {
    c.REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP (option not supported)",
    c.REP_ERR_POLICY: "NBD_REP_ERR_POLICY (forbidden by server policy)",
    c.REP_ERR_INVALID: "NBD_REP_ERR_INVALID (invalid option)",
    c.REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM (not on this platform)",
    c.REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD (server requires TLS)",
    c.REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN (no such export)",
    c.REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN (server shutting down)",
    c.REP_ERR_BLOCK_SIZE_REQD:
        "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
    c.REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG (request too big)",
}

_COMMAND_NAMES = {
    c.CMD_READ: "NBD_CMD_READ",
    c.CMD_WRITE: "NBD_CMD_WRITE",
    c.CMD_DISC: "NBD_CMD_DISC",
    c.CMD_FLUSH: "NBD_CMD_FLUSH",
    c.CMD_TRIM: "NBD_CMD_TRIM",
    c.CMD_CACHE: "NBD_CMD_CACHE",
    c.CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    c.CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}


def option_name(option: int) -> str:
    return _OPTION_NAMES.get(option, f"option {option}")


def command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command, f"command {command}")


def errno_from_wire(value: int) -> int:
    """The local errno for an NBD wire error value (EIO if unknown)."""
    return _WIRE_ERRNO.get(value, _errno.EIO)


def describe_errno(err: int) -> str:
    name = _errno.errorcode.get(err, str(err))
    return f"{name} ({os.strerror(err)})"


# Errors.

class NbdError(Exception):
    """Base of the errors of the NBD client."""


class NbdProtocolError(NbdError):
    """The server broke the protocol; the connection must be dropped."""


class NbdHandshakeError(NbdError):
    """The server refused the handshake (unknown export, TLS, ...).

    ``option`` is the option that failed, ``reply`` the NBD_REP_ERR_*
    value (0 if the server just closed the connection), ``server_message``
    the text the server sent with it.
    """

    def __init__(self, message: str, option: int = 0, reply: int = 0,
                 server_message: str = ""):
        super().__init__(message)
        self.option = option
        self.reply = reply
        self.server_message = server_message


# Events and values. All frozen: an event is a fact, not a handle.

@dataclasses.dataclass(frozen=True)
class RemoteExport:
    """An export as negotiated: size, flags, block sizes, contexts."""

    name: str
    size: int
    flags: int
    structured_replies: bool
    # Context name -> id the server gave it (read-only mapping).
    contexts: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    min_block: int = c.DEFAULT_MIN_BLOCK
    preferred_block: int = c.DEFAULT_PREFERRED_BLOCK
    max_block: int = c.DEFAULT_MAX_PAYLOAD
    # True when the server sent NBD_INFO_BLOCK_SIZE (else spec defaults).
    block_size_advertised: bool = False
    description: str = ""

    @property
    def read_only(self) -> bool:
        return bool(self.flags & c.FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & c.FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & c.FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & c.FLAG_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & c.FLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & c.FLAG_CAN_MULTI_CONN)


@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """One export named by NBD_OPT_LIST."""

    name: str
    description: str = ""


class Event:
    """Base of the events :meth:`NbdClientProtocol.receive_data` returns."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True)
class HandshakeDone(Event):
    export: RemoteExport


@dataclasses.dataclass(frozen=True)
class ExportList(Event):
    exports: tuple[ExportEntry, ...]


@dataclasses.dataclass(frozen=True)
class ReadDone(Event):
    handle: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class Done(Event):
    """A request without reply data (write, flush, trim...) succeeded."""

    handle: int


@dataclasses.dataclass(frozen=True)
class BlockStatusDone(Event):
    handle: int
    # context id -> extents from the request offset on, clipped to the
    # request length.
    extents: Mapping[int, list[Extent]]


@dataclasses.dataclass(frozen=True)
class RequestFailed(Event):
    handle: int
    errno: int
    message: str


# Internal state.

class _State(enum.Enum):
    GREETING = "waiting for the server greeting"
    OPTIONS = "negotiating options"
    EXPORT_NAME = "waiting for the NBD_OPT_EXPORT_NAME reply"
    TRANSMISSION = "transmission"
    FINISHED = "finished"


class _Pending:
    """A request in flight (mutable bookkeeping, never handed out)."""

    __slots__ = ("command", "offset", "length", "flags", "buf", "view",
                 "ranges", "covered", "error", "extents", "into")

    def __init__(self, command: int, offset: int, length: int, flags: int):
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        # Content chunks seen (relative start, end), for overlap checks.
        self.ranges: list[tuple[int, int]] = []
        self.covered = 0
        self.error: tuple[int, str] | None = None
        self.extents: dict[int, list[Extent]] = {}
        # The caller's buffer (read_into); else data goes to self.buf.
        self.into = False

    def describe(self) -> str:
        return (f"{command_name(self.command)} offset={self.offset} "
                f"length={self.length}")


_ZEROES = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROES)


def _zero(view: memoryview, start: int, length: int) -> None:
    end = start + length
    while start < end:
        n = min(end - start, len(_ZEROES))
        view[start:start + n] = _ZERO_VIEW[:n]
        start += n


def _check_u64(what: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{what} must be an integer in [0, 2**64), "
                         f"got {value!r}")


def _encode_name(what: str, name: str) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    if len(raw) > c.MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes in UTF-8; NBD allows "
                         f"at most {c.MAX_STRING}")
    if b"\0" in raw:
        raise ValueError(f"{what} {name!r} contains a NUL character, which "
                         f"NBD strings cannot hold")
    return raw


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


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
        self.export_name = export_name
        self._name_raw = _encode_name("export name", export_name)
        self.want_structured = bool(want_structured)
        if isinstance(meta_contexts, str):
            raise TypeError("meta_contexts must be a sequence of context "
                            f"names, not the string {meta_contexts!r}")
        self.meta_contexts = tuple(meta_contexts)
        self._context_raws = [
            _encode_name("meta context name", name)
            for name in self.meta_contexts]
        for name in self.meta_contexts:
            if ":" not in name:
                raise ValueError(
                    f"meta context {name!r} has no namespace; NBD context "
                    f"names look like 'namespace:name' (e.g. "
                    f"{c.BASE_ALLOCATION!r})")
        self.list_mode = bool(list_exports)

        self._state = _State.GREETING
        self._failed: NbdError | None = None
        self._out = bytearray()
        self._buf = bytearray()

        # Handshake.
        self._no_zeroes = False
        self._option = 0                  # option awaiting its replies
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._info_size: int | None = None
        self._info_flags = 0
        self._block_sizes: tuple[int, int, int] | None = None
        self._description = ""
        self._exports: list[ExportEntry] = []
        self.export: RemoteExport | None = None

        # Transmission.
        self._next_handle = 1
        self._inflight: dict[int, _Pending] = {}
        self._disconnected = False
        # Current reply being received.
        self._sink: _Pending | None = None      # data goes to its buffer
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
        return self._state is not _State.GREETING

    @property
    def phase(self) -> str:
        """Where the connection is, for messages ("negotiating options
        (NBD_OPT_GO)", "transmission", ...)."""
        if self._state is _State.OPTIONS and self._option:
            return f"{self._state.value} ({option_name(self._option)})"
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
        if state is _State.EXPORT_NAME:
            exc: NbdError = NbdHandshakeError(
                f"server closed the connection after NBD_OPT_EXPORT_NAME: "
                f"export {self.export_name!r} does not exist or the server "
                f"refused it", option=c.OPT_EXPORT_NAME)
        elif state is not _State.TRANSMISSION:
            what = (f"after {option_name(self._option)}"
                    if self._option else state.value)
            exc = NbdHandshakeError(
                f"server closed the connection during the handshake "
                f"({what})", option=self._option)
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
        self._inflight[handle] = _Pending(command, offset, length, flags)
        return handle, REQUEST.pack(c.REQUEST_MAGIC, flags, command, handle,
                                    offset, length)

    # -- handshake ------------------------------------------------------

    def _send_option(self, option: int, payload: bytes = b"") -> None:
        self._option = option
        self._out += OPT_HEADER.pack(c.IHAVEOPT, option, len(payload))
        self._out += payload

    def _next_option(self, after: int) -> None:
        """Send the option that follows ``after`` in the handshake."""
        if after == 0 and self.want_structured:
            self._send_option(c.OPT_STRUCTURED_REPLY)
            return
        if after in (0, c.OPT_STRUCTURED_REPLY) and self._context_raws \
                and self._structured:
            payload = bytearray(U32.pack(len(self._name_raw)))
            payload += self._name_raw
            payload += U32.pack(len(self._context_raws))
            for raw in self._context_raws:
                payload += U32.pack(len(raw))
                payload += raw
            self._send_option(c.OPT_SET_META_CONTEXT, bytes(payload))
            return
        payload = (U32.pack(len(self._name_raw)) + self._name_raw
                   + U16.pack(1) + U16.pack(c.INFO_BLOCK_SIZE))
        self._send_option(c.OPT_GO, payload)

    def _on_greeting(self, magic: int, opt_magic: int, hflags: int) -> None:
        if magic != c.NBDMAGIC:
            raise NbdProtocolError(
                f"not an NBD server: greeting starts with "
                f"{magic:#018x}, expected NBDMAGIC {c.NBDMAGIC:#018x}")
        if opt_magic == c.OLDSTYLE_MAGIC:
            raise NbdProtocolError(
                "server speaks the oldstyle NBD handshake, which this "
                "client does not support (use a newstyle server)")
        if opt_magic != c.IHAVEOPT:
            raise NbdProtocolError(
                f"bad magic in server greeting: {opt_magic:#018x}, "
                f"expected IHAVEOPT {c.IHAVEOPT:#018x}")
        fixed = bool(hflags & c.FLAG_FIXED_NEWSTYLE)
        self._no_zeroes = bool(hflags & c.FLAG_NO_ZEROES)
        cflags = ((c.FLAG_C_FIXED_NEWSTYLE if fixed else 0)
                  | (c.FLAG_C_NO_ZEROES if self._no_zeroes else 0))
        self._out += U32.pack(cflags)
        if self.list_mode:
            if not fixed:
                raise NbdHandshakeError(
                    "server does not speak fixed newstyle NBD, so it "
                    "cannot list its exports")
            self._state = _State.OPTIONS
            self._send_option(c.OPT_LIST)
        elif not fixed:
            # Plain newstyle: NBD_OPT_EXPORT_NAME is the only option.
            self._send_export_name()
        else:
            self._state = _State.OPTIONS
            self._next_option(0)

    def _send_export_name(self) -> None:
        self._send_option(c.OPT_EXPORT_NAME, self._name_raw)
        self._state = _State.EXPORT_NAME

    def _option_error(self, option: int, reply: int,
                      payload: bytes) -> NbdHandshakeError:
        text = _decode(payload)
        name = _REP_ERROR_NAMES.get(reply, f"error reply {reply:#x}")
        what = (f"export {self.export_name!r}"
                if option in (c.OPT_GO, c.OPT_SET_META_CONTEXT)
                else "the request")
        msg = f"server refused {option_name(option)} for {what}: {name}"
        if text:
            msg += f": {text}"
        return NbdHandshakeError(msg, option=option, reply=reply,
                                 server_message=text)

    def _on_option_reply(self, option: int, reply: int, payload: bytes,
                         events: list[Event]) -> None:
        if option != self._option:
            raise NbdProtocolError(
                f"server answered {option_name(option)} while "
                f"{option_name(self._option)} was pending")
        if reply & c.REP_FLAG_ERROR:
            self._on_option_error(option, reply, payload, events)
            return
        if option == c.OPT_STRUCTURED_REPLY:
            self._expect_ack(option, reply, payload)
            self._structured = True
            self._next_option(option)
        elif option == c.OPT_SET_META_CONTEXT:
            if reply == c.REP_META_CONTEXT:
                self._on_meta_context(payload)
            else:
                self._expect_ack(option, reply, payload)
                self._next_option(option)
        elif option == c.OPT_GO:
            if reply == c.REP_INFO:
                self._on_info(payload)
            else:
                self._expect_ack(option, reply, payload)
                if self._info_size is None:
                    raise NbdProtocolError(
                        "server acknowledged NBD_OPT_GO without sending "
                        "NBD_INFO_EXPORT (size and flags)")
                self._enter_transmission(self._info_size, self._info_flags,
                                         events)
        elif option == c.OPT_LIST:
            if reply == c.REP_SERVER:
                self._on_server_entry(payload)
            else:
                self._expect_ack(option, reply, payload)
                events.append(ExportList(tuple(self._exports)))
                self._send_option(c.OPT_ABORT)
                self._state = _State.FINISHED
        else:   # pragma: no cover - we only send the options above
            raise NbdProtocolError(
                f"unexpected reply to {option_name(option)}")

    def _on_option_error(self, option: int, reply: int, payload: bytes,
                         events: list[Event]) -> None:
        if reply in (c.REP_ERR_TLS_REQD, c.REP_ERR_SHUTDOWN):
            raise self._option_error(option, reply, payload)
        if option == c.OPT_STRUCTURED_REPLY:
            self._structured = False
            self._next_option(option)
        elif option == c.OPT_SET_META_CONTEXT:
            # No contexts: block status is unavailable, the export is not.
            self._contexts.clear()
            self._next_option(option)
        elif option == c.OPT_GO and reply == c.REP_ERR_UNSUP:
            self._send_export_name()
        else:
            raise self._option_error(option, reply, payload)

    def _expect_ack(self, option: int, reply: int, payload: bytes) -> None:
        if reply != c.REP_ACK:
            raise NbdProtocolError(
                f"unexpected reply type {reply} to {option_name(option)}")
        if payload:
            raise NbdProtocolError(
                f"NBD_REP_ACK to {option_name(option)} carries "
                f"{len(payload)} bytes; it must be empty")

    def _on_meta_context(self, payload: bytes) -> None:
        if len(payload) < 5:
            raise NbdProtocolError(
                f"NBD_REP_META_CONTEXT of {len(payload)} bytes is too short "
                f"(needs an id and a name)")
        (context_id,) = U32.unpack_from(payload, 0)
        name = _decode(payload[4:])
        if name not in self.meta_contexts:
            raise NbdProtocolError(
                f"server selected meta context {name!r}, which was not "
                f"asked for (asked: {', '.join(self.meta_contexts)})")
        if name in self._contexts:
            raise NbdProtocolError(
                f"server selected meta context {name!r} twice")
        if context_id in self._contexts.values():
            raise NbdProtocolError(
                f"server gave context id {context_id} to two contexts")
        self._contexts[name] = context_id

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise NbdProtocolError("NBD_REP_INFO without an info type")
        (info,) = U16.unpack_from(payload, 0)
        if info == c.INFO_EXPORT:
            if len(payload) != 12:
                raise NbdProtocolError(
                    f"NBD_INFO_EXPORT is {len(payload)} bytes, expected 12")
            _, size, flags = INFO_EXPORT.unpack_from(payload)
            self._info_size, self._info_flags = size, flags
        elif info == c.INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise NbdProtocolError(
                    f"NBD_INFO_BLOCK_SIZE is {len(payload)} bytes, "
                    f"expected 14")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack_from(
                payload)
            self._check_block_sizes(minimum, preferred, maximum)
            self._block_sizes = (minimum, preferred, maximum)
        elif info == c.INFO_DESCRIPTION:
            self._description = _decode(payload[2:])
        # NBD_INFO_NAME and unknown types: nothing we need.

    @staticmethod
    def _check_block_sizes(minimum: int, preferred: int,
                           maximum: int) -> None:
        def pow2(v: int) -> bool:
            return v > 0 and v & (v - 1) == 0
        if not pow2(minimum) or minimum > 64 * 1024:
            raise NbdProtocolError(
                f"server minimum block size {minimum} is not a power of two "
                f"between 1 and 65536")
        if not pow2(preferred) or preferred < minimum:
            raise NbdProtocolError(
                f"server preferred block size {preferred} is not a power "
                f"of two at least the minimum {minimum}")
        if maximum < minimum or (maximum != U32_MAX and maximum % minimum):
            raise NbdProtocolError(
                f"server maximum block size {maximum} is not a multiple of "
                f"the minimum {minimum}")

    def _on_server_entry(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise NbdProtocolError("NBD_REP_SERVER without a name length")
        (n,) = U32.unpack_from(payload, 0)
        if n > len(payload) - 4:
            raise NbdProtocolError(
                f"NBD_REP_SERVER name length {n} exceeds the reply "
                f"({len(payload) - 4} bytes)")
        self._exports.append(ExportEntry(_decode(payload[4:4 + n]),
                                         _decode(payload[4 + n:])))

    def _enter_transmission(self, size: int, flags: int,
                            events: list[Event]) -> None:
        minimum, preferred, maximum = self._block_sizes or (
            c.DEFAULT_MIN_BLOCK, c.DEFAULT_PREFERRED_BLOCK,
            c.DEFAULT_MAX_PAYLOAD)
        # Never send more per request than the spec promises to work,
        # whatever a server advertises (some say 4 GiB).
        maximum = min(maximum, c.DEFAULT_MAX_PAYLOAD)
        maximum -= maximum % minimum
        contexts = self._contexts if self._structured else {}
        self.export = RemoteExport(
            name=self.export_name, size=size, flags=flags,
            structured_replies=self._structured,
            contexts=types.MappingProxyType(dict(contexts)),
            min_block=minimum, preferred_block=preferred,
            max_block=maximum,
            block_size_advertised=self._block_sizes is not None,
            description=self._description)
        self._state = _State.TRANSMISSION
        self._option = 0
        events.append(HandshakeDone(self.export))

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
            elif state is _State.OPTIONS:
                used = self._parse_option_reply(view, pos, end, events)
            elif state is _State.GREETING:
                if end - pos < GREETING.size:
                    break
                self._on_greeting(*GREETING.unpack_from(view, pos))
                used = GREETING.size
            elif state is _State.EXPORT_NAME:
                used = self._parse_export_name_reply(view, pos, end, events)
            else:
                # FINISHED: the ack to NBD_OPT_ABORT, or trailing bytes
                # after the end; nothing to act on.
                return end
            if not used:
                break
            pos += used
        return pos

    def _parse_option_reply(self, view: memoryview, pos: int, end: int,
                            events: list[Event]) -> int:
        if end - pos < OPT_REPLY.size:
            return 0
        magic, option, reply, length = OPT_REPLY.unpack_from(view, pos)
        if magic != c.OPT_REPLY_MAGIC:
            raise NbdProtocolError(
                f"bad option reply magic {magic:#x} (expected "
                f"{c.OPT_REPLY_MAGIC:#x}) answering "
                f"{option_name(self._option)}")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(
                f"option reply to {option_name(option)} is {length} bytes "
                f"long; at most {MAX_OPTION_REPLY} is accepted")
        total = OPT_REPLY.size + length
        if end - pos < total:
            return 0
        payload = bytes(view[pos + OPT_REPLY.size:pos + total])
        self._on_option_reply(option, reply, payload, events)
        return total

    def _parse_export_name_reply(self, view: memoryview, pos: int, end: int,
                                 events: list[Event]) -> int:
        need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes
                                         else EXPORT_NAME_PADDING)
        if end - pos < need:
            return 0
        size, flags = EXPORT_NAME_REPLY.unpack_from(view, pos)
        self._enter_transmission(size, flags, events)
        return need

    def _lookup(self, handle: int, what: str) -> _Pending:
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
            rel = self._content_range(pending, offset, length - 8, "data")
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
            self._on_chunk(handle, pending, rtype, payload, done, events)
        finally:
            payload.release()
        return STRUCTURED_REPLY.size + length

    def _on_chunk(self, handle: int, pending: _Pending, rtype: int,
                  payload: memoryview, done: bool,
                  events: list[Event]) -> None:
        length = len(payload)
        cmd = pending.command
        if rtype == c.REPLY_TYPE_NONE:
            if length:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_NONE chunk with {length} bytes of "
                    f"payload")
            if not done:
                raise NbdProtocolError(
                    "NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE")
        elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
            if cmd != c.CMD_READ:
                raise NbdProtocolError(
                    f"server sent NBD_REPLY_TYPE_OFFSET_HOLE to "
                    f"{pending.describe()}")
            if length != 12:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_OFFSET_HOLE chunk of length {length} "
                    f"(must be 12)")
            offset, hole = OFFSET_HOLE.unpack_from(payload, 0)
            if hole == 0:
                raise NbdProtocolError(
                    "NBD_REPLY_TYPE_OFFSET_HOLE chunk with a hole of size 0")
            rel = self._content_range(pending, offset, hole, "hole")
            if pending.into:
                _zero(pending.view, rel, hole)
            # A fresh buffer is all zeroes; overlaps are caught at the end.
            pending.ranges.append((rel, rel + hole))
            pending.covered += hole
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            self._on_block_status(pending, payload)
        elif rtype & c.REPLY_TYPE_FLAG_ERROR:
            self._on_error_chunk(pending, rtype, payload)
        else:
            raise NbdProtocolError(
                f"unknown structured reply chunk type {rtype} for "
                f"{pending.describe()}")
        if done:
            self._finish(handle, pending, events)

    def _content_range(self, pending: _Pending, offset: int, length: int,
                       what: str) -> int:
        rel = offset - pending.offset
        if rel < 0 or rel + length > pending.length:
            raise NbdProtocolError(
                f"server sent a {what} chunk for offset={offset} "
                f"length={length}, outside the range of "
                f"{pending.describe()}")
        return rel

    def _on_block_status(self, pending: _Pending,
                         payload: memoryview) -> None:
        if pending.command != c.CMD_BLOCK_STATUS:
            raise NbdProtocolError(
                f"server sent NBD_REPLY_TYPE_BLOCK_STATUS to "
                f"{pending.describe()}")
        length = len(payload)
        if length < 12 or (length - 4) % 8:
            raise NbdProtocolError(
                f"NBD_REPLY_TYPE_BLOCK_STATUS chunk of length {length} "
                f"(must be 4 plus a positive multiple of 8)")
        (context_id,) = U32.unpack_from(payload, 0)
        if context_id not in self.export.contexts.values():
            raise NbdProtocolError(
                f"block status for context id {context_id}, which was "
                f"not negotiated (negotiated: "
                f"{dict(self.export.contexts)})")
        if context_id in pending.extents:
            raise NbdProtocolError(
                f"two block status chunks for context id {context_id} in "
                f"one reply")
        extents: list[Extent] = []
        left = pending.length
        for ext_len, ext_flags in BLOCK_DESCRIPTOR.iter_unpack(payload[4:]):
            if ext_len == 0:
                raise NbdProtocolError(
                    "block status descriptor of length 0")
            if left == 0:
                break
            # Servers may describe more than asked; keep only our range.
            ext_len = min(ext_len, left)
            left -= ext_len
            extents.append(Extent(ext_len, ext_flags))
        pending.extents[context_id] = extents

    def _on_error_chunk(self, pending: _Pending, rtype: int,
                        payload: memoryview) -> None:
        length = len(payload)
        if length < ERROR_HEAD.size:
            raise NbdProtocolError(
                f"error chunk (type {rtype}) of length {length} is too "
                f"short (at least 6)")
        error, msg_len = ERROR_HEAD.unpack_from(payload, 0)
        if msg_len > length - ERROR_HEAD.size:
            raise NbdProtocolError(
                f"error chunk message length {msg_len} exceeds the chunk")
        message = _decode(bytes(payload[6:6 + msg_len]))
        if rtype == c.REPLY_TYPE_ERROR_OFFSET:
            if length != 6 + msg_len + 8:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_ERROR_OFFSET chunk of length {length} "
                    f"does not hold a {msg_len}-byte message and an offset")
            (offset,) = U64.unpack_from(payload, 6 + msg_len)
            if not (pending.offset <= offset
                    < pending.offset + max(pending.length, 1)):
                raise NbdProtocolError(
                    f"error offset {offset} outside the range of "
                    f"{pending.describe()}")
            message = (f"{message} (at offset {offset})" if message
                       else f"error at offset {offset}")
        if error == 0:
            # The spec forbids it; still an error, never a success.
            error = c.EIO
        if pending.error is None:
            pending.error = (errno_from_wire(error), message)

    def _ensure_buffer(self, pending: _Pending) -> None:
        if pending.view is None:
            pending.buf = bytearray(pending.length)
            pending.view = memoryview(pending.buf)

    def _start_sink(self, handle: int, pending: _Pending, rel: int,
                    length: int, done: bool, simple: bool) -> None:
        self._ensure_buffer(pending)
        if not simple:
            pending.ranges.append((rel, rel + length))
            pending.covered += length
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

    def _finish_error(self, handle: int, pending: _Pending, err: int,
                      message: str, events: list[Event]) -> None:
        del self._inflight[handle]
        self._release(pending)
        if not message:
            message = (f"server failed {pending.describe()}: "
                       f"{describe_errno(err)}")
        else:
            message = (f"server failed {pending.describe()}: "
                       f"{describe_errno(err)}: {message}")
        events.append(RequestFailed(handle, err, message))

    @staticmethod
    def _release(pending: _Pending) -> None:
        if pending.view is not None:
            pending.view.release()
            pending.view = None

    def _finish(self, handle: int, pending: _Pending,
                events: list[Event]) -> None:
        """The final chunk of a reply has arrived."""
        if pending.error is not None:
            self._finish_error(handle, pending, *pending.error, events)
            return
        cmd = pending.command
        if cmd == c.CMD_READ:
            self._check_coverage(pending)
            del self._inflight[handle]
            self._release(pending)
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

    @staticmethod
    def _check_coverage(pending: _Pending) -> None:
        ranges = sorted(pending.ranges)
        prev_end = 0
        for start, stop in ranges:
            if start < prev_end:
                raise NbdProtocolError(
                    f"server sent overlapping chunks for "
                    f"{pending.describe()}")
            prev_end = stop
        if pending.covered != pending.length:
            raise NbdProtocolError(
                f"server reported success for {pending.describe()} but sent "
                f"only {pending.covered} of {pending.length} bytes")
