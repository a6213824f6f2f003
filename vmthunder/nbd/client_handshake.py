"""NBD client handshake (fixed newstyle), sans I/O.

:class:`ClientHandshake` takes the server's greeting and option replies,
queues the client's flags and options, and ends with the export it
negotiated (a :class:`~vmthunder.nbd.client_events.RemoteExport` and a
:class:`~vmthunder.nbd.client_events.HandshakeDone` event).
:class:`~vmthunder.nbd.client_protocol.NbdClientProtocol` runs one before
transmission. The options, in order:

1. ``NBD_OPT_STRUCTURED_REPLY`` (if wanted); a refusal means simple
   replies only.
2. ``NBD_OPT_SET_META_CONTEXT`` for the contexts asked (needs structured
   replies); the server answers the ids of those it knows.
3. ``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE``; if the server does
   not know ``NBD_OPT_GO`` (``NBD_REP_ERR_UNSUP``) the client falls back to
   ``NBD_OPT_EXPORT_NAME``.

A handshake made with ``list_exports=True`` sends ``NBD_OPT_LIST``
instead, reports :class:`~vmthunder.nbd.client_events.ExportList` and ends
the session with ``NBD_OPT_ABORT``.

Every option reply is checked (magic, the option it answers, its length,
its payload) before it is acted on; a refusal raises
:class:`~vmthunder.nbd.client_events.NbdHandshakeError`, a broken reply
:class:`~vmthunder.nbd.client_events.NbdProtocolError`.
"""

from __future__ import annotations

import enum
import types

from vmthunder.nbd import constants as c
from vmthunder.nbd.client_events import (Event, ExportEntry, ExportList,
                                         HandshakeDone, NbdError,
                                         NbdHandshakeError, NbdProtocolError,
                                         RemoteExport, decode, option_name)
from vmthunder.nbd.wire import (EXPORT_NAME_PADDING, EXPORT_NAME_REPLY,
                                GREETING, INFO_BLOCK_SIZE, INFO_EXPORT,
                                OPT_HEADER, OPT_REPLY, U16, U32, U32_MAX)

# Limit on what the server may make us buffer: option replies carry a few
# strings of at most 4 KiB.
MAX_OPTION_REPLY = 64 * 1024

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


class _Step(enum.Enum):
    GREETING = "waiting for the server greeting"
    OPTIONS = "negotiating options"
    EXPORT_NAME = "waiting for the NBD_OPT_EXPORT_NAME reply"
    DONE = "transmission"
    LISTED = "finished"


class ClientHandshake:
    """The handshake of one connection, from greeting to export.

    The arguments are :class:`NbdClientProtocol
    <vmthunder.nbd.client_protocol.NbdClientProtocol>`'s (checked here);
    ``out`` is the buffer the client's bytes are queued in. Feed the
    server's bytes to :meth:`receive` until :attr:`done`; then
    :attr:`export` is the negotiated export (``None`` when listing).
    """

    def __init__(self, export_name: str, want_structured: bool,
                 meta_contexts: tuple[str, ...] | list[str],
                 list_exports: bool, out: bytearray):
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
        self.out = out

        self._step = _Step.GREETING
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

    @property
    def done(self) -> bool:
        """The export is negotiated, or the exports are listed."""
        return self._step is _Step.DONE or self._step is _Step.LISTED

    @property
    def greeting_received(self) -> bool:
        return self._step is not _Step.GREETING

    @property
    def phase(self) -> str:
        """Where the handshake is, for messages."""
        if self._step is _Step.OPTIONS and self._option:
            return f"{self._step.value} ({option_name(self._option)})"
        return self._step.value

    def receive(self, view: memoryview, pos: int, end: int,
                events: list[Event]) -> int:
        """Act on the server message at ``view[pos:end]``; return its
        length, or 0 if it has not fully arrived."""
        step = self._step
        if step is _Step.OPTIONS:
            return self._parse_option_reply(view, pos, end, events)
        if step is _Step.GREETING:
            if end - pos < GREETING.size:
                return 0
            self._on_greeting(*GREETING.unpack_from(view, pos))
            return GREETING.size
        if step is _Step.EXPORT_NAME:
            return self._parse_export_name_reply(view, pos, end, events)
        raise AssertionError(f"handshake already {step.value}")

    def eof_error(self) -> NbdError:
        """The error that explains the server hanging up now."""
        if self._step is _Step.EXPORT_NAME:
            return NbdHandshakeError(
                f"server closed the connection after NBD_OPT_EXPORT_NAME: "
                f"export {self.export_name!r} does not exist or the server "
                f"refused it", option=c.OPT_EXPORT_NAME)
        what = (f"after {option_name(self._option)}"
                if self._option else self._step.value)
        return NbdHandshakeError(
            f"server closed the connection during the handshake "
            f"({what})", option=self._option)

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
        self._negotiated(size, flags, events)
        return need

    def _send_option(self, option: int, payload: bytes = b"") -> None:
        self._option = option
        self.out += OPT_HEADER.pack(c.IHAVEOPT, option, len(payload))
        self.out += payload

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
        self.out += U32.pack(cflags)
        if self.list_mode:
            if not fixed:
                raise NbdHandshakeError(
                    "server does not speak fixed newstyle NBD, so it "
                    "cannot list its exports")
            self._step = _Step.OPTIONS
            self._send_option(c.OPT_LIST)
        elif not fixed:
            # Plain newstyle: NBD_OPT_EXPORT_NAME is the only option.
            self._send_export_name()
        else:
            self._step = _Step.OPTIONS
            self._next_option(0)

    def _send_export_name(self) -> None:
        self._send_option(c.OPT_EXPORT_NAME, self._name_raw)
        self._step = _Step.EXPORT_NAME

    def _option_error(self, option: int, reply: int,
                      payload: bytes) -> NbdHandshakeError:
        text = decode(payload)
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
                self._negotiated(self._info_size, self._info_flags, events)
        elif option == c.OPT_LIST:
            if reply == c.REP_SERVER:
                self._on_server_entry(payload)
            else:
                self._expect_ack(option, reply, payload)
                events.append(ExportList(tuple(self._exports)))
                self._send_option(c.OPT_ABORT)
                self._step = _Step.LISTED
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
        name = decode(payload[4:])
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
            self._description = decode(payload[2:])
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
        self._exports.append(ExportEntry(decode(payload[4:4 + n]),
                                         decode(payload[4 + n:])))

    def _negotiated(self, size: int, flags: int,
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
        self._step = _Step.DONE
        self._option = 0
        events.append(HandshakeDone(self.export))
