"""NBD server side of the protocol, sans I/O.

Feed the bytes a client sent to :meth:`NbdServerProtocol.receive`; it
returns the bytes to send back (handshake replies, error replies for
requests it refused itself) and the requests that a block device has to
answer. Replies to those requests are built with the ``reply_*`` methods.
Nothing here touches a socket, a file or the clock, so every malformed
input can be tested with plain byte strings.

The protocol object validates everything a client controls (magics, option
lengths, export names, offsets, lengths, flags, read-only) before a request
becomes an event: a layer below never sees a request outside its export.
"""

from __future__ import annotations

import dataclasses
import typing

from vmthunder.nbd import constants as c
from vmthunder.nbd import wire
from vmthunder.nbd.wire import (EXPORT_NAME_PADDING, EXPORT_NAME_REPLY,
                                GREETING, INFO_BLOCK_SIZE, INFO_EXPORT,
                                OPT_HEADER, OPT_REPLY, U16)

# Used per request: bound here, not imported by name (see wire).
REQUEST = wire.REQUEST
SIMPLE_REPLY = wire.SIMPLE_REPLY
STRUCTURED_REPLY = wire.STRUCTURED_REPLY
ERROR_HEAD = wire.ERROR_HEAD
BLOCK_DESCRIPTOR = wire.BLOCK_DESCRIPTOR
U32 = wire.U32
U64 = wire.U64

_KNOWN_COMMANDS = frozenset({
    c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, c.CMD_WRITE_ZEROES,
    c.CMD_BLOCK_STATUS, c.CMD_CACHE})

# Options larger than this are refused without being read into memory in
# one piece: the largest legitimate one holds a few 4 KiB strings.
MAX_OPTION_LENGTH = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What the protocol needs to know of an export (no I/O handles)."""

    name: str
    size: int
    read_only: bool
    description: str = ""
    # Meta contexts the device answers, in the order ids are assigned.
    contexts: tuple[str, ...] = (c.BASE_ALLOCATION,)
    min_block: int = 1
    preferred_block: int = 4096


# Events: what the transport has to act on.

@dataclasses.dataclass(frozen=True)
class Negotiated:
    export: ExportInfo
    structured: bool
    # context id -> context name, as agreed with NBD_OPT_SET_META_CONTEXT.
    contexts: dict


class Request(typing.NamedTuple):
    # A tuple, not a frozen dataclass: one is made per request, and a
    # tuple is several times cheaper to build.
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytearray | None = None     # payload of NBD_CMD_WRITE


@dataclasses.dataclass(frozen=True)
class Closed:
    """The connection is over: the client said so, or broke the protocol."""

    reason: str
    error: bool = False


class ProtocolViolation(Exception):
    pass


_HANDSHAKE, _CLIENT_FLAGS, _OPTIONS, _TRANSMISSION, _CLOSED = range(5)


class NbdServerProtocol:
    """One client connection, from greeting to disconnect."""

    def __init__(self, exports, *, max_request: int = 32 * 1024 * 1024,
                 default_export: str | None = None,
                 gate_payloads: bool = False):
        # exports: a mapping name -> ExportInfo, looked up at option time so
        # that exports added later are visible to new negotiations.
        self._exports = exports
        self._default_export = default_export
        self.max_request = max_request
        self._buf = bytearray()
        self._pos = 0
        self._state = _CLIENT_FLAGS
        self._no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self.export: ExportInfo | None = None
        self.contexts: dict[int, str] = {}
        # Bytes of an oversized write payload still to be thrown away.
        self._discard = 0
        # A pending write request whose payload has not fully arrived,
        # and that payload, filled as it comes (one buffer of exactly its
        # size: no growing, no second copy).
        self._pending_write: tuple | None = None
        self._payload: bytearray | None = None
        self._payload_got = 0
        # With gate_payloads, a write's payload stays unread (and
        # unallocated) until accept_payload(): the transport charges it
        # to its memory budget first.
        self._gate_payloads = gate_payloads
        self._payload_accepted = False

    # -- greeting ---------------------------------------------------------

    def greeting(self) -> bytes:
        return GREETING.pack(c.NBDMAGIC, c.IHAVEOPT,
                             c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)

    @property
    def awaiting_payload(self) -> int:
        """Length of the write whose header has been read and whose
        payload waits for :meth:`accept_payload` (0: none; only with
        gate_payloads)."""
        if self._pending_write is None or self._payload_accepted:
            return 0
        return self._pending_write[3]

    def accept_payload(self) -> None:
        """Read the pending write's payload from now on (call
        :meth:`receive`, with b"" if nothing new came, to parse what is
        buffered)."""
        self._payload_accepted = True

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    # -- input ------------------------------------------------------------

    def receive(self, data: bytes) -> tuple[bytes, list]:
        """Consume client bytes; return (bytes to send, events)."""
        if self._state == _CLOSED:
            return b"", []
        self._buf += data
        out = bytearray()
        events: list = []
        try:
            while self._state != _CLOSED and self._step(out, events):
                pass
        except ProtocolViolation as exc:
            self._state = _CLOSED
            events.append(Closed(str(exc), error=True))
        # Drop consumed bytes now and then, not on every request: slicing
        # the front of a bytearray is a memmove of the rest.
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return bytes(out), events

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        # One copy out of the buffer (a bytearray slice would make two).
        with memoryview(self._buf) as view:
            piece = bytes(view[self._pos:self._pos + n])
        self._pos += n
        return piece

    def _step(self, out: bytearray, events: list) -> bool:
        if self._state == _TRANSMISSION:
            return self._step_transmission(out, events)
        if self._state == _CLIENT_FLAGS:
            if self._available() < 4:
                return False
            (flags,) = U32.unpack(self._take(4))
            if not flags & c.FLAG_C_FIXED_NEWSTYLE:
                raise ProtocolViolation(
                    f"client flags {flags:#x} lack FIXED_NEWSTYLE; only "
                    "fixed newstyle clients are served")
            if flags & ~(c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
                raise ProtocolViolation(f"unknown client flags {flags:#x}")
            self._no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
            self._state = _OPTIONS
            return True
        return self._step_option(out, events)

    # -- options ----------------------------------------------------------

    def _step_option(self, out: bytearray, events: list) -> bool:
        if self._discard:
            n = min(self._discard, self._available())
            self._pos += n
            self._discard -= n
            return self._discard == 0 and self._available() > 0
        if self._available() < OPT_HEADER.size:
            return False
        magic, option, length = OPT_HEADER.unpack_from(self._buf, self._pos)
        if magic != c.IHAVEOPT:
            raise ProtocolViolation(
                f"bad option magic {magic:#x} (expected IHAVEOPT)")
        if length > MAX_OPTION_LENGTH:
            # Tell the client and skip the payload as it streams in.
            self._pos += OPT_HEADER.size
            out += self._opt_reply(option, c.REP_ERR_TOO_BIG,
                                   f"option length {length} is too big"
                                   .encode())
            self._discard = length
            return True
        if self._available() < OPT_HEADER.size + length:
            return False
        self._pos += OPT_HEADER.size
        payload = self._take(length)
        self._handle_option(option, payload, out, events)
        return True

    def _opt_reply(self, option: int, rtype: int, data: bytes = b"") -> bytes:
        return OPT_REPLY.pack(c.OPT_REPLY_MAGIC, option, rtype,
                              len(data)) + data

    def _handle_option(self, option, payload, out, events):
        if option == c.OPT_EXPORT_NAME:
            export = self._lookup(payload.decode("utf-8", "replace"))
            if export is None:
                # The only answer EXPORT_NAME allows is a hang-up.
                raise ProtocolViolation(
                    f"unknown export {payload[:100]!r} (NBD_OPT_EXPORT_NAME)")
            out += EXPORT_NAME_REPLY.pack(export.size, self._flags(export))
            if not self._no_zeroes:
                out += bytes(EXPORT_NAME_PADDING)
            self._enter_transmission(export, events)
        elif option == c.OPT_ABORT:
            out += self._opt_reply(option, c.REP_ACK)
            self._state = _CLOSED
            events.append(Closed("client sent NBD_OPT_ABORT"))
        elif option == c.OPT_LIST:
            if payload:
                out += self._opt_reply(option, c.REP_ERR_INVALID,
                                       b"NBD_OPT_LIST takes no data")
                return
            for name, export in self._exports.items():
                if not name:
                    continue
                raw = name.encode()
                out += self._opt_reply(
                    option, c.REP_SERVER,
                    U32.pack(len(raw)) + raw + export.description.encode())
            out += self._opt_reply(option, c.REP_ACK)
        elif option in (c.OPT_INFO, c.OPT_GO):
            self._handle_info_go(option, payload, out, events)
        elif option == c.OPT_STRUCTURED_REPLY:
            if payload:
                out += self._opt_reply(option, c.REP_ERR_INVALID,
                                       b"NBD_OPT_STRUCTURED_REPLY takes no "
                                       b"data")
            else:
                self.structured = True
                out += self._opt_reply(option, c.REP_ACK)
        elif option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            self._handle_meta(option, payload, out)
        else:
            out += self._opt_reply(option, c.REP_ERR_UNSUP,
                                   f"option {option} is not supported"
                                   .encode())

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default_export is not None:
            name = self._default_export
        return self._exports.get(name)

    def _flags(self, export: ExportInfo) -> int:
        flags = (c.FLAG_HAS_FLAGS | c.FLAG_SEND_FLUSH | c.FLAG_SEND_FUA
                 | c.FLAG_CAN_MULTI_CONN | c.FLAG_SEND_CACHE)
        if export.read_only:
            flags |= c.FLAG_READ_ONLY
        else:
            flags |= c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES
        if self.structured:
            flags |= c.FLAG_SEND_DF
        return flags

    def _parse_name(self, payload: bytes, option: int):
        if len(payload) < 4:
            return None
        (nlen,) = U32.unpack_from(payload, 0)
        if nlen > c.MAX_STRING or 4 + nlen > len(payload):
            return None
        return payload[4:4 + nlen].decode("utf-8", "replace"), 4 + nlen

    def _handle_info_go(self, option, payload, out, events):
        parsed = self._parse_name(payload, option)
        if parsed is None:
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"malformed export name")
            return
        name, pos = parsed
        if len(payload) < pos + 2:
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"missing information request count")
            return
        (nreq,) = U16.unpack_from(payload, pos)
        if len(payload) != pos + 2 + 2 * nreq:
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"information request list has the "
                                   b"wrong length")
            return
        export = self._lookup(name)
        if export is None:
            out += self._opt_reply(option, c.REP_ERR_UNKNOWN,
                                   f"no export named {name[:100]!r}; "
                                   "NBD_OPT_LIST shows the exports".encode())
            return
        requested = {U16.unpack_from(payload, pos + 2 + 2 * i)[0]
                     for i in range(nreq)}
        out += self._opt_reply(
            option, c.REP_INFO,
            INFO_EXPORT.pack(c.INFO_EXPORT, export.size,
                             self._flags(export)))
        if c.INFO_NAME in requested:
            out += self._opt_reply(option, c.REP_INFO,
                                   U16.pack(c.INFO_NAME)
                                   + export.name.encode())
        if c.INFO_DESCRIPTION in requested and export.description:
            out += self._opt_reply(option, c.REP_INFO,
                                   U16.pack(c.INFO_DESCRIPTION)
                                   + export.description.encode())
        # Always sent: it tells clients our payload limit.
        out += self._opt_reply(
            option, c.REP_INFO,
            INFO_BLOCK_SIZE.pack(c.INFO_BLOCK_SIZE, export.min_block,
                                 export.preferred_block, self.max_request))
        out += self._opt_reply(option, c.REP_ACK)
        if option == c.OPT_GO:
            self._enter_transmission(export, events)

    def _handle_meta(self, option, payload, out):
        if option == c.OPT_SET_META_CONTEXT and not self.structured:
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"negotiate NBD_OPT_STRUCTURED_REPLY "
                                   b"before NBD_OPT_SET_META_CONTEXT")
            return
        parsed = self._parse_name(payload, option)
        if parsed is None or len(payload) < parsed[1] + 4:
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"malformed meta context request")
            return
        name, pos = parsed
        (nqueries,) = U32.unpack_from(payload, pos)
        pos += 4
        queries = []
        for _ in range(nqueries):
            if len(payload) < pos + 4:
                break
            (qlen,) = U32.unpack_from(payload, pos)
            if qlen > c.MAX_STRING or len(payload) < pos + 4 + qlen:
                break
            queries.append(payload[pos + 4:pos + 4 + qlen].decode(
                "utf-8", "replace"))
            pos += 4 + qlen
        if len(queries) != nqueries or pos != len(payload):
            out += self._opt_reply(option, c.REP_ERR_INVALID,
                                   b"malformed meta context query list")
            return
        export = self._lookup(name)
        if export is None:
            out += self._opt_reply(option, c.REP_ERR_UNKNOWN,
                                   f"no export named {name[:100]!r}"
                                   .encode())
            return
        chosen = []
        for ctx in export.contexts:
            ns = ctx.split(":", 1)[0] + ":"
            if option == c.OPT_LIST_META_CONTEXT and not queries:
                chosen.append(ctx)
            elif any(q == ctx or q == ns for q in queries) and (
                    option == c.OPT_LIST_META_CONTEXT or ctx in queries):
                chosen.append(ctx)
        if option == c.OPT_SET_META_CONTEXT:
            self._meta_export = export.name
            self._meta = {}
        for ctx in chosen:
            ctx_id = export.contexts.index(ctx) + 1
            if option == c.OPT_SET_META_CONTEXT:
                self._meta[ctx_id] = ctx
            else:
                ctx_id = 0      # LIST: the id is reserved, SHOULD be zero
            out += self._opt_reply(option, c.REP_META_CONTEXT,
                                   U32.pack(ctx_id) + ctx.encode())
        out += self._opt_reply(option, c.REP_ACK)

    def _enter_transmission(self, export: ExportInfo, events: list) -> None:
        self.export = export
        self.contexts = (dict(self._meta)
                         if self._meta_export == export.name else {})
        self._state = _TRANSMISSION
        events.append(Negotiated(export, self.structured,
                                 dict(self.contexts)))

    # -- transmission -----------------------------------------------------

    def _step_transmission(self, out: bytearray, events: list) -> bool:
        if self._discard:
            n = min(self._discard, self._available())
            self._pos += n
            self._discard -= n
            return self._discard == 0 and self._available() > 0
        if self._pending_write is not None:
            flags, handle, offset, length = self._pending_write
            if not self._payload_accepted:
                return False
            if self._payload is None:
                self._payload = bytearray(length)
            n = min(self._available(), length - self._payload_got)
            if n:
                with memoryview(self._buf) as view:
                    self._payload[self._payload_got:self._payload_got + n] \
                        = view[self._pos:self._pos + n]
                self._pos += n
                self._payload_got += n
            if self._payload_got < length:
                return False
            data, self._payload = self._payload, None
            self._pending_write = None
            events.append(Request(c.CMD_WRITE, flags, handle, offset, length,
                                  data))
            return True
        if self._available() < REQUEST.size:
            return False
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(
            self._buf, self._pos)
        if magic != c.REQUEST_MAGIC:
            raise ProtocolViolation(
                f"bad request magic {magic:#x}; cannot find the next "
                "request, hanging up")
        self._pos += REQUEST.size
        if cmd == c.CMD_DISC:
            self._state = _CLOSED
            events.append(Closed("client sent NBD_CMD_DISC"))
            return False
        err = self._validate(cmd, flags, offset, length)
        if cmd == c.CMD_WRITE:
            if err is not None:
                # Refuse it, but stay in step: skip its payload.
                out += self.reply_error(handle, *err)
                self._discard = length
                return True
            self._pending_write = (flags, handle, offset, length)
            self._payload_got = 0
            self._payload_accepted = not self._gate_payloads
            return True
        if err is not None:
            out += self.reply_error(handle, *err)
            return True
        events.append(Request(cmd, flags, handle, offset, length))
        return True

    def _validate(self, cmd, flags, offset, length):
        export = self.export
        if cmd not in _KNOWN_COMMANDS:
            return c.EINVAL, f"unknown command {cmd}"
        if flags & ~(c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_DF
                     | c.CMD_FLAG_REQ_ONE | c.CMD_FLAG_FAST_ZERO):
            return c.EINVAL, f"unknown command flags {flags:#x}"
        if cmd == c.CMD_FLUSH:
            if offset or length:
                return c.EINVAL, "NBD_CMD_FLUSH must have offset and length 0"
            return None
        if cmd in (c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES) \
                and export.read_only:
            return c.EPERM, f"export {export.name!r} is read-only"
        if cmd == c.CMD_BLOCK_STATUS:
            if not self.contexts:
                return c.EINVAL, ("no meta context negotiated; use "
                                  "NBD_OPT_SET_META_CONTEXT first")
        if length == 0:
            return c.EINVAL, "zero-length request"
        if cmd in (c.CMD_READ, c.CMD_WRITE) and length > self.max_request:
            code = c.EOVERFLOW if cmd == c.CMD_READ and self.structured \
                else c.EINVAL
            return code, (f"request length {length} exceeds the maximum "
                          f"{self.max_request}")
        if offset + length > export.size:
            code = c.ENOSPC if cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES) \
                else c.EINVAL
            return code, (f"request offset={offset} length={length} goes "
                          f"past the end of the export (size "
                          f"{export.size})")
        return None

    # -- replies ----------------------------------------------------------

    def reply_ok(self, handle: int) -> bytes:
        if self.structured:
            return STRUCTURED_REPLY.pack(c.STRUCTURED_REPLY_MAGIC,
                                         c.REPLY_FLAG_DONE,
                                         c.REPLY_TYPE_NONE, handle, 0)
        return SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read_header(self, handle: int, offset: int,
                          length: int) -> bytes:
        """Header to send right before ``length`` bytes of read data."""
        if self.structured:
            return STRUCTURED_REPLY.pack(
                c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                c.REPLY_TYPE_OFFSET_DATA, handle, 8 + length) \
                + U64.pack(offset)
        return SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, err: int, message: str = "") -> bytes:
        if self.structured:
            msg = message.encode()[:4096]
            payload = ERROR_HEAD.pack(err, len(msg)) + msg
            return STRUCTURED_REPLY.pack(
                c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                c.REPLY_TYPE_ERROR, handle, len(payload)) + payload
        return SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, err, handle)

    def reply_block_status(self, handle: int, extents_by_id: dict) -> bytes:
        """One chunk per context; ``extents_by_id``: id -> [(len, flags)]."""
        out = bytearray()
        items = list(extents_by_id.items())
        for i, (ctx_id, extents) in enumerate(items):
            payload = U32.pack(ctx_id) + b"".join(
                BLOCK_DESCRIPTOR.pack(length, flags)
                for length, flags in extents)
            done = c.REPLY_FLAG_DONE if i == len(items) - 1 else 0
            out += STRUCTURED_REPLY.pack(c.STRUCTURED_REPLY_MAGIC, done,
                                         c.REPLY_TYPE_BLOCK_STATUS, handle,
                                         len(payload)) + payload
        return bytes(out)
