"""Malformed and hostile NBD clients against a real `vmthunder serve`.

Each test talks raw bytes over a socket (Python's socket module, with
timeouts), then checks that the same server process is still alive and
still serves a well-behaved client (our own minimal client and the real
``nbdinfo``/``qemu-io``) correct data.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
import urllib.parse

import pytest

from tests.functional.conftest import make_image
from tests.functional.conftest import need
from vmthunder.nbd import constants as c

MiB = 1024 * 1024
IMAGE_SIZE = 8 * MiB
HOLE_AT = 6 * MiB
EXPORT = "img"
TIMEOUT = 10
pytestmark = pytest.mark.timeout(60)


class ServerClosed(Exception):
    pass


class RawClient:
    """Just enough of an NBD client to send exactly the bytes we choose."""

    def __init__(self, uri: str):
        parsed = urllib.parse.urlsplit(uri)
        self.sock = socket.create_connection(
            (parsed.hostname, parsed.port), timeout=TIMEOUT)
        self.structured = False
        self.size = None
        self.tflags = None

    def close(self):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self.sock.recv(min(n - len(buf), 1 << 20))
            if not piece:
                raise ServerClosed(f"EOF after {len(buf)} of {n} bytes")
            buf += piece
        return bytes(buf)

    def assert_closed_by_server(self):
        """The server hangs up without sending anything more."""
        extra = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline, "server did not hang up"
            try:
                piece = self.sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                pytest.fail("server did not close the connection")
            if not piece:
                break
            extra += piece
        assert bytes(extra) == b"", f"unexpected bytes before EOF: {extra!r}"

    # -- handshake ------------------------------------------------------

    def greeting(self):
        magic, ihaveopt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == c.NBDMAGIC and ihaveopt == c.IHAVEOPT
        assert flags & c.FLAG_FIXED_NEWSTYLE
        return flags

    def handshake(self):
        self.greeting()
        self.send(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE
                              | c.FLAG_C_NO_ZEROES))

    def option(self, opt: int, data: bytes = b""):
        self.send(struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII",
                                                  self.recv_exact(20))
        assert magic == c.OPT_REPLY_MAGIC
        return opt, rtype, self.recv_exact(length)

    def opt_replies(self, opt: int):
        """Replies to ``opt`` up to and including the final one."""
        replies = []
        while True:
            got, rtype, payload = self.opt_reply()
            assert got == opt, f"reply to option {got}, expected {opt}"
            replies.append((rtype, payload))
            if rtype == c.REP_ACK or rtype & c.REP_FLAG_ERROR:
                return replies

    def go(self, name: str = EXPORT, *, structured=False, meta=(),
           option=c.OPT_GO):
        """Negotiate ``name``; returns the final reply type."""
        if structured:
            self.option(c.OPT_STRUCTURED_REPLY)
            assert self.opt_replies(c.OPT_STRUCTURED_REPLY) == [
                (c.REP_ACK, b"")]
            self.structured = True
        self.contexts = {}
        if meta:
            raw = name.encode()
            data = struct.pack(">I", len(raw)) + raw + struct.pack(
                ">I", len(meta))
            for q in meta:
                data += struct.pack(">I", len(q)) + q.encode()
            self.option(c.OPT_SET_META_CONTEXT, data)
            for rtype, payload in self.opt_replies(c.OPT_SET_META_CONTEXT):
                if rtype == c.REP_META_CONTEXT:
                    self.contexts[struct.unpack_from(">I", payload)[0]] = (
                        payload[4:].decode())
                else:
                    assert rtype == c.REP_ACK
        raw = name.encode()
        self.option(option, struct.pack(">I", len(raw)) + raw
                    + struct.pack(">H", 0))
        replies = self.opt_replies(option)
        for rtype, payload in replies:
            if rtype == c.REP_INFO and struct.unpack_from(
                    ">H", payload)[0] == c.INFO_EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", payload)
        return replies[-1][0]

    # -- transmission ---------------------------------------------------

    def request(self, cmd, handle, offset, length, flags=0, payload=b""):
        self.send(struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd,
                              handle, offset, length) + payload)

    def reply(self, read_length=0):
        """(error, handle, data, chunks) of one reply.

        ``read_length``: bytes of data a successful simple read reply
        carries (simple replies do not say).
        """
        if not self.structured:
            magic, err, handle = struct.unpack(">IIQ", self.recv_exact(16))
            assert magic == c.SIMPLE_REPLY_MAGIC, f"magic {magic:#x}"
            data = self.recv_exact(read_length) if not err else b""
            return err, handle, data, []
        err = 0
        handle = None
        data = {}
        chunks = []
        while True:
            magic, flags, rtype, h, length = struct.unpack(
                ">IHHQI", self.recv_exact(20))
            assert magic == c.STRUCTURED_REPLY_MAGIC, f"magic {magic:#x}"
            assert handle in (None, h), "chunks of two handles interleaved"
            handle = h
            payload = self.recv_exact(length)
            chunks.append((rtype, payload))
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                data[off] = payload[8:]
            elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
                off, hlen = struct.unpack(">QI", payload)
                data[off] = bytes(hlen)
            elif rtype & c.REPLY_TYPE_FLAG_ERROR:
                (err, mlen) = struct.unpack_from(">IH", payload)
                assert len(payload) >= 6 + mlen
            if flags & c.REPLY_FLAG_DONE:
                break
        joined = b"".join(data[k] for k in sorted(data))
        return err, handle, joined, chunks

    def read(self, handle, offset, length, flags=0):
        self.request(c.CMD_READ, handle, offset, length, flags)
        return self.reply(read_length=length)


def connect(served, export=EXPORT, **kw) -> RawClient:
    client = RawClient(served.uri(export))
    client.handshake()
    assert client.go(export, **kw) == c.REP_ACK
    return client


def source_bytes(image: str, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_good_read(client, image, handle, offset, length):
    err, got, data, _ = client.read(handle, offset, length)
    assert (err, got) == (0, handle)
    assert data == source_bytes(image, offset, length), (
        f"wrong data at offset {offset}")


def assert_still_serving(served, image, export=EXPORT):
    """Same process alive; a new well-behaved client gets correct data."""
    assert served.proc.poll() is None, (
        f"server died: {served.stderr()[-2000:]}")
    for structured in (False, True):
        client = connect(served, export, structured=structured)
        try:
            assert client.size == IMAGE_SIZE
            for handle, (offset, length) in enumerate(
                    [(0, 4096), (12345, 70000), (HOLE_AT - 1000, 5000),
                     (IMAGE_SIZE - 777, 777)]):
                assert_good_read(client, image, handle, offset, length)
            client.request(c.CMD_DISC, 99, 0, 0)
            client.assert_closed_by_server()
        finally:
            client.close()
    # And a real client too.
    out = subprocess.run(["nbdinfo", "--size", served.uri(export)],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == IMAGE_SIZE
    assert served.proc.poll() is None
    # Bad clients are logged as warnings, never as crashes.
    log = served.stderr()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "img.raw", IMAGE_SIZE, seed=7,
                      hole_at=HOLE_AT)


@pytest.fixture
def served(serve, image):
    need("nbdinfo")
    return serve(image, "--export", EXPORT, "--snapshot", "vm1")


# -- 1. garbage handshake -------------------------------------------------

@pytest.mark.parametrize("where", ["client_flags", "option_magic",
                                   "before_greeting"])
def test_garbage_handshake_is_hung_up_on(served, image, where):
    garbage = bytes.fromhex("deadbeef") + os.urandom(200)
    client = RawClient(served.uri(EXPORT))
    try:
        if where == "client_flags":
            client.greeting()
            client.send(garbage)
        elif where == "option_magic":
            client.handshake()
            client.send(garbage)
        else:
            # Garbage without waiting for the greeting: the greeting still
            # arrives, then the hang-up.
            client.send(garbage)
            client.greeting()
        client.assert_closed_by_server()
    finally:
        client.close()
    assert_still_serving(served, image)


def test_client_flags_without_fixed_newstyle_are_hung_up_on(served, image):
    client = RawClient(served.uri(EXPORT))
    try:
        client.greeting()
        client.send(struct.pack(">I", 0))
        client.assert_closed_by_server()
    finally:
        client.close()
    assert_still_serving(served, image)


# -- 2. unknown option ----------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_unknown_option_is_unsupported_and_go_still_works(
        served, image, structured):
    client = RawClient(served.uri(EXPORT))
    try:
        client.handshake()
        client.option(0x7FFF1234, b"some option data")
        [(rtype, _)] = client.opt_replies(0x7FFF1234)
        assert rtype == c.REP_ERR_UNSUP
        # STARTTLS is not offered either, and also leaves us in options.
        client.option(c.OPT_STARTTLS)
        [(rtype, _)] = client.opt_replies(c.OPT_STARTTLS)
        assert rtype & c.REP_FLAG_ERROR
        assert client.go(EXPORT, structured=structured) == c.REP_ACK
        assert client.size == IMAGE_SIZE
        assert_good_read(client, image, 1, 1000, 100000)
    finally:
        client.close()
    assert_still_serving(served, image)


def test_oversized_option_is_too_big_and_go_still_works(served, image):
    client = RawClient(served.uri(EXPORT))
    try:
        client.handshake()
        length = 1 * MiB
        client.send(struct.pack(">QII", c.IHAVEOPT, 4321, length))
        [(rtype, _)] = client.opt_replies(4321)
        assert rtype == c.REP_ERR_TOO_BIG
        client.send(bytes(length))
        assert client.go(EXPORT) == c.REP_ACK
        assert_good_read(client, image, 1, 0, 65536)
    finally:
        client.close()
    assert_still_serving(served, image)


# -- 3. unknown export ----------------------------------------------------

@pytest.mark.parametrize("opt", [c.OPT_GO, c.OPT_INFO],
                         ids=["GO", "INFO"])
def test_go_for_unknown_export_is_err_unknown(served, image, opt):
    client = RawClient(served.uri(EXPORT))
    try:
        client.handshake()
        assert client.go("no-such-export", option=opt) == c.REP_ERR_UNKNOWN
        # Negotiation goes on: the right name works on the same socket.
        assert client.go("vm1") == c.REP_ACK
        assert client.size == IMAGE_SIZE
        assert_good_read(client, image, 1, 4095, 4097)
    finally:
        client.close()
    assert_still_serving(served, image)


def test_export_name_for_unknown_export_disconnects(served, image):
    client = RawClient(served.uri(EXPORT))
    try:
        client.handshake()
        client.option(c.OPT_EXPORT_NAME, b"no-such-export")
        client.assert_closed_by_server()
    finally:
        client.close()
    # The old-style option with a known name does work.
    client = RawClient(served.uri(EXPORT))
    try:
        client.handshake()
        client.option(c.OPT_EXPORT_NAME, EXPORT.encode())
        size, flags = struct.unpack(">QH", client.recv_exact(10))
        assert size == IMAGE_SIZE and flags & c.FLAG_READ_ONLY
        assert_good_read(client, image, 1, 0, 512)
    finally:
        client.close()
    assert_still_serving(served, image)


# -- 4. read past the end -------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_read_past_end_is_einval_and_connection_goes_on(
        served, image, structured):
    client = connect(served, structured=structured)
    try:
        for handle, (offset, length) in enumerate(
                [(IMAGE_SIZE, 1), (IMAGE_SIZE - 10, 11),
                 (IMAGE_SIZE + 1 * MiB, 4096), ((1 << 64) - 512, 512)],
                start=0x1000):
            err, got, data, _ = client.read(handle, offset, length)
            assert (err, got, data) == (c.EINVAL, handle, b""), (
                f"read offset={offset} length={length}")
        assert_good_read(client, image, 7, IMAGE_SIZE - 10, 10)
        assert_good_read(client, image, 8, 0, 1 * MiB)
    finally:
        client.close()
    assert_still_serving(served, image)


# -- 5. zero-length and oversized requests --------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_read_is_einval(served, image, structured):
    client = connect(served, structured=structured)
    try:
        err, handle, data, _ = client.read(0xABCDEF, 4096, 0)
        assert (err, handle, data) == (c.EINVAL, 0xABCDEF, b"")
        assert_good_read(client, image, 2, 4096, 4096)
    finally:
        client.close()
    assert_still_serving(served, image)


@pytest.mark.parametrize("structured,expected", [(False, c.EINVAL),
                                                 (True, c.EOVERFLOW)])
def test_oversized_read_is_refused(served, image, structured, expected):
    client = connect(served, structured=structured)
    try:
        # The export is smaller than this, but the size limit comes first.
        err, handle, data, _ = client.read(5, 0, 32 * MiB + 1)
        assert (err, handle, data) == (expected, 5, b"")
        assert_good_read(client, image, 6, 0, IMAGE_SIZE)
    finally:
        client.close()
    assert_still_serving(served, image)


@pytest.mark.parametrize("structured", [False, True])
def test_oversized_write_is_refused_and_stream_stays_in_sync(
        served, image, structured):
    client = connect(served, "vm1", structured=structured)
    try:
        length = 40 * MiB
        # The payload is full of valid-looking read requests: if the
        # server lost track of it, it would answer them.
        fake = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ,
                           0x666, 0, 512)
        payload = fake * (length // len(fake)) + bytes(
            length % len(fake))
        client.request(c.CMD_WRITE, 11, 0, length, payload=payload)
        err, handle, _, _ = client.reply()
        assert (err, handle) == (c.EINVAL, 11)
        assert_good_read(client, image, 12, 0, 65536)
        # Nothing was written.
        assert_good_read(client, image, 13, 0, 2 * MiB)
    finally:
        client.close()
    assert_still_serving(served, image, "vm1")
    assert_still_serving(served, image)


# -- 6. writes where they are not allowed ---------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_writes_to_read_only_cache_export_are_eperm(served, image,
                                                    structured):
    client = connect(served, structured=structured)
    try:
        assert client.tflags & c.FLAG_READ_ONLY
        client.request(c.CMD_WRITE, 1, 0, 4096, payload=b"\xee" * 4096)
        assert client.reply()[:2] == (c.EPERM, 1)
        client.request(c.CMD_WRITE_ZEROES, 2, 0, 4096)
        assert client.reply()[:2] == (c.EPERM, 2)
        client.request(c.CMD_TRIM, 3, 0, 4096)
        assert client.reply()[:2] == (c.EPERM, 3)
        assert_good_read(client, image, 4, 0, 8192)
    finally:
        client.close()
    assert_still_serving(served, image)


@pytest.mark.parametrize("structured", [False, True])
def test_writes_past_end_are_refused(served, image, structured):
    client = connect(served, "vm1", structured=structured)
    try:
        assert not client.tflags & c.FLAG_READ_ONLY
        tail = IMAGE_SIZE - 100
        client.request(c.CMD_WRITE, 1, tail, 200, payload=b"\xee" * 200)
        assert client.reply()[:2] == (c.ENOSPC, 1)
        client.request(c.CMD_WRITE, 2, IMAGE_SIZE, 1, payload=b"\xee")
        assert client.reply()[:2] == (c.ENOSPC, 2)
        client.request(c.CMD_WRITE_ZEROES, 3, tail, 200)
        assert client.reply()[:2] == (c.ENOSPC, 3)
        client.request(c.CMD_TRIM, 4, tail, 200)
        err, handle, _, _ = client.reply()
        assert handle == 4 and err in (c.EINVAL, c.ENOSPC)
        # None of it reached the snapshot: the tail is the image's.
        assert_good_read(client, image, 5, IMAGE_SIZE - 4096, 4096)
        # A write that fits does work.
        client.request(c.CMD_WRITE, 6, tail, 100, payload=b"\x5a" * 100)
        assert client.reply()[:2] == (0, 6)
        err, _, data, _ = client.read(7, tail - 100, 200)
        assert err == 0
        assert data == source_bytes(image, tail - 100, 100) + b"\x5a" * 100
    finally:
        client.close()
    assert_still_serving(served, image)


# -- 7. clients that vanish mid-request -----------------------------------

def test_client_disconnects_mid_request(served, image):
    bystander = connect(served, structured=True)
    try:
        header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1,
                             0, 1 * MiB)
        cases = [
            ("half a header", "vm1", header[:14]),
            ("header and half the payload", "vm1",
             header + b"\x77" * (512 * 1024)),
            ("read then gone before the reply", EXPORT,
             struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 2, 0,
                         4 * MiB)),
        ]
        for what, export, data in cases:
            for structured in (False, True):
                client = connect(served, export, structured=structured)
                client.send(data)
                # Abortive close (RST) for some, orderly FIN for others.
                if structured:
                    client.sock.setsockopt(socket.SOL_SOCKET,
                                           socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                client.close()
                assert served.proc.poll() is None, what
                assert_good_read(bystander, image, 3, 0, 4096)
        # The half-sent writes never landed.
        vm = connect(served, "vm1")
        try:
            assert_good_read(vm, image, 1, 0, 1 * MiB)
        finally:
            vm.close()
    finally:
        bystander.close()
    assert_still_serving(served, image)


# -- 8. bad request magic -------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_bad_request_magic_disconnects_that_client_only(
        served, image, structured):
    other = connect(served, structured=True)
    bad = connect(served, structured=structured)
    try:
        assert_good_read(bad, image, 1, 0, 512)
        bad.send(struct.pack(">IHHQQI", 0x12345678, 0, c.CMD_READ, 2, 0,
                             512))
        bad.assert_closed_by_server()
        # The other connection, opened before, goes on.
        assert_good_read(other, image, 3, 100, 100000)
    finally:
        bad.close()
        other.close()
    assert_still_serving(served, image)


# -- 9. source shrinks under the server -----------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_truncated_source_gives_eio_not_zeros(serve, tmp_path, structured):
    need("qemu-io", "nbdcopy")
    image = make_image(tmp_path / "shrinks.raw", IMAGE_SIZE, seed=3)
    with open(image, "rb") as f:
        original = f.read()
    served = serve(image, "--export", EXPORT, "--chunk-size", "64K")
    client = connect(served, structured=structured)
    try:
        # Some of the front is cached before the truncation, some not.
        err, _, data, _ = client.read(1, 0, 128 * 1024)
        assert err == 0 and data == original[:128 * 1024]
        half = IMAGE_SIZE // 2
        os.truncate(image, half)

        for handle, (offset, length) in enumerate(
                [(half, 4096), (IMAGE_SIZE - 4096, 4096),
                 (half - 4096, 8192), (IMAGE_SIZE - 1, 1)], start=10):
            err, got, data, _ = client.read(handle, offset, length)
            assert (err, got) == (c.EIO, handle), (
                f"read of offset={offset} length={length} after the "
                f"truncation: error {err}, {len(data)} bytes")
            assert data == b""
        # The front is still there: cached and uncached parts both read.
        for handle, (offset, length) in enumerate(
                [(0, 4096), (100000, 300000), (half - 65536, 65536)],
                start=20):
            err, got, data, _ = client.read(handle, offset, length)
            assert (err, got) == (0, handle)
            assert data == original[offset:offset + length]
    finally:
        client.close()

    uri = served.uri(EXPORT)
    io = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c",
                         f"read -v {IMAGE_SIZE - 65536} 512", uri],
                        capture_output=True, text=True, timeout=TIMEOUT)
    assert io.returncode != 0
    assert "Input/output error" in io.stdout + io.stderr
    io = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c",
                         f"read -P 0 {half + 65536} 65536", uri],
                        capture_output=True, text=True, timeout=TIMEOUT)
    assert io.returncode != 0
    assert "Pattern verification failed" not in io.stdout
    assert "Input/output error" in io.stdout + io.stderr
    # A whole-disk copy must fail, not hand out zeros for the lost half.
    copy = subprocess.run(["nbdcopy", uri, "-"], capture_output=True,
                          timeout=30)
    assert copy.returncode != 0, (
        "nbdcopy copied the truncated image without an error; bytes after "
        f"the truncation point zero: "
        f"{copy.stdout[half:] == bytes(IMAGE_SIZE - half)}")
    assert served.proc.poll() is None
    # And still serving the part that exists.
    client = connect(served, structured=True)
    try:
        err, _, data, _ = client.read(1, 4096, half - 4096)
        assert err == 0 and data == original[4096:half]
    finally:
        client.close()


# -- 10. block status without a meta context ------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_block_status_without_meta_context_is_einval(served, image,
                                                     structured):
    client = connect(served, structured=structured)
    try:
        client.request(c.CMD_BLOCK_STATUS, 77, 0, IMAGE_SIZE)
        err, handle, _, chunks = client.reply()
        assert (err, handle) == (c.EINVAL, 77)
        assert_good_read(client, image, 78, 0, 4096)
    finally:
        client.close()
    assert_still_serving(served, image)


def test_block_status_with_meta_context_answers(served, image):
    """The positive counterpart: with a context, extents come back."""
    client = connect(served, structured=True, meta=[c.BASE_ALLOCATION])
    try:
        [ctx_id] = client.contexts
        client.request(c.CMD_BLOCK_STATUS, 5, 0, IMAGE_SIZE)
        err, handle, _, chunks = client.reply()
        assert (err, handle) == (0, 5)
        [(rtype, payload)] = chunks
        assert rtype == c.REPLY_TYPE_BLOCK_STATUS
        assert struct.unpack_from(">I", payload)[0] == ctx_id
        extents = [struct.unpack_from(">II", payload, pos)
                   for pos in range(4, len(payload), 8)]
        assert sum(n for n, _ in extents) == IMAGE_SIZE
        assert extents[-1] == (IMAGE_SIZE - HOLE_AT,
                               c.STATE_HOLE | c.STATE_ZERO)
    finally:
        client.close()


# -- many bad clients at once ---------------------------------------------

def test_bad_clients_in_parallel_do_not_disturb_a_good_one(served, image):
    errors = []

    def bad(i):
        try:
            client = RawClient(served.uri(EXPORT))
            try:
                client.greeting()
                client.send(os.urandom(64 + i))
            finally:
                client.close()
        except OSError:
            pass
        except Exception as exc:      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bad, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    good = connect(served, structured=True)
    try:
        for i in range(20):
            assert_good_read(good, image, i, i * 200000, 100000)
    finally:
        good.close()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert_still_serving(served, image)
