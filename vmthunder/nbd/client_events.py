"""What the NBD client protocol hands its caller, and the words for it.

Errors it raises, the values a handshake settles (:class:`RemoteExport`,
:class:`ExportEntry`), the events :meth:`NbdClientProtocol.receive_data
<vmthunder.nbd.client_protocol.NbdClientProtocol.receive_data>` returns,
and the names of options, commands and errors used in their messages.
All importable from :mod:`vmthunder.nbd.client_protocol` too.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import types
from collections.abc import Mapping

from vmthunder.blockdev import Extent
from vmthunder.nbd import constants as c

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


def decode(raw: bytes) -> str:
    """A string the server sent (UTF-8; bad bytes never fail)."""
    return raw.decode("utf-8", errors="replace")


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
