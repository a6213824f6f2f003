"""Bugs the NBD fuzzer (tests/fuzz/nbd_fuzz.py) found, each reduced to the
smallest test that shows it.

All three come from clients that vanish while their requests are under
way (a VM killed, a connection reset), and all three end with the server
holding something forever:

1. aio.start_eager (Python < 3.12): a request's Task cancelled before its
   first step never passes the cancellation to the request's coroutine.
   The coroutine's cleanup never runs (NbdConnection._serve does not give
   its charge back: the in-flight budget shrinks for good) and what it
   waited on is abandoned (an asyncio.Lock keeps a waiter nobody will
   ever resume: the lock can never be taken again).
2. SnapshotLayer._write_partial takes its two block locks before its
   ``try``: cancelled while waiting for the second, it never releases the
   first, and every later unaligned write to that block waits forever.
3. NbdConnection: when the reply writer fails (the client reset the
   connection) it closes itself *before* the transport is aborted; giving
   back its queued bytes starts the connection's deferred requests, whose
   replies are charged to the budget and dropped by the closed writer:
   charged, never released.

Together: every such disconnect can leak up to a reply's worth of the
in-flight budget and can wedge a block of a VM's disk; once the leaks
exceed max_inflight - max_request, no client gets a request larger than
the reserve (128 KiB) answered again.

And one spec deviation (4): NBD_REP_META_CONTEXT replies to
NBD_OPT_LIST_META_CONTEXT carried the context ids of SET; the spec
reserves that field there ("SHOULD be set to zero").

5. NbdConnection: a write whose payload waited for budget is parsed "soon"
   (call_soon(_parse_buffered)) once admitted, and reading resumes at the
   same time; on uvloop (the server's loop) the client's EOF can come
   first, and _close_when_done, seeing no task and nothing deferred,
   closes: the write, and every request after it, is dropped unanswered
   and not done, though the client sent NBD_CMD_DISC after them ("the
   server MUST handle all outstanding requests").
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from vmthunder import aio
from vmthunder import blockdev
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.nbd import constants as c
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdLimits, NbdServer
from vmthunder.nbd.server_protocol import ExportInfo, NbdServerProtocol

pytestmark = pytest.mark.timeout(30)


# -- 1. start_eager: a cancellation before the Task's first step -----------

def test_request_cancelled_before_its_task_starts_sees_the_cancellation():
    """A request waits for a lock; its Task is cancelled at once (as
    NbdConnection.connection_lost does when the client resets). The
    request must see the CancelledError (its cleanup runs), and the lock
    must stay usable."""

    async def main():
        lock = asyncio.Lock()
        await lock.acquire()
        cleaned_up = []

        async def request():
            try:
                await lock.acquire()
                lock.release()
            except asyncio.CancelledError:
                cleaned_up.append(True)     # e.g. give the budget back
                raise

        task = aio.start_eager(request())
        assert task is not None
        task.cancel()                       # before the Task ever ran
        await asyncio.sleep(0.01)
        lock.release()
        try:
            await asyncio.wait_for(lock.acquire(), 2)
        except asyncio.TimeoutError:
            pytest.fail(f"the lock can never be taken again: {lock!r}")
        assert cleaned_up == [True], "the request never saw its cancellation"

    asyncio.run(main())


# -- 2. SnapshotLayer: cancelled between its two block locks ---------------

class MemoryDevice(blockdev.BlockDevice):
    capabilities = blockdev.Capabilities(writable=False, block_status=True)

    def __init__(self, size):
        self.size = size
        self.data = bytes(range(256)) * (size // 256)

    async def read(self, offset, length):
        self.check_range(offset, length)
        return self.data[offset:offset + length]


def test_unaligned_write_cancelled_while_waiting_for_its_second_lock(
        tmp_path):
    """Write A holds block 1's lock (it waits in the middle of its
    read-modify-write). Write B spans blocks 0 and 1: it takes block 0's
    lock, then waits for block 1's, and is cancelled there (its client
    went away). Block 0's lock must be free again: a later unaligned
    write to block 0 completes."""
    bs = 4096

    async def main():
        lower = MemoryDevice(16 * bs)
        snap = SnapshotLayer(lower, str(tmp_path), "vm", block_size=bs)
        gate = asyncio.Event()
        real_read = snap._read

        async def slow_read(offset, length):
            if offset == bs:                # write A's read of block 1
                await gate.wait()
            return await real_read(offset, length)

        snap._read = slow_read
        write_a = asyncio.create_task(snap.write(bs + 10, b"a" * 10))
        await asyncio.sleep(0.01)           # A holds block 1's lock
        write_b = asyncio.create_task(snap.write(bs - 10, b"b" * 20))
        await asyncio.sleep(0.01)           # B holds 0's, waits for 1's
        write_b.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        await write_a
        try:
            await asyncio.wait_for(snap.write(100, b"c" * 10), 2)
        except asyncio.TimeoutError:
            pytest.fail("an unaligned write to block 0 waits forever: the "
                        "cancelled write still holds its lock")
        finally:
            snap.map.close()

    asyncio.run(main())


# -- 3. replies to a writer that has failed --------------------------------

class SyncMemory(MemoryDevice):
    """Answers reads without waiting (as a warm page cache does)."""


def test_reset_client_with_deferred_requests_leaks_no_budget():
    """A client pipelines 64 KiB reads and reads no reply: its first
    replies fill the socket, the rest wait for its budget (128 KiB per
    connection), and the server stops reading from it. Then it resets the
    connection. Only the reply writer sees that (reading is paused); once
    the connection is gone the server's in-flight budget must be back to
    zero."""

    async def main():
        limits = NbdLimits(max_inflight=1 << 20,
                           max_inflight_per_client=128 * 1024)
        server = NbdServer(limits)
        server.add_export("img", SyncMemory(1 << 20), read_only=True)
        addr = await server.listen(Address("tcp", host="127.0.0.1"))
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (addr.host, addr.port))
        greeting = b""
        while len(greeting) < 18:
            greeting += await loop.sock_recv(sock, 18 - len(greeting))
        name = b"img"
        go = (struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        out = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE
                          | c.FLAG_C_NO_ZEROES)
        out += struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(go)) + go
        for i in range(400):
            out += struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ,
                               i, (i % 16) * 65536, 65536)
        await loop.sock_sendall(sock, out)
        # Let the replies fill the socket and the rest wait for budget.
        for _ in range(50):
            await asyncio.sleep(0.02)
            conns = list(server._connections)
            if conns and conns[0]._deferred and conns[0]._pauses:
                break
        else:
            pytest.fail("the connection never waited for its budget")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
        sock.close()                        # reset
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not server._connections:
                break
        await asyncio.sleep(0.1)
        leaked = server.inflight_bytes
        await server.close()
        assert not server._connections, "the connection never closed"
        assert leaked == 0, (f"{leaked} bytes of the in-flight budget "
                             "were never given back")

    asyncio.run(main())


# -- 4. LIST_META_CONTEXT: the context id is reserved -----------------------

def test_list_meta_context_replies_carry_id_zero():
    export = ExportInfo("img", 1 << 20, True,
                        contexts=(c.BASE_ALLOCATION, c.VMTHUNDER_CACHE))
    proto = NbdServerProtocol({"img": export})
    proto.receive(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE))
    query = struct.pack(">I", 3) + b"img" + struct.pack(">I", 0)
    out, _ = proto.receive(struct.pack(">QII", c.IHAVEOPT,
                                       c.OPT_LIST_META_CONTEXT, len(query))
                           + query)
    contexts = {}
    while out:
        _, _, rtype, length = struct.unpack_from(">QIII", out)
        payload, out = out[20:20 + length], out[20 + length:]
        if rtype == c.REP_META_CONTEXT:
            contexts[payload[4:].decode()] = struct.unpack_from(
                ">I", payload)[0]
    assert contexts == {c.BASE_ALLOCATION: 0, c.VMTHUNDER_CACHE: 0}


# -- 5. requests before NBD_CMD_DISC, behind a write that waited -----------

class WritableMemory(MemoryDevice):
    capabilities = blockdev.Capabilities(writable=True, block_status=True)

    def __init__(self, size):
        super().__init__(size)
        self.data = bytearray(self.data)

    async def read(self, offset, length):
        self.check_range(offset, length)
        return bytes(self.data[offset:offset + length])

    async def write(self, offset, data, fua=False):
        self.check_range(offset, len(data))
        self.data[offset:offset + len(data)] = data


def test_requests_before_disc_are_all_answered_after_a_write_waited():
    """One pipeline, then EOF: an invalid READ (its error reply is charged
    first), a 64 KiB READ (over the 64 KiB per-connection cap with that
    reply queued: it waits), a WRITE (its payload waits behind it), a
    small READ, NBD_CMD_DISC. Every request must be answered before the
    server closes, and the write done."""

    async def main():
        limits = NbdLimits(max_inflight=1 << 20,
                           max_inflight_per_client=65536)
        server = NbdServer(limits)
        device = WritableMemory(1 << 20)
        server.add_export("vm", device)
        addr = await server.listen(Address("tcp", host="127.0.0.1"))
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (addr.host, addr.port))
        greeting = b""
        while len(greeting) < 18:
            greeting += await loop.sock_recv(sock, 18 - len(greeting))
        go = struct.pack(">I", 2) + b"vm" + struct.pack(">H", 0)
        out = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE
                          | c.FLAG_C_NO_ZEROES)
        out += struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(go)) + go

        def request(cmd, handle, offset, length):
            return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, cmd, handle,
                               offset, length)

        out += request(c.CMD_READ, 1, 2**64 - 512, 512)     # EINVAL
        out += request(c.CMD_READ, 2, 0, 65536)
        out += request(c.CMD_WRITE, 3, 4096, 8192) + b"w" * 8192
        out += request(c.CMD_READ, 4, 0, 512)
        out += request(c.CMD_DISC, 5, 0, 0)
        await loop.sock_sendall(sock, out)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
            if not data:
                break
            received += data
        sock.close()
        await server.close()
        # Simple replies: find their headers (the data read is the
        # device's pattern, which holds no reply magic).
        magic = struct.pack(">I", c.SIMPLE_REPLY_MAGIC)
        answered = set()
        pos = received.find(magic)
        while pos >= 0:
            answered.add(struct.unpack_from(">Q", received, pos + 8)[0])
            pos = received.find(magic, pos + 4)
        assert answered == {1, 2, 3, 4}, (
            f"answered {sorted(answered)} before closing, after "
            "NBD_CMD_DISC; requests 1-4 were sent before it")
        assert device.data[4096:4096 + 8192] == b"w" * 8192, \
            "the write was not done"

    aio.run(main())
