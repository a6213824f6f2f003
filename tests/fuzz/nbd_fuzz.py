"""A small NBD fuzzer of our own, against a real `vmthunder serve`.

Starts ``vmthunder serve IMAGE --export img --snapshot vm1`` (the
functional tests' start_serve) and runs many short client sessions
against it, one after the other. Each session comes from its own seeded
generator (``random.Random(f"{seed}:{index}")``) and is one of:

- *valid*: a correct handshake with a random mix of options (structured
  replies, meta contexts, LIST, INFO, unknown and oversized options,
  unknown export names), then transmission: pipelines of random requests
  (every command code, unknown ones too, random flags, offsets and
  lengths near 0, the export end, 2^63, the max_request boundary, CACHE,
  BLOCK_STATUS, TRIM and WRITE_ZEROES of huge ranges, writes whose payload
  is short, long or missing), and a random ending (NBD_CMD_DISC, EOF,
  reset, a half-sent request, a client that stops reading its replies);
- *mutated*: the bytes of a valid session with bit flips, truncation,
  insertions, deletions and interesting values in length fields;
- *garbage*: random bytes, with or without waiting for the greeting.

Everything the server sends back is parsed and checked: magics, option
replies matching the options sent, handles matching requests sent and not
yet answered, error codes from the NBD spec's set, reply chunks inside
their request, block status extents, and the data: a read of the cache
export ``img`` must equal the image file; a read of the snapshot ``vm1``
must equal a model of it (the image plus the writes the server
acknowledged; bytes an unacknowledged or concurrent write may have
touched are not checked until the next resync). Valid requests must
succeed, requests outside the export must fail.

Every few seconds (and at the end) the server itself is checked: the
process is alive, a well-behaved client reads ``img`` correctly at random
offsets (and all of ``vm1``, which resyncs the model), its peak RSS
(VmHWM) is under a bound, and its stderr holds no "Traceback" or
" ERROR ".

On a failure the seed and session index are printed; replay with::

    .venv/bin/python -m tests.fuzz.nbd_fuzz --seed S --session K

(``--session A-B`` replays a range: a failure found by a periodic check
names the sessions since the previous one). Long runs::

    .venv/bin/python -m tests.fuzz.nbd_fuzz --seconds 600 --seed 7

The fuzzer and the server are niced and together kept under ``--cpu``
cores on average (1 by default): the machine is shared.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
import urllib.parse

from vmthunder.nbd import constants as c

MiB = 1024 * 1024
RO_EXPORT = "img"
RW_EXPORT = "vm1"
# A second snapshot for the mutated and garbage sessions: what they write
# cannot be known, so they keep off vm1, whose content is checked. A name
# no bit flip of "vm1" or "img" makes.
WILD_EXPORT = "wild"
EXPORTS = (RO_EXPORT, RW_EXPORT, WILD_EXPORT)
# `vmthunder serve IMAGE` with these arguments serves what we fuzz.
SERVE_ARGS = ("--export", RO_EXPORT, "--snapshot", RW_EXPORT,
              "--snapshot", WILD_EXPORT)
# An unaligned end: the last block is short.
DEFAULT_IMAGE_SIZE = 16 * MiB + 12345
CONTEXTS = (c.BASE_ALLOCATION, c.VMTHUNDER_CACHE)
SPEC_ERRORS = frozenset({c.EPERM, c.EIO, c.ENOMEM, c.EINVAL, c.ENOSPC,
                         c.EOVERFLOW, c.ENOTSUP, c.ESHUTDOWN})
OPT_ERRORS = frozenset({c.REP_ERR_UNSUP, c.REP_ERR_POLICY,
                        c.REP_ERR_INVALID, c.REP_ERR_PLATFORM,
                        c.REP_ERR_TLS_REQD, c.REP_ERR_UNKNOWN,
                        c.REP_ERR_SHUTDOWN, c.REP_ERR_BLOCK_SIZE_REQD,
                        c.REP_ERR_TOO_BIG})
KNOWN_COMMANDS = (c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM,
                  c.CMD_CACHE, c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS)
CMD_NAMES = {c.CMD_READ: "READ", c.CMD_WRITE: "WRITE", c.CMD_DISC: "DISC",
             c.CMD_FLUSH: "FLUSH", c.CMD_TRIM: "TRIM", c.CMD_CACHE: "CACHE",
             c.CMD_WRITE_ZEROES: "WRITE_ZEROES",
             c.CMD_BLOCK_STATUS: "BLOCK_STATUS"}
WRITE_LIKE = frozenset({c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM})
ALL_CMD_FLAGS = (c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_DF
                 | c.CMD_FLAG_REQ_ONE | c.CMD_FLAG_FAST_ZERO)
# Transmission flags the spec defines (bits 0-11).
KNOWN_TFLAGS = (1 << 12) - 1
DEFAULT_MAX_REQUEST = c.DEFAULT_MAX_PAYLOAD
# Longest option reply payload we accept (names and messages are at most
# 4096 bytes).
MAX_OPT_REPLY = 64 * 1024
# Longest structured chunk payload other than read data.
MAX_CHUNK = 9 * MiB
# How long a request the server must answer may take (cold cache, a huge
# CACHE or WRITE_ZEROES, a loaded CI machine).
REPLY_DEADLINE = 30.0
# A small read of the well-behaved client must not take longer.
SLOW_READ = 10.0
# How long to wait for more bytes when nothing says more will come.
IDLE = 0.05

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_REQ = struct.Struct(">IHHQQI")
_OPT = struct.Struct(">QII")


class Violation(Exception):
    """The server broke the protocol or one of the invariants."""


class SessionFailure(Exception):
    def __init__(self, seed, index, message, transcript):
        super().__init__(message)
        self.seed, self.index = seed, index
        self.message = message
        self.transcript = transcript


class CheckFailure(Exception):
    """A periodic check of the server failed."""


# -- the image and the snapshot model -----------------------------------


def _is_zero(buf, lo: int, hi: int) -> bool:
    zero = bytes(min(hi - lo, MiB))
    pos = lo
    while pos < hi:
        n = min(MiB, hi - pos)
        if buf[pos:pos + n] != zero[:n]:
            return False
        pos += n
    return True


def _runs(mask, lo: int, hi: int, value: int):
    """Ranges [a, b) within [lo, hi) where mask == value (0/1 bytes)."""
    other = 1 - value
    pos = lo
    while pos < hi:
        start = mask.find(value, pos, hi)
        if start < 0:
            return
        end = mask.find(other, start, hi)
        end = hi if end < 0 else end
        yield start, end
        pos = end


class Model:
    """What the snapshot export must read as: the image plus the writes
    the server acknowledged. ``unknown`` marks bytes a completed but
    failed, concurrent or trimmed request may have changed (a later
    acknowledged write makes them known again); ``stray`` marks bytes a
    request never answered may still change (known again only after a
    resync)."""

    def __init__(self, source):
        self.size = len(source)
        self.data = bytearray(source)
        self.unknown = bytearray(self.size)
        self.stray = bytearray(self.size)
        # What changed the model, to explain a mismatch: (what, lo, hi).
        self.history = collections.deque(maxlen=50000)
        self.context = ""

    def _note(self, what, lo, hi):
        self.history.append((f"{self.context}: {what}", lo, hi))

    def explain(self, offset) -> list[str]:
        """The last changes of the model that covered ``offset``."""
        hits = [f"{what} [{lo}, {hi})" for what, lo, hi in self.history
                if lo <= offset < hi]
        return hits[-8:] or ["(never written: the image's bytes)"]

    def _clip(self, offset, length):
        lo = min(offset, self.size)
        return lo, min(offset + length, self.size)

    def mark_unknown(self, offset, length, stray=False):
        lo, hi = self._clip(offset, length)
        (self.stray if stray else self.unknown)[lo:hi] = b"\1" * (hi - lo)
        self._note("stray" if stray else "unknown", lo, hi)

    def write(self, offset, data):
        lo, hi = self._clip(offset, len(data))
        self.data[lo:hi] = data[:hi - lo]
        self.unknown[lo:hi] = bytes(hi - lo)
        self._note("written", lo, hi)

    def zero(self, offset, length):
        self.write(offset, bytes(min(length, self.size - offset)))

    def known_runs(self, lo, hi):
        """Ranges of [lo, hi) whose content is known."""
        for a, b in _runs(self.unknown, lo, hi, 0):
            yield from _runs(self.stray, a, b, 0)

    def resync(self, offset, data):
        hi = offset + len(data)
        self.data[offset:hi] = data
        self.unknown[offset:hi] = bytes(len(data))
        self.stray[offset:hi] = bytes(len(data))
        self._note("resync", offset, hi)


# -- requests -----------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Req:
    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    export: str
    expect: str                 # "ok", "err" or "any"
    payload: bytes | None = None
    payload_known: bool = True
    in_range: bool = False
    tainted: bool = False       # a concurrent write may change its data
    conflict: bool = False      # overlaps a concurrent write
    covered: list = dataclasses.field(default_factory=list)
    content_chunks: int = 0
    error: int = 0
    bs_ids: set = dataclasses.field(default_factory=set)

    def describe(self):
        name = CMD_NAMES.get(self.cmd, f"cmd{self.cmd}")
        return (f"{name} handle={self.handle:#x} offset={self.offset} "
                f"length={self.length} flags={self.flags:#x} "
                f"on {self.export!r} (expect {self.expect})")


@dataclasses.dataclass
class OptionSent:
    code: int
    payload: bytes
    expect: str                 # "ack", "err" or "any"
    name: str | None = None     # export named by INFO/GO/META/EXPORT_NAME
    queries: tuple = ()
    replies: list = dataclasses.field(default_factory=list)


# -- the reply stream checker -------------------------------------------


class Checker:
    """Parses and checks everything the server sends on one connection.

    ``strict``: we know exactly what the server received (valid
    sessions); otherwise (mutated bytes, garbage) only what the stream
    itself shows is checked, and parsing stops where it would need to
    know what the server received.
    """

    def __init__(self, session, strict: bool):
        self.s = session
        self.fz = session.fz
        self.strict = strict
        self._buf = bytearray()
        self._pos = 0
        self._gen = self._parse()
        self._need = next(self._gen)
        self.stopped = False        # parsing gave up (loose mode)
        self.boundary = True        # between two messages
        self.phase = "greeting"
        self.no_zeroes = False
        self.structured = False
        self.options: collections.deque[OptionSent] = collections.deque()
        self.meta: tuple | None = None      # (export name, {id: name})
        self.meta_unclear = False
        self.meta_ids_seen: set[int] = set()
        self.export: str | None = None
        self.size = self.fz.size
        self.read_only = False
        self.max_request = DEFAULT_MAX_REQUEST
        self.contexts: dict[int, str] | None = {}   # None: unclear
        self.outstanding: dict[int, Req] = {}
        self.desynced = False
        self.replies = 0
        self.bytes_in = 0

    # Feeding: the parser is a generator that yields how many bytes it
    # wants next and receives them.

    def feed(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.stopped:
            return
        self._buf += data
        while not self.stopped:
            need = self._need
            if len(self._buf) - self._pos < need:
                break
            piece = bytes(self._buf[self._pos:self._pos + need])
            self._pos += need
            try:
                self._need = self._gen.send(piece)
            except StopIteration:
                self._need = None
            if self._need is None:
                self.stopped = True
        if self._pos > 1 << 20 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0

    @property
    def mid_message(self) -> bool:
        if self.stopped:
            return False
        return not self.boundary or len(self._buf) > self._pos

    def fail(self, message: str):
        raise Violation(message)

    # -- parsing -----------------------------------------------------------

    def _parse(self):
        greeting = yield 18
        magic, ihaveopt, flags = struct.unpack(">QQH", greeting)
        if magic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT:
            self.fail(f"bad greeting {greeting.hex()}")
        if not flags & c.FLAG_FIXED_NEWSTYLE:
            self.fail(f"greeting flags {flags:#x} lack FIXED_NEWSTYLE")
        self.phase = "options"
        while self.phase == "options":
            self.boundary = True
            head = yield 8
            self.boundary = False
            (magic,) = _U64.unpack(head)
            if magic == c.OPT_REPLY_MAGIC:
                opt, rtype, length = struct.unpack(">III", (yield 12))
                if length > MAX_OPT_REPLY:
                    self.fail(f"option reply of {length} bytes "
                              f"(option {opt}, type {rtype:#x})")
                payload = yield length
                self._option_reply(opt, rtype, payload)
            else:
                yield from self._export_name_reply(head)
        if self.phase == "closed":
            self.boundary = True
            extra = yield 1
            self.fail(f"bytes after NBD_OPT_ABORT was acknowledged: "
                      f"{extra.hex()}")
        if self.phase == "opaque":
            return None
        while True:
            self.boundary = True
            head = yield 4
            self.boundary = False
            (magic,) = _U32.unpack(head)
            if magic == c.SIMPLE_REPLY_MAGIC:
                err, handle = struct.unpack(">IQ", (yield 12))
                if self.structured is True and self.strict:
                    req = self.outstanding.get(handle)
                    if req is not None and req.cmd == c.CMD_READ:
                        self.fail(f"simple reply to a READ after "
                                  f"structured replies were negotiated: "
                                  f"{req.describe()}")
                if err and err not in SPEC_ERRORS:
                    self.fail(f"simple reply with error {err}, not one of "
                              f"the spec's (handle {handle:#x})")
                req = self._request(handle)
                if req is None:
                    return None
                if req.cmd == c.CMD_READ and not err:
                    data = yield req.length
                    self.s.check_data(req, req.offset, data)
                self._done(req, err)
            elif magic == c.STRUCTURED_REPLY_MAGIC:
                if not self.structured:
                    self.fail("structured reply chunk without "
                              "NBD_OPT_STRUCTURED_REPLY negotiated")
                flags, rtype, handle, length = struct.unpack(
                    ">HHQI", (yield 16))
                if flags & ~c.REPLY_FLAG_DONE:
                    self.fail(f"reply chunk flags {flags:#x}")
                bound = MAX_CHUNK
                if rtype == c.REPLY_TYPE_OFFSET_DATA:
                    bound = 8 + max(self.max_request, DEFAULT_MAX_REQUEST)
                if length > bound:
                    self.fail(f"reply chunk type {rtype:#x} of {length} "
                              f"bytes (handle {handle:#x})")
                req = self._request(handle)
                if req is None and not self.strict:
                    payload = yield length
                    self._loose_chunk(flags, rtype, handle, payload)
                    continue
                if req is None:
                    return None
                payload = yield length
                self._chunk(req, flags, rtype, payload)
            else:
                self.fail(f"bad reply magic {magic:#x}")

    def _request(self, handle) -> Req | None:
        req = self.outstanding.get(handle)
        if req is not None:
            return req
        if self.strict and not self.desynced:
            self.fail(f"reply with handle {handle:#x}, which no request "
                      "in flight has")
        return None       # stop: we do not know what the server parsed

    # -- handshake -----------------------------------------------------------

    def _export_name_reply(self, head):
        if self.strict:
            exp = self.options[0] if self.options else None
            if exp is None or exp.code != c.OPT_EXPORT_NAME:
                self.fail(f"unexpected bytes in option phase: {head.hex()}")
            self.options.popleft()
            if exp.expect == "err":
                self.fail(f"NBD_OPT_EXPORT_NAME {exp.name!r} answered "
                          "instead of a hang-up")
            name = exp.name
        else:
            name = None
        (size,) = _U64.unpack(head)
        (flags,) = _U16.unpack((yield 2))
        if size != self.fz.size:
            self.fail(f"export size {size}, expected {self.fz.size}")
        self._check_tflags(flags, name)
        if not self.no_zeroes:
            zeros = yield 124
            if zeros != bytes(124):
                self.fail("the 124 reserved bytes after NBD_OPT_EXPORT_NAME"
                          " are not zero")
        self._enter_transmission(name, flags)

    def _check_tflags(self, flags, name):
        if not flags & c.FLAG_HAS_FLAGS:
            self.fail(f"transmission flags {flags:#x} lack HAS_FLAGS")
        if flags & ~KNOWN_TFLAGS:
            self.fail(f"unknown transmission flags {flags:#x}")
        if self.strict and name in EXPORTS:
            if bool(flags & c.FLAG_READ_ONLY) != (name == RO_EXPORT):
                self.fail(f"export {name!r} flags {flags:#x}: read-only "
                          "bit wrong")
        if flags & c.FLAG_SEND_DF and self.strict and not self.structured:
            self.fail(f"SEND_DF ({flags:#x}) without structured replies")

    def _enter_transmission(self, name, flags):
        self.phase = "transmission"
        self.export = name
        self.read_only = bool(flags & c.FLAG_READ_ONLY)
        if self.meta_unclear:
            self.contexts = None
        elif self.meta is None:
            self.contexts = {}
        elif self.meta[0] == name and self.meta[1]:
            self.contexts = dict(self.meta[1])
        else:
            self.contexts = None

    def _option_reply(self, opt, rtype, payload):
        final = rtype == c.REP_ACK or bool(rtype & c.REP_FLAG_ERROR)
        if rtype & c.REP_FLAG_ERROR:
            if rtype not in OPT_ERRORS:
                self.fail(f"option {opt}: unknown error reply {rtype:#x}")
            try:
                payload.decode()
            except UnicodeDecodeError:
                self.fail(f"option {opt}: error message is not UTF-8: "
                          f"{payload[:100]!r}")
        elif rtype not in (c.REP_ACK, c.REP_SERVER, c.REP_INFO,
                           c.REP_META_CONTEXT):
            self.fail(f"option {opt}: unknown reply type {rtype:#x}")
        if rtype == c.REP_ACK and payload:
            self.fail(f"option {opt}: ACK with {len(payload)} bytes")
        self._check_reply_payload(opt, rtype, payload)
        if not self.strict:
            self._loose_option_effect(opt, rtype, payload)
            return
        if not self.options:
            self.fail(f"reply {rtype:#x} to option {opt}, none in flight")
        exp = self.options[0]
        if opt != exp.code:
            self.fail(f"reply to option {opt}, expected one to "
                      f"{exp.code}")
        if not final:
            allowed = {c.OPT_LIST: c.REP_SERVER, c.OPT_INFO: c.REP_INFO,
                       c.OPT_GO: c.REP_INFO,
                       c.OPT_LIST_META_CONTEXT: c.REP_META_CONTEXT,
                       c.OPT_SET_META_CONTEXT: c.REP_META_CONTEXT}
            if allowed.get(opt) != rtype:
                self.fail(f"reply type {rtype:#x} to option {opt}")
            exp.replies.append((rtype, payload))
            return
        self.options.popleft()
        ok = rtype == c.REP_ACK
        if exp.expect == "ack" and not ok:
            self.fail(f"option {opt} ({exp.name!r}) failed with "
                      f"{rtype:#x}: {payload[:200]!r}")
        if exp.expect == "err" and ok:
            self.fail(f"option {opt} ({exp.name!r}, {len(exp.payload)} "
                      "bytes) was accepted; it is invalid")
        self._option_done(exp, ok)

    def _check_reply_payload(self, opt, rtype, payload):
        if rtype == c.REP_SERVER:
            if len(payload) < 4:
                self.fail("NBD_REP_SERVER shorter than 4 bytes")
            (nlen,) = _U32.unpack_from(payload)
            if nlen > len(payload) - 4:
                self.fail(f"NBD_REP_SERVER name length {nlen} > payload")
            name = payload[4:4 + nlen].decode("utf-8", "replace")
            if name not in EXPORTS:
                self.fail(f"NBD_OPT_LIST lists {name!r}")
        elif rtype == c.REP_META_CONTEXT:
            if len(payload) < 5:
                self.fail(f"NBD_REP_META_CONTEXT of {len(payload)} bytes")
            name = payload[4:].decode("utf-8", "replace")
            if name not in CONTEXTS:
                self.fail(f"meta context {name!r} offered")
            if opt == c.OPT_LIST_META_CONTEXT and \
                    _U32.unpack_from(payload)[0] != 0:
                # The spec: "reserved and SHOULD be set to zero".
                self.s.note("LIST_META_CONTEXT reply with a nonzero id")
        elif rtype == c.REP_INFO:
            if len(payload) < 2:
                self.fail("NBD_REP_INFO shorter than 2 bytes")
            (itype,) = _U16.unpack_from(payload)
            if itype == c.INFO_EXPORT:
                if len(payload) != 12:
                    self.fail(f"NBD_INFO_EXPORT of {len(payload)} bytes")
                _, size, flags = struct.unpack(">HQH", payload)
                if size != self.fz.size:
                    self.fail(f"NBD_INFO_EXPORT size {size}, expected "
                              f"{self.fz.size}")
                name = None
                if self.strict and self.options:
                    name = self.options[0].name
                self._check_tflags(flags, name)
            elif itype == c.INFO_BLOCK_SIZE:
                if len(payload) != 14:
                    self.fail(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
                _, lo, pref, hi = struct.unpack(">HIII", payload)
                if not (lo and lo & (lo - 1) == 0 and lo <= 65536
                        and pref >= lo and pref & (pref - 1) == 0
                        and hi >= lo and hi % lo == 0):
                    self.fail(f"block sizes min={lo} preferred={pref} "
                              f"max={hi}")
            elif itype in (c.INFO_NAME, c.INFO_DESCRIPTION):
                try:
                    payload[2:].decode()
                except UnicodeDecodeError:
                    self.fail(f"NBD_INFO {itype} not UTF-8")

    def _option_done(self, exp, ok):
        code = exp.code
        if code == c.OPT_STRUCTURED_REPLY and ok:
            self.structured = True
        elif code == c.OPT_SET_META_CONTEXT:
            if not ok:
                self.meta_unclear = True
                return
            ids = {}
            for _, payload in exp.replies:
                (ctx_id,) = _U32.unpack_from(payload)
                name = payload[4:].decode()
                if ctx_id in ids:
                    self.fail(f"meta context id {ctx_id} given twice")
                if not any(q == name or (q.endswith(":")
                                         and name.startswith(q))
                           for q in exp.queries):
                    self.fail(f"meta context {name!r} set, not asked for "
                              f"({exp.queries!r})")
                ids[ctx_id] = name
            self.meta_ids_seen |= set(ids)
            self.meta = (exp.name, ids)
            self.meta_unclear = False
        elif code in (c.OPT_INFO, c.OPT_GO) and ok:
            infos = [p for t, p in exp.replies
                     if _U16.unpack_from(p)[0] == c.INFO_EXPORT]
            if len(infos) != 1:
                self.fail(f"option {code}: {len(infos)} NBD_INFO_EXPORT "
                          "replies")
            for _, p in exp.replies:
                if _U16.unpack_from(p)[0] == c.INFO_BLOCK_SIZE and \
                        code == c.OPT_GO:
                    self.max_request = struct.unpack(">HIII", p)[3]
            if code == c.OPT_GO:
                _, _, flags = struct.unpack(">HQH", infos[0])
                self._enter_transmission(exp.name, flags)
        elif code == c.OPT_ABORT and ok:
            self.phase = "closed"
        elif code in (c.OPT_STARTTLS, c.OPT_EXTENDED_HEADERS) and ok:
            self.phase = "opaque"       # we cannot follow from here
        elif ok and code not in (c.OPT_LIST, c.OPT_LIST_META_CONTEXT,
                                 c.OPT_INFO):
            self.fail(f"unknown option {code} acknowledged")

    def _loose_option_effect(self, opt, rtype, payload):
        if rtype == c.REP_META_CONTEXT and opt == c.OPT_SET_META_CONTEXT:
            self.meta_ids_seen.add(_U32.unpack_from(payload)[0])
        if rtype == c.REP_INFO and opt == c.OPT_GO and \
                _U16.unpack_from(payload)[0] == c.INFO_EXPORT:
            self._go_flags = _U16.unpack_from(payload, 10)[0]
        if rtype != c.REP_ACK:
            return
        if opt == c.OPT_STRUCTURED_REPLY:
            self.structured = True
        elif opt == c.OPT_GO:
            self._enter_transmission(None, getattr(self, "_go_flags", 1))
        elif opt == c.OPT_ABORT:
            self.phase = "closed"
        elif opt not in (c.OPT_LIST, c.OPT_INFO, c.OPT_LIST_META_CONTEXT,
                         c.OPT_SET_META_CONTEXT):
            self.fail(f"option {opt} acknowledged; the server supports "
                      "no such option")

    # -- transmission --------------------------------------------------------

    def _loose_chunk(self, flags, rtype, handle, payload):
        """A chunk whose request we do not know: check its form only."""
        self._chunk_form(rtype, payload, handle)
        if rtype in (c.REPLY_TYPE_OFFSET_DATA, c.REPLY_TYPE_OFFSET_HOLE):
            (off,) = _U64.unpack_from(payload)
            n = (len(payload) - 8 if rtype == c.REPLY_TYPE_OFFSET_DATA
                 else _U32.unpack_from(payload, 8)[0])
            if off + n > self.size:
                self.fail(f"read chunk [{off}, {off + n}) past the export "
                          f"end {self.size}")
            if rtype == c.REPLY_TYPE_OFFSET_DATA and \
                    self.export_for_data() == RO_EXPORT:
                self.s.check_source(off, payload[8:], f"handle {handle:#x}")
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            (ctx_id,) = _U32.unpack_from(payload)
            if self.meta_ids_seen and ctx_id not in self.meta_ids_seen:
                self.fail(f"block status for context id {ctx_id}, never "
                          "given")

    def export_for_data(self):
        # Loose sessions: the read-only export is known by its flag.
        if self.export is not None:
            return self.export
        return RO_EXPORT if self.read_only else None

    def _chunk_form(self, rtype, payload, handle):
        n = len(payload)
        if rtype == c.REPLY_TYPE_NONE:
            if n:
                self.fail(f"NBD_REPLY_TYPE_NONE with {n} bytes")
        elif rtype == c.REPLY_TYPE_OFFSET_DATA:
            if n < 9:
                self.fail(f"OFFSET_DATA chunk of {n} bytes")
        elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
            if n != 12 or _U32.unpack_from(payload, 8)[0] == 0:
                self.fail(f"OFFSET_HOLE chunk {payload.hex()}")
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            if n < 12 or (n - 4) % 8:
                self.fail(f"BLOCK_STATUS chunk of {n} bytes")
        elif rtype in (c.REPLY_TYPE_ERROR, c.REPLY_TYPE_ERROR_OFFSET):
            extra = 8 if rtype == c.REPLY_TYPE_ERROR_OFFSET else 0
            if n < 6 + extra:
                self.fail(f"error chunk of {n} bytes")
            err, mlen = struct.unpack_from(">IH", payload)
            if err not in SPEC_ERRORS:
                self.fail(f"error chunk with error {err}, not one of the "
                          f"spec's (handle {handle:#x})")
            if n != 6 + mlen + extra or mlen > c.MAX_STRING:
                self.fail(f"error chunk of {n} bytes with a message of "
                          f"{mlen}")
            try:
                payload[6:6 + mlen].decode()
            except UnicodeDecodeError:
                self.fail(f"error message is not UTF-8: {payload[6:80]!r}")
        else:
            self.fail(f"unknown reply chunk type {rtype:#x}")

    def _chunk(self, req, flags, rtype, payload):
        self._chunk_form(rtype, payload, req.handle)
        done = bool(flags & c.REPLY_FLAG_DONE)
        what = req.describe()
        if rtype == c.REPLY_TYPE_NONE and not done:
            self.fail(f"NBD_REPLY_TYPE_NONE without DONE: {what}")
        if rtype in (c.REPLY_TYPE_OFFSET_DATA, c.REPLY_TYPE_OFFSET_HOLE):
            if req.cmd != c.CMD_READ:
                self.fail(f"read chunk {rtype} in reply to {what}")
            (off,) = _U64.unpack_from(payload)
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                n = len(payload) - 8
            else:
                n = _U32.unpack_from(payload, 8)[0]
            if off < req.offset or off + n > req.offset + req.length:
                self.fail(f"chunk [{off}, {off + n}) outside {what}")
            for a, b in req.covered:
                if off < b and a < off + n:
                    self.fail(f"chunk [{off}, {off + n}) overlaps [{a}, "
                              f"{b}) in reply to {what}")
            req.covered.append((off, off + n))
            req.content_chunks += 1
            if req.flags & c.CMD_FLAG_DF and req.content_chunks > 1:
                self.fail(f"several content chunks despite DF: {what}")
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                self.s.check_data(req, off, payload[8:])
            else:
                self.s.check_data(req, off, bytes(n))
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != c.CMD_BLOCK_STATUS:
                self.fail(f"block status chunk in reply to {what}")
            self._block_status(req, payload)
        elif rtype & c.REPLY_TYPE_FLAG_ERROR:
            err = _U32.unpack_from(payload)[0]
            if rtype == c.REPLY_TYPE_ERROR_OFFSET:
                if req.cmd in (c.CMD_FLUSH,) or req.cmd not in \
                        KNOWN_COMMANDS:
                    self.fail(f"ERROR_OFFSET chunk in reply to {what}")
                (off,) = _U64.unpack_from(payload, len(payload) - 8)
                if not req.offset <= off < req.offset + req.length:
                    self.fail(f"error offset {off} outside {what}")
            req.error = req.error or err
        if done:
            if not req.error and req.cmd == c.CMD_READ:
                got = sum(b - a for a, b in req.covered)
                if got != req.length:
                    self.fail(f"successful reply covers {got} of "
                              f"{req.length} bytes: {what}")
            if not req.error and req.cmd == c.CMD_BLOCK_STATUS and \
                    self.contexts is not None and \
                    req.bs_ids != set(self.contexts):
                self.fail(f"block status for contexts {sorted(req.bs_ids)},"
                          f" negotiated {sorted(self.contexts)}: {what}")
            self._done(req, req.error)

    def _block_status(self, req, payload):
        what = req.describe()
        (ctx_id,) = _U32.unpack_from(payload)
        known = self.contexts if self.contexts is not None else {
            i: None for i in self.meta_ids_seen}
        if ctx_id not in known:
            self.fail(f"block status for context id {ctx_id}, not "
                      f"negotiated ({sorted(known)}): {what}")
        if ctx_id in req.bs_ids:
            self.fail(f"two block status chunks for context {ctx_id}: "
                      f"{what}")
        req.bs_ids.add(ctx_id)
        name = known[ctx_id]
        extents = [struct.unpack_from(">II", payload, pos)
                   for pos in range(4, len(payload), 8)]
        if req.flags & c.CMD_FLAG_REQ_ONE and (
                len(extents) != 1 or extents[0][0] > req.length):
            self.fail(f"REQ_ONE answered with {extents[:4]}: {what}")
        pos = req.offset
        for i, (length, flags) in enumerate(extents):
            if length == 0:
                self.fail(f"zero-length extent: {what}")
            if i < len(extents) - 1 and pos + length >= \
                    req.offset + req.length:
                self.fail(f"extents go on past the request: {what}")
            allowed = (c.STATE_HOLE | c.STATE_ZERO
                       if name == c.BASE_ALLOCATION else c.STATE_CACHED)
            if name is not None and flags & ~allowed:
                self.fail(f"extent flags {flags:#x} for {name}: {what}")
            if pos + length > self.size:
                self.fail(f"extent [{pos}, {pos + length}) past the "
                          f"export end {self.size}: {what}")
            if name == c.BASE_ALLOCATION and flags & c.STATE_ZERO:
                self.s.check_zero_claim(req, pos, length)
            pos += length

    def _done(self, req, err):
        del self.outstanding[req.handle]
        self.replies += 1
        if req.expect == "ok" and err:
            self.fail(f"error {err} in reply to a valid request: "
                      f"{req.describe()}")
        if req.expect == "err" and not err:
            self.fail(f"success in reply to an invalid request: "
                      f"{req.describe()}")
        self.s.on_reply(req, err)


# -- socket I/O -----------------------------------------------------------


class Conn:
    """A non-blocking client socket; everything it receives goes to the
    checker as it comes, also while sending (so that a server that
    answers while we send never deadlocks us)."""

    def __init__(self, address, checker: Checker):
        self.sock = socket.create_connection(address, timeout=5)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.checker = checker
        self.reading = True
        self.eof = False
        self.reset = False
        self.closed = False
        self.bytes_out = 0

    def _pump(self, want_write: bool, timeout: float) -> bool:
        rlist = [self.sock] if self.reading and not self.eof else []
        wlist = [self.sock] if want_write else []
        if not rlist and not wlist:
            time.sleep(max(0.0, min(timeout, 0.01)))
            return False
        readable, writable, _ = select.select(rlist, wlist, [],
                                              max(0.0, timeout))
        if readable:
            self._recv()
        return bool(writable)

    def _recv(self):
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except (ConnectionResetError, BrokenPipeError):
            self.eof = self.reset = True
            return
        if not data:
            self.eof = True
            return
        self.checker.feed(data)

    def send(self, data, deadline: float) -> bool:
        """Send all of data; False if the server closed first or the
        deadline passed (a server that reads nothing more)."""
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or self.reset:
                return False
            if self._pump(True, min(left, 1.0)):
                try:
                    n = self.sock.send(view[:1 << 20])
                except (BlockingIOError, InterruptedError):
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.reset = True
                    return False
                view = view[n:]
                self.bytes_out += n
        return True

    def wait(self, done, deadline: float) -> bool:
        """Read until done() or EOF or the deadline; returns done()."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return done()
            self._pump(False, min(left, 1.0))
        return True

    def read_until_eof(self, deadline: float) -> bool:
        return self.wait(lambda: self.eof, deadline)

    def read_idle(self, idle: float, deadline: float) -> None:
        """Read until nothing came for ``idle`` seconds (or EOF)."""
        last = self.checker.bytes_in
        while not self.eof and time.monotonic() < deadline:
            self._pump(False, idle)
            if self.checker.bytes_in == last:
                return
            last = self.checker.bytes_in

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, reset=False):
        if self.closed:
            return
        self.closed = True
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.sock.close()


# -- building messages ----------------------------------------------------


def opt_bytes(code, payload=b""):
    return _OPT.pack(c.IHAVEOPT, code, len(payload)) + payload


def name_payload(name: bytes, info_requests=()):
    return (_U32.pack(len(name)) + name + _U16.pack(len(info_requests))
            + b"".join(_U16.pack(i) for i in info_requests))


def meta_payload(name: bytes, queries):
    out = _U32.pack(len(name)) + name + _U32.pack(len(queries))
    for q in queries:
        out += _U32.pack(len(q)) + q
    return out


def request_bytes(cmd, flags, handle, offset, length):
    return _REQ.pack(c.REQUEST_MAGIC, flags & 0xFFFF, cmd & 0xFFFF,
                     handle & (2**64 - 1), offset & (2**64 - 1),
                     length & 0xFFFFFFFF)


def make_payload(rng, n):
    if n <= 65536:
        return rng.randbytes(n)
    # A prime period: data written to the wrong place (a multiple of any
    # power of two away) still shows.
    piece = rng.randbytes(4093)
    return (piece * (n // 4093 + 1))[:n]


def pick(rng, weighted):
    """One of [(weight, value)]."""
    total = sum(w for w, _ in weighted)
    x = rng.random() * total
    for w, v in weighted:
        x -= w
        if x < 0:
            return v
    return weighted[-1][1]


# -- one session ----------------------------------------------------------


class Session:
    def __init__(self, fz, index):
        self.fz = fz
        self.index = index
        self.rng = random.Random(f"{fz.seed}:{index}")
        self.t0 = time.monotonic()
        self.transcript = collections.deque(maxlen=fz.transcript_lines)
        self.requests = 0
        self.kind = None
        self.checker: Checker | None = None
        self.conn: Conn | None = None
        self._handles: set[int] = set()
        self._inflight: list[Req] = []    # in-range vm1 requests in flight

    def log(self, text):
        text = f"{(time.monotonic() - self.t0) * 1000:7.1f} ms  {text}"
        self.transcript.append(text)
        if self.fz.verbose > 1:
            print(f"  [{self.index}] {text}", file=sys.stderr)

    def note(self, text):
        self.fz.notes[text] += 1

    # -- data checks (called by the checker) --------------------------------

    def check_source(self, offset, data, what):
        src = self.fz.source
        end = offset + len(data)
        if end > len(src) or src[offset:end] != data:
            first = next((i for i in range(len(data))
                          if offset + i >= len(src)
                          or src[offset + i] != data[i]), 0)
            raise Violation(f"wrong data from {RO_EXPORT!r} at offset "
                            f"{offset + first} ({what}): read "
                            f"{data[first:first + 16].hex()}, image has "
                            f"{src[offset + first:offset + first + 16].hex()}")

    def check_data(self, req, offset, data):
        if req.export == RO_EXPORT:
            self.check_source(offset, data, req.describe())
            return
        if req.export != RW_EXPORT or req.tainted:
            return
        model = self.fz.model
        for a, b in model.known_runs(offset, offset + len(data)):
            got = data[a - offset:b - offset]
            if got != model.data[a:b]:
                first = next(i for i in range(b - a)
                             if got[i] != model.data[a + i])
                raise Violation(
                    f"wrong data from {RW_EXPORT!r} at offset {a + first}"
                    f" ({req.describe()}): read "
                    f"{got[first:first + 16].hex()}, expected "
                    f"{model.data[a + first:a + first + 16].hex()}; "
                    "that byte's history:\n      "
                    + "\n      ".join(model.explain(a + first)))

    def check_zero_claim(self, req, offset, length):
        if req.export == RO_EXPORT:
            if not _is_zero(self.fz.source, offset, offset + length):
                raise Violation(f"extent [{offset}, {offset + length}) "
                                "said to read as zeros is not: "
                                f"{req.describe()}")
        elif req.export == RW_EXPORT and not req.tainted:
            model = self.fz.model
            for a, b in model.known_runs(offset, offset + length):
                if not _is_zero(model.data, a, b):
                    raise Violation(f"extent [{offset}, {offset + length})"
                                    " said to read as zeros is not: "
                                    f"{req.describe()}")

    # -- the snapshot model ------------------------------------------------

    def _track(self, req):
        """Before sending: note overlaps with vm1 requests in flight."""
        if req.export != RW_EXPORT or not req.in_range:
            return
        if req.cmd not in WRITE_LIKE and req.cmd not in (
                c.CMD_READ, c.CMD_BLOCK_STATUS):
            return
        lo, hi = req.offset, req.offset + req.length
        writes = req.cmd in WRITE_LIKE
        for other in self._inflight:
            if other.offset < hi and lo < other.offset + other.length:
                other_writes = other.cmd in WRITE_LIKE
                if writes and other_writes:
                    req.conflict = other.conflict = True
                elif writes:
                    other.tainted = True
                elif other_writes:
                    req.tainted = True
        self._inflight.append(req)

    def on_reply(self, req, err):
        self.log(f"reply {'error ' + str(err) if err else 'ok'} to "
                 f"handle {req.handle:#x}")
        self.fz.replies += 1
        if err:
            self.fz.errors[err] += 1
        if req in self._inflight:
            self._inflight.remove(req)
        if req.export != RW_EXPORT or not req.in_range or \
                req.cmd not in WRITE_LIKE:
            return
        model = self.fz.model
        model.context = f"session {self.index} {req.describe()} -> " + (
            f"error {err}" if err else "ok") + (
            " (concurrent)" if req.conflict else "")
        if err or req.conflict or not req.payload_known \
                or req.cmd == c.CMD_TRIM:
            model.mark_unknown(req.offset, req.length)
        elif req.cmd == c.CMD_WRITE:
            model.write(req.offset, req.payload)
        else:
            model.zero(req.offset, req.length)

    def _end_model(self):
        """Requests never answered may still land: their bytes are
        unknown until the next resync."""
        for req in self._inflight:
            if req.cmd in WRITE_LIKE:
                self.fz.model.context = (f"session {self.index} "
                                         f"{req.describe()} unanswered")
                self.fz.model.mark_unknown(req.offset, req.length,
                                           stray=True)
        self._inflight.clear()

    # -- running ------------------------------------------------------------

    def run(self):
        rng = self.rng
        self.kind = pick(rng, [(60, "valid"), (28, "mutated"),
                               (12, "garbage")])
        self.fz.kinds[self.kind] += 1
        self.log(f"session {self.index}: {self.kind}")
        self.checker = Checker(self, strict=self.kind == "valid")
        try:
            self.conn = Conn(self.fz.address, self.checker)
        except OSError as exc:
            raise Violation(f"cannot connect: {exc}") from None
        self.log("connected from port "
                 f"{self.conn.sock.getsockname()[1]}")
        try:
            getattr(self, "_run_" + self.kind)()
        finally:
            self.conn.close()
            self._end_model()
            self.fz.bytes_out += self.conn.bytes_out
            self.fz.bytes_in += self.checker.bytes_in

    # -- garbage and mutated sessions -------------------------------------

    def _run_garbage(self):
        rng, conn = self.rng, self.conn
        deadline = time.monotonic() + 5
        if rng.random() < 0.7:
            conn.wait(lambda: self.checker.phase != "greeting", deadline)
        n = pick(rng, [(4, rng.randrange(1, 8)), (4, rng.randrange(8, 64)),
                       (2, rng.randrange(64, 4096)), (1, 70000)])
        data = rng.randbytes(n)
        if rng.random() < 0.3:
            # Valid client flags first, then garbage options.
            data = _U32.pack(rng.choice([1, 3])) + data
        self.log(f"send {len(data)} random bytes")
        self.checker.no_zeroes = bool(
            _U32.unpack_from(data)[0] & c.FLAG_C_NO_ZEROES) \
            if len(data) >= 4 else False
        conn.send(data, deadline)
        self._finish_loose(deadline)

    def _finish_loose(self, deadline):
        rng, conn = self.rng, self.conn
        how = pick(rng, [(6, "eof"), (2, "idle"), (1, "rst"),
                         (1, "close")])
        self.log(f"end: {how}")
        if how == "eof":
            conn.shutdown()
            if not conn.read_until_eof(time.monotonic() + self.fz.deadline):
                raise Violation(f"server did not close {self.fz.deadline:g} "
                                "s after the client's EOF")
            self._check_eof()
        elif how == "idle":
            conn.read_idle(IDLE, deadline)
        else:
            conn.close(reset=how == "rst")

    def _check_eof(self):
        if self.conn.eof and not self.conn.reset and \
                self.checker.mid_message:
            raise Violation("server closed the connection in the middle "
                            "of a message")

    def _run_mutated(self):
        rng, conn = self.rng, self.conn
        data = bytearray(self._valid_stream())
        for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
            self._mutate(data)
        self.log(f"send {len(data)} mutated bytes")
        self.checker.no_zeroes = len(data) >= 4 and bool(
            _U32.unpack_from(data)[0] & c.FLAG_C_NO_ZEROES)
        deadline = time.monotonic() + 10
        if len(data) < 2048 and rng.random() < 0.2:
            pos = 0
            while pos < len(data):
                n = rng.randrange(1, 40)
                if not conn.send(bytes(data[pos:pos + n]), deadline):
                    break
                pos += n
        else:
            conn.send(bytes(data), deadline)
        self._finish_loose(deadline)

    def _valid_stream(self):
        """The bytes of a plausible session, sent blind."""
        rng = self.rng
        out = bytearray(_U32.pack(c.FLAG_C_FIXED_NEWSTYLE
                                  | c.FLAG_C_NO_ZEROES))
        export = rng.choice([RO_EXPORT, WILD_EXPORT]).encode()
        if rng.random() < 0.6:
            out += opt_bytes(c.OPT_STRUCTURED_REPLY)
            if rng.random() < 0.5:
                out += opt_bytes(c.OPT_SET_META_CONTEXT, meta_payload(
                    export, [q.encode() for q in CONTEXTS]))
        for _ in range(rng.choice([0, 1, 2])):
            out += opt_bytes(*self._random_option(export))
        if rng.random() < 0.8:
            out += opt_bytes(c.OPT_GO, name_payload(
                export, rng.choice([(), (c.INFO_BLOCK_SIZE,)])))
        else:
            out += opt_bytes(c.OPT_EXPORT_NAME, export)
        for _ in range(rng.choice([0, 1, 2, 4, 8])):
            cmd = rng.choice(KNOWN_COMMANDS)
            offset = rng.choice([0, 4096, self.fz.size - 512,
                                 rng.randrange(self.fz.size)])
            length = rng.choice([1, 512, 4096, 65536])
            out += request_bytes(cmd, 0, rng.getrandbits(64), offset,
                                 length)
            if cmd == c.CMD_WRITE:
                out += rng.randbytes(length)
        if rng.random() < 0.5:
            out += request_bytes(c.CMD_DISC, 0, 1, 0, 0)
        return bytes(out)

    _INTERESTING32 = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF,
                      0x10000, 4096, 4097, 65536, 65537, 0x7FFFFFFF,
                      0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)

    def _mutate(self, data: bytearray):
        rng = self.rng
        if not data:
            data += rng.randbytes(8)
            return
        what = pick(rng, [(5, "flip"), (3, "byte"), (4, "u32"),
                          (3, "truncate"), (2, "insert"), (2, "delete"),
                          (1, "duplicate"), (2, "option")])
        pos = rng.randrange(len(data))
        if what == "flip":
            for _ in range(rng.randint(1, 8)):
                p = rng.randrange(len(data))
                data[p] ^= 1 << rng.randrange(8)
        elif what == "byte":
            data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF,
                                    rng.randrange(256)])
        elif what == "u32":
            data[pos:pos + 4] = _U32.pack(rng.choice(self._INTERESTING32))
        elif what == "truncate":
            del data[pos:]
        elif what == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif what == "delete":
            del data[pos:pos + rng.randint(1, 64)]
        elif what == "duplicate":
            n = rng.randint(1, 64)
            data[pos:pos] = data[pos:pos + n]
        else:
            data[pos:pos] = opt_bytes(*self._random_option(b"img"))
        self.log(f"mutation {what} at {pos}")

    def _random_option(self, export: bytes):
        rng = self.rng
        code = rng.choice([c.OPT_LIST, c.OPT_INFO, c.OPT_GO,
                           c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT,
                           c.OPT_STRUCTURED_REPLY, c.OPT_STARTTLS,
                           c.OPT_EXTENDED_HEADERS, 0, 4, 12, 0xFFFFFFFF,
                           rng.getrandbits(32)])
        if code in (c.OPT_INFO, c.OPT_GO):
            return code, name_payload(export, [rng.randrange(8)])
        if code in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            return code, meta_payload(export, [b"base:"])
        return code, rng.randbytes(rng.choice([0, 0, 1, 16]))

    # -- valid sessions ----------------------------------------------------

    def _send(self, data: bytes, deadline=None) -> bool:
        deadline = deadline or time.monotonic() + self.fz.deadline
        if len(data) < 512 and self.rng.random() < 0.05:
            for i in range(len(data)):        # one byte at a time
                if not self.conn.send(data[i:i + 1], deadline):
                    return False
            return True
        return self.conn.send(data, deadline)

    def _expect_close(self, what):
        if not self.conn.read_until_eof(time.monotonic() + self.fz.deadline):
            raise Violation(f"server did not hang up after {what}")
        self._check_eof()

    def _wait_options(self):
        ok = self.conn.wait(lambda: not self.checker.options,
                            time.monotonic() + self.fz.deadline)
        if not ok:
            exp = self.checker.options[0]
            raise Violation(f"no reply to option {exp.code} "
                            f"({exp.name!r}) within {self.fz.deadline:g} s"
                            + (" (server hung up)" if self.conn.eof
                               else ""))

    def _option(self, opt: OptionSent, wait=True) -> bool:
        self.log(f"option {opt.code} name={opt.name!r} "
                 f"{len(opt.payload)} bytes, expect {opt.expect}")
        self.checker.options.append(opt)
        if not self._send(opt_bytes(opt.code, opt.payload)):
            return False
        if wait:
            self._wait_options()
        return True

    def _run_valid(self):
        rng, ck = self.rng, self.checker
        deadline = time.monotonic() + self.fz.deadline
        if not self.conn.wait(lambda: ck.phase != "greeting", deadline):
            raise Violation("no greeting")
        flags = c.FLAG_C_FIXED_NEWSTYLE
        if rng.random() < 0.7:
            flags |= c.FLAG_C_NO_ZEROES
        bad_flags = rng.random() < 0.03
        if bad_flags:
            flags = rng.choice([0, c.FLAG_C_NO_ZEROES, 4, 0xFFFFFFFF])
        ck.no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
        self._send(_U32.pack(flags))
        if bad_flags:
            self.log(f"client flags {flags:#x}")
            self._expect_close("bad client flags")
            return
        export = pick(rng, [(45, RO_EXPORT), (45, RW_EXPORT),
                            (3, ""), (4, "nosuch"), (1, "img\0"),
                            (1, "x" * 5000), (1, "\u00e9\u00e9")])
        for opt in self._option_plan(export):
            pipelined = rng.random() < 0.2
            if not self._option(opt, wait=not pipelined):
                return
            if opt.code == c.OPT_ABORT or ck.phase == "opaque":
                break
        self._wait_options()
        if ck.phase == "opaque":
            return
        if ck.phase == "closed":
            self._expect_close("NBD_OPT_ABORT")
            return
        if not self._go(export):
            return
        if ck.phase != "transmission":
            if rng.random() < 0.5 and export not in (RO_EXPORT, RW_EXPORT):
                # Try again with a real name.
                export = rng.choice([RO_EXPORT, RW_EXPORT])
                if not self._go(export) or ck.phase != "transmission":
                    return
            else:
                return
        self._transmission()

    def _go(self, export) -> bool:
        rng, ck = self.rng, self.checker
        raw = export.encode()
        known = export in EXPORTS
        how = pick(rng, [(70, "go"), (25, "export_name"), (5, "abort")])
        if how == "abort":
            self._option(OptionSent(c.OPT_ABORT, b"", "any"))
            if ck.phase == "closed":
                self._expect_close("NBD_OPT_ABORT")
            return False
        if how == "export_name":
            expect = "any" if export == "" else ("ack" if known else "err")
            opt = OptionSent(c.OPT_EXPORT_NAME, raw, expect, name=export)
            self.log(f"option EXPORT_NAME {export[:40]!r}")
            ck.options.append(opt)
            if not self._send(opt_bytes(c.OPT_EXPORT_NAME, raw)):
                return False
            if expect == "err":
                self._expect_close("NBD_OPT_EXPORT_NAME of an unknown "
                                   "export")
                return False
            if not self.conn.wait(
                    lambda: ck.phase == "transmission" or self.conn.eof,
                    time.monotonic() + self.fz.deadline):
                raise Violation("no reply to NBD_OPT_EXPORT_NAME")
            if ck.phase != "transmission":
                if expect == "ack":
                    raise Violation(f"hung up on NBD_OPT_EXPORT_NAME "
                                    f"{export!r}")
                return False
            return True
        info = rng.sample([c.INFO_EXPORT, c.INFO_NAME, c.INFO_DESCRIPTION,
                           c.INFO_BLOCK_SIZE, 4, 77, 0xFFFF],
                          rng.randrange(0, 4))
        payload = name_payload(raw, info)
        if len(raw) > c.MAX_STRING:
            expect = "err"
        else:
            expect = "any" if export == "" else ("ack" if known else "err")
        self._option(OptionSent(c.OPT_GO, payload, expect, name=export))
        return True

    def _option_plan(self, export: str):
        """Options before GO: a random mix, valid and not."""
        rng = self.rng
        raw = export.encode()
        plan = []
        structured = rng.random() < 0.65
        meta = rng.random() < 0.5
        extras = rng.choice([0, 0, 1, 2, 3, 6])
        steps = ["extra"] * extras
        if structured:
            steps.insert(rng.randrange(len(steps) + 1), "structured")
        if meta:
            # Usually after STRUCTURED_REPLY (else it must fail).
            at = len(steps) if rng.random() < 0.9 else 0
            steps.insert(at, "meta")
        have_structured = False
        for step in steps:
            if step == "structured":
                plan.append(OptionSent(c.OPT_STRUCTURED_REPLY, b"",
                                       "any" if have_structured else "ack"))
                have_structured = True
            elif step == "meta":
                plan.append(self._meta_option(
                    c.OPT_SET_META_CONTEXT, export, have_structured))
            else:
                plan.append(self._extra_option(raw, export,
                                               have_structured))
                if plan[-1].code == c.OPT_STRUCTURED_REPLY and \
                        plan[-1].expect != "err":
                    have_structured = True
        return plan

    def _meta_option(self, code, export, structured):
        rng = self.rng
        name = export if rng.random() < 0.85 else rng.choice(
            [RO_EXPORT, RW_EXPORT, "nosuch"])
        queries = pick(rng, [
            (6, [c.BASE_ALLOCATION]), (4, list(CONTEXTS)),
            (2, [c.VMTHUNDER_CACHE]), (2, ["base:"]), (1, []),
            (1, ["qemu:dirty-bitmap:x", c.BASE_ALLOCATION]),
            (1, [rng.randbytes(8).hex()]), (1, [c.BASE_ALLOCATION] * 3)])
        payload = meta_payload(name.encode(),
                               [q.encode() for q in queries])
        if code == c.OPT_SET_META_CONTEXT and not structured:
            expect = "err"
        elif name not in EXPORTS:
            expect = "any" if name == "" else "err"
        else:
            expect = "ack"
        if rng.random() < 0.1:
            # Malformed: a count or a length that lies. Should the server
            # take it anyway, any of its contexts may come back.
            cut = rng.randrange(len(payload))
            payload = payload[:cut] + rng.randbytes(rng.randrange(3))
            expect = "any"
            queries = ["base:", "vmthunder:"]
        return OptionSent(code, payload, expect, name=name,
                          queries=tuple(queries))

    def _extra_option(self, raw, export, structured):
        rng = self.rng
        what = pick(rng, [(3, "list"), (3, "info"), (3, "list_meta"),
                          (2, "set_meta"), (3, "unknown"), (1, "starttls"),
                          (1, "extended"), (2, "oversized"),
                          (1, "structured_data"), (1, "list_data"),
                          (2, "bad_name")])
        if what == "list":
            return OptionSent(c.OPT_LIST, b"", "ack")
        if what == "list_data":
            return OptionSent(c.OPT_LIST, b"x", "err")
        if what == "structured_data":
            return OptionSent(c.OPT_STRUCTURED_REPLY, b"\0", "err")
        if what == "info":
            name = rng.choice([export, RO_EXPORT, RW_EXPORT, "nosuch"])
            known = name in EXPORTS
            return OptionSent(c.OPT_INFO, name_payload(
                name.encode(), rng.sample(range(6), rng.randrange(4))),
                "ack" if known else ("any" if name == "" else "err"),
                name=name)
        if what in ("list_meta", "set_meta"):
            code = (c.OPT_LIST_META_CONTEXT if what == "list_meta"
                    else c.OPT_SET_META_CONTEXT)
            return self._meta_option(code, export, structured)
        if what == "unknown":
            code = rng.choice([0, 4, 12, 13, 0x7FFFFFFF, 0xFFFFFFFF,
                               rng.getrandbits(32) | 0x100])
            return OptionSent(code, rng.randbytes(rng.choice([0, 3, 300])),
                              "err")
        if what == "starttls":
            return OptionSent(c.OPT_STARTTLS, b"", "any")
        if what == "extended":
            return OptionSent(c.OPT_EXTENDED_HEADERS, b"", "any")
        if what == "oversized":
            # Longer than any option the server reads; it must skip it.
            n = rng.choice([65537, 100000, 1 << 20])
            return OptionSent(rng.choice([c.OPT_GO, c.OPT_INFO, 4321]),
                              rng.randbytes(n), "err")
        # bad_name: lengths that lie, names too long.
        kind = rng.choice(["long", "nlen", "nreq", "short"])
        if kind == "long":
            payload = name_payload(b"y" * 4097)
        elif kind == "nlen":
            payload = _U32.pack(rng.choice([1000, 0xFFFFFFFF])) + raw
        elif kind == "nreq":
            payload = name_payload(raw)[:-2] + _U16.pack(5)
        else:
            payload = b"\0\0"
        return OptionSent(rng.choice([c.OPT_INFO, c.OPT_GO]), payload,
                          "err", name=None)

    # -- transmission -------------------------------------------------------

    def _handle(self):
        rng = self.rng
        while True:
            h = pick(rng, [(90, rng.getrandbits(64)), (3, 0),
                           (3, 2**64 - 1), (4, rng.randrange(256))])
            if h not in self._handles:
                self._handles.add(h)
                return h

    def _classify(self, cmd, flags, offset, length):
        ck = self.checker
        if cmd not in KNOWN_COMMANDS:
            return "err"
        if flags & ~ALL_CMD_FLAGS:
            return "err"
        allowed = {c.CMD_READ: c.CMD_FLAG_DF if ck.structured else 0,
                   c.CMD_WRITE: c.CMD_FLAG_FUA,
                   c.CMD_TRIM: c.CMD_FLAG_FUA,
                   c.CMD_WRITE_ZEROES: (c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE
                                        | c.CMD_FLAG_FAST_ZERO),
                   c.CMD_BLOCK_STATUS: c.CMD_FLAG_REQ_ONE}.get(cmd, 0)
        weird = flags & ~allowed
        if cmd == c.CMD_FLUSH:
            return "ok" if (offset, length, weird) == (0, 0, 0) else "any"
        if ck.read_only and cmd in WRITE_LIKE:
            return "err"
        if cmd == c.CMD_BLOCK_STATUS:
            if ck.contexts is None:
                return "any"
            if not ck.contexts:
                return "err"
        if length == 0:
            return "any"
        if cmd in (c.CMD_READ, c.CMD_WRITE) and length > ck.max_request:
            return "err"
        if offset + length > self.fz.size:
            return "err"
        if weird:
            return "any"
        if cmd == c.CMD_WRITE_ZEROES and flags & c.CMD_FLAG_FAST_ZERO:
            return "any"
        return "ok"

    def _offset(self):
        rng, size = self.rng, self.fz.size
        chunk = 256 * 1024
        return pick(rng, [
            (30, rng.randrange(size)),
            (8, rng.randrange(min(size, 65536))),
            (10, rng.randrange(size // 4096 + 1) * 4096),
            (6, max(0, rng.randrange(size // chunk + 1) * chunk
                    + rng.choice([-1, 0, 1, -512, 512]))),
            (12, max(0, size - rng.randrange(1, min(size, 1 << 20)))),
            (3, size), (3, size + rng.randrange(1, 1 << 30)),
            (5, rng.choice([2**63, 2**63 - 1, 2**64 - 1, 2**64 - 512,
                            2**63 - size, rng.getrandbits(64)])),
            (5, 0)])

    def _length(self, cmd, offset):
        rng, size = self.rng, self.fz.size
        mreq = self.checker.max_request
        to_end = max(1, size - offset) if offset < size else 1
        big = cmd in (c.CMD_CACHE, c.CMD_BLOCK_STATUS, c.CMD_TRIM,
                      c.CMD_WRITE_ZEROES)
        # Mostly small: large reads and writes cost time and bandwidth
        # of a shared machine, and find little more.
        return pick(rng, [
            (30, rng.randint(1, 4096)),
            (15, rng.choice([512, 4096, 8192, 65536, 131072, 131073,
                             262144, MiB])),
            (15, rng.randint(1, 256 * 1024)),
            (3, rng.randint(256 * 1024, 2 * MiB)),
            (10 if big else 0.5, min(to_end, 2**32 - 1)),
            (1 if cmd == c.CMD_READ else 0.2,
             mreq + rng.choice([-1, 0, 1])),
            (3, 0),
            (8 if big else 2, rng.choice([2**32 - 1, 2**31, 2**32 - 512,
                                          rng.getrandbits(32)])),
            (8 if big else 0.3, size)])

    def _flags(self, cmd):
        rng = self.rng
        valid = {c.CMD_READ: [c.CMD_FLAG_DF],
                 c.CMD_WRITE: [c.CMD_FLAG_FUA],
                 c.CMD_TRIM: [c.CMD_FLAG_FUA],
                 c.CMD_WRITE_ZEROES: [c.CMD_FLAG_FUA, c.CMD_FLAG_NO_HOLE,
                                      c.CMD_FLAG_FAST_ZERO],
                 c.CMD_BLOCK_STATUS: [c.CMD_FLAG_REQ_ONE]}.get(cmd, [])
        x = rng.random()
        if x < 0.6 or (x < 0.85 and not valid):
            return 0
        if x < 0.85:
            flags = 0
            for f in valid:
                if rng.random() < 0.5:
                    flags |= f
            return flags or valid[0]
        if x < 0.95:
            return rng.randrange(32)
        return rng.choice([rng.getrandbits(16), 1 << rng.randrange(5, 16)])

    def _request(self, batch: list) -> bool:
        """Build and send one request; False: the session ends here."""
        rng, ck = self.rng, self.checker
        cmd = pick(rng, [(30, c.CMD_READ), (15, c.CMD_WRITE),
                         (5, c.CMD_FLUSH), (6, c.CMD_TRIM),
                         (6, c.CMD_CACHE), (8, c.CMD_WRITE_ZEROES),
                         (10, c.CMD_BLOCK_STATUS),
                         (4, rng.choice([8, 9, 31, 0xFFFF,
                                         rng.randrange(8, 0x10000)]))])
        flags = self._flags(cmd)
        if cmd == c.CMD_FLUSH and rng.random() < 0.8:
            offset = length = 0
        else:
            offset = self._offset()
            length = self._length(cmd, offset)
        expect = self._classify(cmd, flags, offset, length)
        req = Req(cmd, flags, self._handle(), offset, length, ck.export,
                  expect)
        req.in_range = 0 < length and offset + length <= self.fz.size
        data = request_bytes(cmd, flags, req.handle, offset, length)
        final = False
        if cmd == c.CMD_WRITE:
            mode = pick(rng, [(85, "exact"), (4, "short"), (4, "long"),
                              (4, "missing"), (3, "header_only")])
            if length > ck.max_request + MiB:
                mode = "oversized"
            if mode in ("exact", "long"):
                req.payload = make_payload(rng, length)
                data += req.payload
                if mode == "long":
                    data += rng.randbytes(rng.randint(1, 64))
            elif mode == "short":
                short = rng.randrange(max(1, min(length, MiB)))
                data += make_payload(rng, short)
                final = True
            elif mode == "oversized":
                data += rng.randbytes(rng.randrange(65536))
                final = True
            elif mode == "header_only":
                final = True
            else:
                req.payload_known = False
            if mode in ("long", "missing"):
                self.log(f"write payload {mode}: stream out of step")
        self.requests += 1
        self.fz.requests += 1
        self.fz.commands[CMD_NAMES.get(cmd, "unknown")] += 1
        self.log(f"request {req.describe()}"
                 + (f" [{mode}]" if cmd == c.CMD_WRITE else ""))
        ck.outstanding[req.handle] = req
        self._track(req)
        batch.append(req)
        sent = self._send(data, time.monotonic() + self.fz.deadline)
        if not sent:
            self.log("could not send it all: "
                     + ("connection reset" if self.conn.reset else
                        "server closed" if self.conn.eof else "timeout"))
        if cmd == c.CMD_WRITE and mode in ("long", "missing"):
            ck.desynced = True
        return sent and not final

    def _drain(self):
        ck = self.checker
        if ck.desynced:
            return
        ok = self.conn.wait(lambda: not ck.outstanding or ck.stopped,
                            time.monotonic() + self.fz.deadline)
        if not ok and not ck.stopped:
            req = next(iter(ck.outstanding.values()))
            raise Violation(
                f"{len(ck.outstanding)} requests unanswered after "
                f"{self.fz.deadline:g} s"
                + (" (server hung up)" if self.conn.eof else "")
                + f", e.g. {req.describe()}")

    def _transmission(self):
        rng, ck, conn = self.rng, self.checker, self.conn
        batches = rng.choice([1, 1, 2, 3, 5, 10])
        for _ in range(batches):
            size = pick(rng, [(30, 1), (20, 2), (20, 4), (15, 8),
                              (8, 16), (5, 64), (2, 200)])
            batch = []
            for _ in range(size):
                if not self._request(batch):
                    self._end_abruptly()
                    return
                if conn.eof or ck.stopped:
                    break
            if conn.eof or ck.stopped:
                break
            if rng.random() < 0.7:
                self._drain()
        how = pick(rng, [(30, "disc"), (15, "eof"), (15, "close"),
                         (10, "rst"), (10, "disc_close"), (10, "half"),
                         (5, "stop_reading"), (5, "drain_close")])
        self.log(f"end: {how}")
        deadline = time.monotonic() + self.fz.deadline
        if how in ("disc", "disc_close"):
            self._send(request_bytes(c.CMD_DISC, rng.choice([0, 1]),
                                     self._handle(), 0, 0), deadline)
            if how == "disc_close":
                conn.close(reset=rng.random() < 0.3)
                return
            conn.shutdown()
            if not conn.read_until_eof(deadline):
                raise Violation("server did not close after NBD_CMD_DISC")
            self._check_eof()
            if ck.outstanding and not ck.desynced and not ck.stopped:
                req = next(iter(ck.outstanding.values()))
                raise Violation(
                    f"server closed after NBD_CMD_DISC leaving "
                    f"{len(ck.outstanding)} requests unanswered, e.g. "
                    f"{req.describe()}")
        elif how == "eof":
            conn.shutdown()
            if not conn.read_until_eof(deadline):
                raise Violation("server did not close after the client's "
                                "EOF")
            self._check_eof()
            if ck.outstanding and not ck.desynced and not ck.stopped:
                self.note("requests unanswered at a client EOF")
        elif how in ("close", "rst"):
            conn.close(reset=how == "rst")
        elif how == "half":
            # Part of a request header, then gone.
            head = request_bytes(c.CMD_READ, 0, self._handle(), 0, 4096)
            self._send(head[:rng.randrange(1, len(head))], deadline)
            self._end_abruptly()
        elif how == "stop_reading":
            conn.reading = False
            stop = time.monotonic() + 0.3
            for _ in range(50):
                head = request_bytes(c.CMD_READ, 0, self._handle(),
                                     rng.randrange(self.fz.size // 2),
                                     rng.choice([4096, MiB]))
                if not conn.send(head, stop):
                    break
            conn.close(reset=rng.random() < 0.5)
        else:
            self._drain()
            conn.close()

    def _end_abruptly(self):
        rng, conn = self.rng, self.conn
        how = rng.choice(["close", "rst", "eof"])
        self.log(f"end abruptly: {how}")
        if how == "eof":
            conn.shutdown()
            if not conn.read_until_eof(time.monotonic() + self.fz.deadline):
                raise Violation("server did not close after the client's "
                                "EOF")
            self._check_eof()
        else:
            conn.close(reset=how == "rst")


# -- the fuzzer -------------------------------------------------------------


@dataclasses.dataclass
class Result:
    sessions: int
    requests: int
    replies: int
    seconds: float
    failures: list

    @property
    def ok(self):
        return not self.failures


class Fuzzer:
    def __init__(self, served, image_path, seed, *, verbose=0,
                 rss_bound_mib=200, cpu=1.0, check_every=200,
                 check_seconds=5.0, keep_going=False, max_inflight=None,
                 deadline=REPLY_DEADLINE, out=sys.stdout):
        missing = [e for e in EXPORTS if e not in served.uris]
        if missing:
            raise ValueError(f"the server must export {EXPORTS}; it lacks "
                             f"{missing} (serve IMAGE --export {RO_EXPORT} "
                             f"--snapshot {RW_EXPORT} --snapshot "
                             f"{WILD_EXPORT})")
        self.served = served
        self.pid = served.proc.pid
        parsed = urllib.parse.urlsplit(served.uri(RO_EXPORT))
        self.address = (parsed.hostname, parsed.port)
        self.seed = seed
        self.verbose = verbose
        self.rss_bound_mib = rss_bound_mib
        self.cpu = cpu
        self.check_every = check_every
        self.check_seconds = check_seconds
        self.keep_going = keep_going
        # The server's max_inflight_bytes (server_config wrote it): each
        # check reads exactly that much, which the server can only start
        # when none of its budget is held, so budget that leaked shows.
        self.max_inflight = max_inflight
        # How long a request the server must answer may take.
        self.deadline = deadline
        self.out = out
        # Steps of a session kept to explain a failure (all are printed
        # with -v, the last 40 otherwise).
        self.transcript_lines = 400 if verbose else 60
        with open(image_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.source = mmap.mmap(f.fileno(), size,
                                    access=mmap.ACCESS_READ)
        self.size = size
        self.model = Model(self.source)
        self.check_rng = random.Random(f"{seed}:checks")
        self.requests = self.replies = 0
        self.bytes_out = self.bytes_in = 0
        self.kinds = collections.Counter()
        self.commands = collections.Counter()
        self.errors = collections.Counter()
        self.notes = collections.Counter()
        self.failures: list = []
        self._stderr_pos = 0
        self._clk = os.sysconf("SC_CLK_TCK")

    def say(self, text):
        print(text, file=self.out, flush=True)

    # -- CPU ----------------------------------------------------------------

    def cpu_seconds(self) -> float:
        t = os.times()
        own = t.user + t.system
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            server = (int(fields[11]) + int(fields[12])) / self._clk
        except (OSError, IndexError, ValueError):
            server = 0.0
        return own + server

    # -- checks ---------------------------------------------------------------

    def vm_kib(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def check_server(self, label: str) -> None:
        """The periodic invariants; raises CheckFailure."""
        proc = self.served.proc
        if proc.poll() is not None:
            raise CheckFailure(f"server exited ({proc.returncode}): "
                               f"{self.served.stderr()[-3000:]}")
        self._check_log()
        self._good_reads()
        self._check_log()
        hwm = self.vm_kib("VmHWM") // 1024
        self.peak_mib = hwm
        if hwm >= self.rss_bound_mib:
            raise CheckFailure(f"server peak RSS {hwm} MiB >= bound "
                               f"{self.rss_bound_mib} MiB ({label})")

    def _check_log(self):
        with open(self.served.stderr_path, "rb") as f:
            f.seek(self._stderr_pos)
            new = f.read()
        # Keep a partial last line for the next look.
        cut = new.rfind(b"\n") + 1
        self._stderr_pos += cut
        text = new[:cut].decode("utf-8", "replace")
        for bad in ("Traceback", " ERROR "):
            at = text.find(bad)
            if at >= 0:
                raise CheckFailure(f"{bad.strip()!r} in the server's "
                                   "stderr:\n" + text[max(0, at - 1500):
                                                      at + 3000])

    def _good_session(self, export, structured, reads):
        """A well-behaved client: GO, the given reads, DISC."""
        session = Session(self, -1)
        ck = Checker(session, strict=True)
        session.checker = ck
        conn = Conn(self.address, ck)
        session.conn = conn
        deadline = time.monotonic() + self.deadline
        try:
            if not conn.wait(lambda: ck.phase != "greeting", deadline):
                raise Violation("no greeting")
            ck.no_zeroes = True
            conn.send(_U32.pack(c.FLAG_C_FIXED_NEWSTYLE
                                | c.FLAG_C_NO_ZEROES), deadline)
            if structured:
                session._option(OptionSent(c.OPT_STRUCTURED_REPLY, b"",
                                           "ack"))
            session._option(OptionSent(c.OPT_GO,
                                       name_payload(export.encode()),
                                       "ack", name=export))
            results = {}
            for i, (offset, length) in enumerate(reads):
                req = Req(c.CMD_READ, 0, i + 1, offset, length, export,
                          "ok", in_range=True)
                ck.outstanding[req.handle] = req
                t0 = time.monotonic()
                conn.send(request_bytes(c.CMD_READ, 0, i + 1, offset,
                                        length), deadline)
                if export == RW_EXPORT:
                    # Capture the data for the resync.
                    got = []
                    session.check_data = (
                        lambda r, off, data, got=got: got.append(
                            (off, data)))
                if not conn.wait(lambda: not ck.outstanding,
                                 time.monotonic() + self.deadline):
                    raise Violation(f"read offset={offset} length={length}"
                                    f" of {export!r} unanswered after "
                                    f"{self.deadline:g} s")
                took = time.monotonic() - t0
                self.slowest = max(getattr(self, "slowest", 0.0), took)
                if length <= 128 * 1024 and took > SLOW_READ:
                    # Whatever other clients do, a small read of a
                    # well-behaved one is answered (the reserve).
                    raise Violation(f"a {length}-byte read took "
                                    f"{took:.1f} s")
                if export == RW_EXPORT:
                    results[offset] = got
            conn.send(request_bytes(c.CMD_DISC, 0, 99, 0, 0), deadline)
            conn.shutdown()
            conn.read_until_eof(deadline)
            return results
        except Violation as exc:
            raise CheckFailure(f"well-behaved client on {export!r}: "
                               f"{exc}") from None
        finally:
            conn.close()

    def _good_reads(self):
        rng = self.check_rng
        size = self.size
        reads = [(0, 4096), (size - 1, 1), (max(0, size - 70000), 70000)]
        for _ in range(6):
            offset = rng.randrange(size)
            reads.append((offset, min(size - offset,
                                      rng.choice([1, 4096, 100000,
                                                  4 * MiB]))))
        whole = self.max_inflight
        if whole and whole <= min(size, DEFAULT_MAX_REQUEST):
            # Started only once nothing of the budget is held: with budget
            # leaked (charged, never given back) it waits forever.
            reads.append((rng.randrange(size - whole + 1), whole))
        try:
            self._good_session(RO_EXPORT, rng.random() < 0.5, reads)
        except CheckFailure as exc:
            if whole and f"length={whole} " in str(exc):
                raise CheckFailure(
                    f"{exc} (a read of the whole in-flight budget, "
                    f"{whole} bytes: the server's budget leaked, or "
                    "something holds it for good)") from None
            raise
        if size > 256 * MiB:
            return
        # The whole snapshot: checks the model's known bytes, then takes
        # what it reads as the model (a resync). Requests of sessions
        # that ended unanswered have had time to land.
        time.sleep(0.2)
        step = 4 * MiB
        pieces = [(o, min(step, size - o)) for o in range(0, size, step)]
        results = self._good_session(RW_EXPORT, rng.random() < 0.5, pieces)
        model = self.model
        model.context = "resync"
        for offset, length in pieces:
            data = bytearray(length)
            for off, part in results[offset]:
                data[off - offset:off - offset + len(part)] = part
            for a, b in model.known_runs(offset, offset + length):
                if data[a - offset:b - offset] != model.data[a:b]:
                    first = next(i for i in range(b - a)
                                 if data[a - offset + i] != model.data[a + i])
                    at = a + first
                    raise CheckFailure(
                        f"snapshot {RW_EXPORT!r} reads wrong data at offset "
                        f"{at}: {data[at - offset:][:16].hex()}, expected "
                        f"{model.data[at:at + 16].hex()}; that byte's "
                        "history:\n      "
                        + "\n      ".join(model.explain(at)))
            model.resync(offset, bytes(data))

    # -- the loop -------------------------------------------------------------

    def run(self, seconds=None, sessions=None, first=0) -> Result:
        """Run sessions first, first+1, ... until ``seconds`` passed or
        ``sessions`` ran."""
        start = time.monotonic()
        cpu0 = self.cpu_seconds()
        last_check_time = start
        last_check = first
        last_report = start
        index = first
        self.peak_mib = 0
        try:
            self.check_server("before the first session")
        except CheckFailure as exc:
            self._failed(f"before session {first}: {exc}", first, first)
            return self._result(start, index - first)
        while True:
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            if sessions is not None and index - first >= sessions:
                break
            session = Session(self, index)
            try:
                session.run()
            except KeyboardInterrupt:
                self.say(f"nbd_fuzz: interrupted in session {index}")
                break
            except Exception as exc:
                message = str(exc)
                if not isinstance(exc, Violation):
                    # A bug of the fuzzer's own: report it the same way.
                    message = "fuzzer error: " + "".join(
                        traceback.format_exception(exc))
                failure = SessionFailure(self.seed, index, message,
                                         list(session.transcript))
                self._session_failed(failure)
                if not self.keep_going or \
                        self.served.proc.poll() is not None:
                    break
            index += 1
            now = time.monotonic()
            if index - last_check >= self.check_every or \
                    now - last_check_time >= self.check_seconds:
                try:
                    self.check_server(f"sessions {last_check}-{index - 1}")
                except CheckFailure as exc:
                    self._failed(str(exc), last_check, index - 1)
                    if not self.keep_going or \
                            self.served.proc.poll() is not None:
                        break
                last_check, last_check_time = index, time.monotonic()
            if self.verbose and now - last_report >= 10:
                last_report = now
                self.say(self._progress(start, index - first))
            try:
                self._throttle(start, cpu0)
            except KeyboardInterrupt:
                self.say(f"nbd_fuzz: interrupted after session {index - 1}")
                break
        if not self.failures or self.keep_going:
            try:
                self.check_server(f"at the end (sessions {last_check}-"
                                  f"{index - 1})")
            except CheckFailure as exc:
                self._failed(str(exc), last_check, index - 1)
        return self._result(start, index - first)

    def _throttle(self, start, cpu0):
        if not self.cpu:
            return
        elapsed = time.monotonic() - start
        used = self.cpu_seconds() - cpu0
        ahead = used / self.cpu - elapsed
        if ahead > 0.005:
            time.sleep(min(ahead, 1.0))

    def _progress(self, start, sessions):
        elapsed = time.monotonic() - start
        return (f"nbd_fuzz: {sessions} sessions, {self.requests} requests "
                f"in {elapsed:.0f} s ({sessions / elapsed:.0f} sessions/s, "
                f"{self.requests / elapsed:.0f} requests/s), server peak "
                f"RSS {self.peak_mib} MiB, {len(self.failures)} failures")

    def _result(self, start, sessions):
        return Result(sessions, self.requests, self.replies,
                      time.monotonic() - start, list(self.failures))

    def _session_failed(self, failure: SessionFailure):
        proc = self.served.proc
        if proc.poll() is not None:
            failure.message += (f" (the server exited with "
                                f"{proc.returncode}; the end of its log:\n"
                                f"{self.served.stderr()[-3000:]})")
        text = "\n".join([
            f"nbd_fuzz FAILURE: seed {failure.seed} session "
            f"{failure.index}: {failure.message}",
            f"  replay: python -m tests.fuzz.nbd_fuzz --seed {failure.seed}"
            f" --session {failure.index} -vv",
            "  last steps of the session:"]
            + [f"    {line}" for line in
               failure.transcript[-(400 if self.verbose else 40):]])
        self.failures.append(text)
        self.say(text)

    def _failed(self, message, first, last):
        text = (f"nbd_fuzz FAILURE: seed {self.seed}, found by the check "
                f"after sessions {first}-{last}: {message}\n"
                f"  replay: python -m tests.fuzz.nbd_fuzz --seed {self.seed}"
                f" --session {first}-{last}")
        self.failures.append(text)
        self.say(text)

    def summary(self, result: Result) -> str:
        secs = max(result.seconds, 1e-9)
        lines = [
            f"nbd_fuzz: seed {self.seed}: {result.sessions} sessions, "
            f"{result.requests} requests, {result.replies} replies checked "
            f"in {secs:.1f} s ({result.sessions / secs:.0f} sessions/s, "
            f"{result.requests / secs:.0f} requests/s)",
            f"  sessions: {dict(self.kinds)}",
            f"  commands: {dict(self.commands)}",
            f"  error replies: {dict(self.errors)}",
            f"  bytes sent {self.bytes_out}, received {self.bytes_in}; "
            f"server peak RSS {self.peak_mib} MiB (bound "
            f"{self.rss_bound_mib}); slowest well-behaved read "
            f"{getattr(self, 'slowest', 0.0) * 1000:.0f} ms",
        ]
        if self.notes:
            lines.append(f"  notes (SHOULD-level, not failures): "
                         f"{dict(self.notes)}")
        lines.append(f"  {len(result.failures)} failures"
                     if result.failures else "  no failures")
        return "\n".join(lines)


# -- command line -----------------------------------------------------------


DEFAULT_MAX_INFLIGHT = 8 * MiB


def server_config(workdir: str, max_inflight: int | None) -> str | None:
    """A config file for `vmthunder serve` with a small in-flight budget
    (more requests wait for it, and a leak of it shows sooner)."""
    if not max_inflight:
        return None
    path = os.path.join(workdir, "nbd-fuzz.conf")
    with open(path, "w") as f:
        f.write(f"[nbd]\nmax_inflight_bytes = {max_inflight}\n")
    return path


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_sessions(text: str) -> tuple[int, int]:
    if "-" in text:
        a, b = text.split("-", 1)
        return int(a), int(b) - int(a) + 1
    return int(text), 1


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m tests.fuzz.nbd_fuzz",
        description="Fuzz a real `vmthunder serve` over NBD: many short "
                    "seeded sessions of valid, mutated and garbage client "
                    "traffic, every reply checked, the server checked "
                    "every few seconds (alive, correct data, memory "
                    "bound, no tracebacks). Run from the repository root.")
    p.add_argument("--seconds", type=float, default=60,
                   help="how long to run (default 60)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed (default: random, printed)")
    p.add_argument("--session", metavar="K|A-B", default=None,
                   help="replay only session K (or sessions A to B) of "
                        "--seed, then check the server")
    p.add_argument("--sessions", type=int, default=None,
                   help="stop after this many sessions")
    p.add_argument("--image-size", type=parse_size,
                   default=DEFAULT_IMAGE_SIZE,
                   help="image size (default 16M+12345: an unaligned end)")
    p.add_argument("--max-inflight", type=parse_size,
                   default=DEFAULT_MAX_INFLIGHT, metavar="BYTES",
                   help="the server's max_inflight_bytes (default 8M; 0: "
                        "its own default); checks read this much at once "
                        "to see that none of it leaked")
    p.add_argument("--chunk-size", default=None,
                   help="the server's --chunk-size (default: its own)")
    p.add_argument("--rss-bound", type=int, default=200, metavar="MIB",
                   help="fail if the server's peak RSS reaches this "
                        "(default 200 MiB, as the hostile tests)")
    p.add_argument("--cpu", type=float, default=1.0, metavar="CORES",
                   help="keep fuzzer + server under this many cores on "
                        "average (default 1; 0: no limit)")
    p.add_argument("--check-every", type=int, default=200, metavar="N",
                   help="check the server every N sessions (and every "
                        "--check-seconds)")
    p.add_argument("--check-seconds", type=float, default=5.0)
    p.add_argument("--reply-deadline", type=float, default=REPLY_DEADLINE,
                   metavar="SECONDS",
                   help="how long a request the server must answer may "
                        f"take (default {REPLY_DEADLINE:g})")
    p.add_argument("--keep-going", action="store_true",
                   help="go on after a failure (while the server lives)")
    p.add_argument("--workdir", default=None,
                   help="where the image, cache and logs go (default: a "
                        "temporary directory, removed unless a failure)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="progress every 10 s; -vv: every step")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tests.functional.conftest import make_image, start_serve
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    first, count = 0, args.sessions
    if args.session is not None:
        first, count = parse_sessions(args.session)
    try:
        os.nice(10)           # the server started below inherits it
    except OSError:
        pass
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="nbd-fuzz-")
        workdir = tmp
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, "img.raw")
    make_image(image, args.image_size, seed=seed,
               hole_at=args.image_size * 3 // 4)
    extra = ["--chunk-size", args.chunk_size] if args.chunk_size else []
    served = start_serve(image, os.path.join(workdir, "cache"),
                         *SERVE_ARGS, *extra, workdir=workdir,
                         config_file=server_config(workdir,
                                                   args.max_inflight))
    print(f"nbd_fuzz: seed {seed}, image {args.image_size} bytes, server "
          f"pid {served.proc.pid} at {served.uri(RO_EXPORT)}, "
          + (f"sessions {first}-{first + count - 1}" if args.session
             else f"{args.seconds:g} s"), flush=True)
    failed = True
    try:
        fz = Fuzzer(served, image, seed, verbose=args.verbose,
                    rss_bound_mib=args.rss_bound, cpu=args.cpu,
                    check_every=args.check_every,
                    check_seconds=args.check_seconds,
                    keep_going=args.keep_going,
                    max_inflight=args.max_inflight,
                    deadline=args.reply_deadline)
        result = fz.run(seconds=None if args.session else args.seconds,
                        sessions=count, first=first)
        code = served.stop()
        tail = served.stderr()[-3000:]
        if code != 0 or "Traceback" in tail:
            result.failures.append(f"server stop: exit code {code}: {tail}")
            print(f"nbd_fuzz FAILURE: server stop: exit code {code}\n"
                  f"{tail}")
        print(fz.summary(result), flush=True)
        failed = not result.ok
    finally:
        served.stop(signal.SIGKILL) if served.proc.poll() is None else None
        if tmp is not None and not failed:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        elif failed:
            print(f"nbd_fuzz: server log and files kept in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
