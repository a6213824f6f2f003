"""Reply assembly of the NBD client: one request in flight and its reply.

A structured reply comes in chunks: data and holes anywhere in the range
asked for, block status per metadata context, error chunks. A
:class:`PendingRequest` checks each chunk against the request it answers,
records what the chunks cover (no overlaps; all of it, for a read that
succeeds), decodes block status descriptors and error chunks, and keeps
the buffer the read data lands in.
:class:`~vmthunder.nbd.client_protocol.NbdClientProtocol` frames the
replies and hands each chunk here; nothing here touches a socket.
"""

from __future__ import annotations

from vmthunder.blockdev import Extent
from vmthunder.nbd import constants as c
from vmthunder.nbd.client_events import (NbdProtocolError, command_name,
                                         decode, errno_from_wire)
from vmthunder.nbd import wire

# Limits on what the server may make us buffer: an error chunk carries a
# string of at most 4 KiB; a block status chunk one 8-byte descriptor per
# extent.
MAX_ERROR_CHUNK = 64 * 1024
MAX_BLOCK_STATUS_CHUNK = 4 + 8 * (8 * 1024 * 1024)

# Used per reply: bound here, not imported by name (see wire).
OFFSET_HOLE = wire.OFFSET_HOLE
BLOCK_DESCRIPTOR = wire.BLOCK_DESCRIPTOR
ERROR_HEAD = wire.ERROR_HEAD
U32 = wire.U32
U64 = wire.U64

_ZEROES = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROES)


def _zero(view: memoryview, start: int, length: int) -> None:
    end = start + length
    while start < end:
        n = min(end - start, len(_ZEROES))
        view[start:start + n] = _ZERO_VIEW[:n]
        start += n


class PendingRequest:
    """A request in flight and its reply so far (mutable bookkeeping,
    never handed out)."""

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

    def claim(self, offset: int, length: int, what: str) -> int:
        """Record a data or hole chunk for ``offset``/``length``; return
        where it starts in the request's buffer."""
        rel = offset - self.offset
        if rel < 0 or rel + length > self.length:
            raise NbdProtocolError(
                f"server sent a {what} chunk for offset={offset} "
                f"length={length}, outside the range of "
                f"{self.describe()}")
        # Overlaps are caught at the end (check_coverage).
        self.ranges.append((rel, rel + length))
        self.covered += length
        return rel

    def add_chunk(self, rtype: int, payload: memoryview, done: bool,
                  contexts) -> None:
        """Act on a chunk other than NBD_REPLY_TYPE_OFFSET_DATA, read
        whole. ``contexts`` maps the negotiated context names to ids."""
        length = len(payload)
        cmd = self.command
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
                    f"{self.describe()}")
            if length != 12:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_OFFSET_HOLE chunk of length {length} "
                    f"(must be 12)")
            offset, hole = OFFSET_HOLE.unpack_from(payload, 0)
            if hole == 0:
                raise NbdProtocolError(
                    "NBD_REPLY_TYPE_OFFSET_HOLE chunk with a hole of size 0")
            rel = self.claim(offset, hole, "hole")
            # The caller's buffer holds old bytes; a fresh one is zeroes.
            if self.into:
                _zero(self.view, rel, hole)
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            self._add_block_status(payload, contexts)
        elif rtype & c.REPLY_TYPE_FLAG_ERROR:
            self._add_error(rtype, payload)
        else:
            raise NbdProtocolError(
                f"unknown structured reply chunk type {rtype} for "
                f"{self.describe()}")

    def _add_block_status(self, payload: memoryview, contexts) -> None:
        if self.command != c.CMD_BLOCK_STATUS:
            raise NbdProtocolError(
                f"server sent NBD_REPLY_TYPE_BLOCK_STATUS to "
                f"{self.describe()}")
        length = len(payload)
        if length < 12 or (length - 4) % 8:
            raise NbdProtocolError(
                f"NBD_REPLY_TYPE_BLOCK_STATUS chunk of length {length} "
                f"(must be 4 plus a positive multiple of 8)")
        (context_id,) = U32.unpack_from(payload, 0)
        if context_id not in contexts.values():
            raise NbdProtocolError(
                f"block status for context id {context_id}, which was "
                f"not negotiated (negotiated: {dict(contexts)})")
        if context_id in self.extents:
            raise NbdProtocolError(
                f"two block status chunks for context id {context_id} in "
                f"one reply")
        extents: list[Extent] = []
        left = self.length
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
        self.extents[context_id] = extents

    def _add_error(self, rtype: int, payload: memoryview) -> None:
        length = len(payload)
        if length < ERROR_HEAD.size:
            raise NbdProtocolError(
                f"error chunk (type {rtype}) of length {length} is too "
                f"short (at least 6)")
        error, msg_len = ERROR_HEAD.unpack_from(payload, 0)
        if msg_len > length - ERROR_HEAD.size:
            raise NbdProtocolError(
                f"error chunk message length {msg_len} exceeds the chunk")
        message = decode(bytes(payload[6:6 + msg_len]))
        if rtype == c.REPLY_TYPE_ERROR_OFFSET:
            if length != 6 + msg_len + 8:
                raise NbdProtocolError(
                    f"NBD_REPLY_TYPE_ERROR_OFFSET chunk of length {length} "
                    f"does not hold a {msg_len}-byte message and an offset")
            (offset,) = U64.unpack_from(payload, 6 + msg_len)
            if not (self.offset <= offset
                    < self.offset + max(self.length, 1)):
                raise NbdProtocolError(
                    f"error offset {offset} outside the range of "
                    f"{self.describe()}")
            message = (f"{message} (at offset {offset})" if message
                       else f"error at offset {offset}")
        if error == 0:
            # The spec forbids it; still an error, never a success.
            error = c.EIO
        if self.error is None:
            self.error = (errno_from_wire(error), message)

    def ensure_buffer(self) -> None:
        if self.view is None:
            self.buf = bytearray(self.length)
            self.view = memoryview(self.buf)

    def release(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None

    def check_coverage(self) -> None:
        """The reply succeeded: its chunks must cover the request once."""
        ranges = sorted(self.ranges)
        prev_end = 0
        for start, stop in ranges:
            if start < prev_end:
                raise NbdProtocolError(
                    f"server sent overlapping chunks for "
                    f"{self.describe()}")
            prev_end = stop
        if self.covered != self.length:
            raise NbdProtocolError(
                f"server reported success for {self.describe()} but sent "
                f"only {self.covered} of {self.length} bytes")
