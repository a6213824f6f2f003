"""ReplyWriter: ordered output of bytes and zero-copy file ranges."""

from __future__ import annotations

import asyncio
import os
import random
import socket

from vmthunder.nbd.writer import FileRange, ReplyWriter

from tests.waiting import until


def _pair():
    a, b = socket.socketpair()
    # Small buffers so that sends are partial and the writer has to wait.
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def test_parts_arrive_in_order_through_partial_sends(tmp_path):
    rng = random.Random(7)
    payload = rng.randbytes(3 << 20)
    path = tmp_path / "data"
    path.write_bytes(payload)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = _pair()
        b.setblocking(False)
        fd = os.open(path, os.O_RDONLY)
        pressure = []
        errors = []
        writer = ReplyWriter(loop, a, on_error=errors.append,
                             on_pressure=pressure.append,
                             high_water=256 * 1024)
        expected = bytearray()
        for i in range(40):
            head = f"<{i}>".encode()
            off = rng.randrange(0, len(payload) - 200000)
            n = rng.randrange(1, 200000)
            writer.write(head, FileRange(fd, off, n), b"|")
            expected += head + payload[off:off + n] + b"|"
        got = bytearray()
        while len(got) < len(expected):
            chunk = await asyncio.wait_for(loop.sock_recv(b, 65536), 10)
            assert chunk, "writer closed the socket early"
            got += chunk
        assert bytes(got) == bytes(expected)
        assert writer.queued_bytes == 0
        # The queue went over the high-water mark and came back down.
        assert pressure == [True, False]
        assert errors == []
        writer.close()
        b.close()
        os.close(fd)

    asyncio.run(main())


def test_short_file_fails_the_connection(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 1000)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = _pair()
        fd = os.open(path, os.O_RDONLY)
        errors = []
        writer = ReplyWriter(loop, a, on_error=errors.append,
                             on_pressure=lambda on: None)
        writer.write(b"hdr", FileRange(fd, 500, 1000))   # 500 bytes short
        await until(lambda: errors, "the short read to fail the writer")
        assert len(errors) == 1 and "short" in errors[0]
        assert writer.closed
        writer.write(b"ignored after close")
        b.close()
        os.close(fd)

    asyncio.run(main())


def test_on_drained_runs_once_queue_is_empty():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = _pair()
        b.setblocking(False)
        drained = []
        writer = ReplyWriter(loop, a, on_error=lambda r: None,
                             on_pressure=lambda on: None)
        writer.write(b"z" * (1 << 20))
        # More than a socket buffer: the rest waits in the writer's queue.
        await until(lambda: writer.queued_bytes > 0, "a backlog")
        writer.on_drained = lambda: drained.append(True)
        got = 0
        while got < 1 << 20:
            got += len(await asyncio.wait_for(loop.sock_recv(b, 65536), 10))
        await until(lambda: drained, "on_drained")
        await asyncio.sleep(0)
        assert drained == [True] and writer.queued_bytes == 0
        writer.close()
        b.close()

    asyncio.run(main())
