"""The NBD client against real servers: qemu-nbd and nbdkit.

Each test starts its own server (TCP on a free loopback port, or a unix
socket in the test's tmp dir) and the fixture stops it, pass or fail.
Tests skip when the server binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import random
import shutil
import socket
import subprocess
import time

import pytest

from vmthunder.blockdev import STATE_HOLE, STATE_ZERO, BlockError
from vmthunder.nbd.client import (NbdClient, NbdConnectionError,
                                  NbdHandshakeError, NbdSource,
                                  list_exports, open_nbd, parse_nbd_uri)

from tests.waiting import until

MiB = 1024 * 1024
SEED = int(os.environ.get("VMTHUNDER_TEST_SEED", time.time_ns() % 100000))


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (Debian: "
                    f"{'qemu-utils' if binary == 'qemu-nbd' else binary})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    kind: str
    proc: subprocess.Popen
    address: str
    export: str
    log: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stderr(self) -> str:
        with open(self.log) as f:
            return f.read()


def _probe(address: str) -> bool:
    kind, _, rest = address.partition(":")
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    target = rest if kind == "unix" else ("127.0.0.1",
                                          int(rest.rpartition(":")[2]))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(target)
        except OSError:
            return False
        return True


@pytest.fixture
def nbd_server(tmp_path):
    """Factory: nbd_server(kind, image, transport=..., ...) -> Server."""
    started: list[Server] = []

    def start(kind: str, image: str, *, transport: str = "unix",
              export: str = "disk", read_only: bool = False,
              filters: tuple[str, ...] = (),
              params: tuple[str, ...] = ()) -> Server:
        need(kind)
        n = len(started)
        if transport == "unix":
            sock = str(tmp_path / f"{kind}-{n}.sock")
            address = f"unix:{sock}"
        else:
            port = free_port()
            address = f"tcp:127.0.0.1:{port}"
        if kind == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "-x", export, "--persistent",
                    "--shared=32"]
            argv += ["-k", sock] if transport == "unix" else [
                "--bind", "127.0.0.1", "-p", str(port)]
            argv += ["-r"] if read_only else []
            argv += [image]
        else:
            # nbdkit's file plugin serves whatever name a client asks.
            argv = ["nbdkit", "-f", "--exit-with-parent"]
            argv += ["-U", sock] if transport == "unix" else [
                "-i", "127.0.0.1", "-p", str(port)]
            argv += ["-r"] if read_only else []
            for f in filters:
                argv += ["--filter", f]
            argv += ["file", image, *params]
        log = str(tmp_path / f"{kind}-{n}.log")
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err)
        server = Server(kind, proc, address, export, log)
        started.append(server)
        deadline = time.monotonic() + 10
        while not _probe(address):
            if proc.poll() is not None:
                pytest.fail(f"{kind} exited with {proc.returncode}: "
                            f"{server.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{kind} did not listen on {address} in 10 s")
            time.sleep(0.02)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A random file of 16-64 MiB (4 KiB multiple); returns (path, bytes)."""
    rng = random.Random(SEED)
    size = rng.randint(16 * 256, 64 * 256) * 4096
    data = rng.randbytes(size)
    path = tmp_path_factory.mktemp("img") / "random.raw"
    path.write_bytes(data)
    return str(path), data


def sparse_image(path, size=16 * MiB, data_at=(4 * MiB, 1 * MiB)) -> bytes:
    """Holes everywhere except ``data_at`` (offset, length) of 0xA5."""
    off, n = data_at
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(off)
        f.write(b"\xa5" * n)
    expected = bytearray(size)
    expected[off:off + n] = b"\xa5" * n
    return bytes(expected)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


SERVERS = [
    pytest.param(kind, transport, id=f"{kind}-{transport}")
    for kind in ("qemu-nbd", "nbdkit") for transport in ("unix", "tcp")
]


# -- reads -------------------------------------------------------------

@pytest.mark.parametrize("kind,transport", SERVERS)
def test_random_reads_match_file(nbd_server, image, kind, transport):
    path, data = image
    server = nbd_server(kind, path, transport=transport, read_only=True)
    rng = random.Random(SEED + 1)
    size = len(data)

    async def main():
        client = await open_nbd(server.address, server.export,
                                meta_contexts=("base:allocation",))
        try:
            assert client.size == size, f"seed {SEED}"
            assert client.read_only
            # Many concurrent reads, unaligned offsets and lengths.
            reqs = []
            for _ in range(150):
                off = rng.randrange(size)
                n = rng.randint(1, min(2 * MiB, size - off))
                reqs.append((off, n))
            reqs += [(0, 4096), (size - 1, 1), (size - 512, 512),
                     (rng.randrange(size // 4096) * 4096, 64 * 1024)]
            results = await asyncio.gather(
                *(client.read(o, n) for o, n in reqs))
            for (o, n), got in zip(reqs, results):
                assert got == data[o:o + n], (
                    f"read offset={o} length={n} differs (seed {SEED})")
            # Largest single request the server allows.
            n = min(client.max_request, size)
            assert await client.read(0, n) == data[:n]
        finally:
            await client.close()

        # The layer splits what is larger than the server's maximum.
        source = await NbdSource.open(server.address, server.export)
        try:
            assert source.size == size
            assert not source.capabilities.writable
            whole = await source.read(0, size)
            assert whole == data, f"whole-export read differs (seed {SEED})"
            off = 12345
            assert await source.read(off, size - off - 7) == \
                data[off:size - 7]
            step = source.client.max_request
            assert source.stats()["requests"] == (
                -(-size // step) + -(-(size - off - 7) // step))
        finally:
            await source.close()

    run(main())


def test_reads_honour_minimum_block_size(nbd_server, image):
    """nbdkit's blocksize-policy filter makes the server demand 512-byte
    alignment and at most 1 MiB a request; NbdSource widens unaligned reads
    and splits large ones, and never sends what the server would refuse."""
    path, data = image
    server = nbd_server(
        "nbdkit", path, read_only=True, filters=("blocksize-policy",),
        params=("blocksize-minimum=512", "blocksize-preferred=4096",
                "blocksize-maximum=1M", "blocksize-error-policy=error"))
    rng = random.Random(SEED + 2)

    async def main():
        source = await NbdSource.open(server.address, server.export)
        try:
            client = source.client
            assert client.export.block_size_advertised
            assert (client.min_block, client.max_request) == (512, MiB)
            reqs = [(1, 1), (511, 2), (1000, 3 * MiB + 17)]
            for _ in range(40):
                off = rng.randrange(len(data))
                reqs.append((off, rng.randint(1, min(3 * MiB,
                                                     len(data) - off))))
            results = await asyncio.gather(
                *(source.read(o, n) for o, n in reqs))
            for (o, n), got in zip(reqs, results):
                assert got == data[o:o + n], f"offset={o} length={n}"
            # The bare client refuses unaligned requests before sending.
            with pytest.raises(BlockError) as info:
                await client.read(1, 511)
            assert info.value.errno == errno.EINVAL
            assert "minimum block size 512" in str(info.value)
            assert await client.read(0, 512) == data[:512]
        finally:
            await source.close()

    run(main())


# -- block status --------------------------------------------------------

@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_block_status_shows_hole(nbd_server, tmp_path, kind):
    path = str(tmp_path / "sparse.raw")
    expected = sparse_image(path)
    server = nbd_server(kind, path, read_only=True)

    async def main():
        source = await NbdSource.open(server.address, server.export)
        try:
            assert source.capabilities.block_status
            assert "base:allocation" in source.capabilities.contexts
            extents = await source.block_status(0, source.size)
            assert sum(e.length for e in extents) == source.size
            pos = 0
            saw_hole = False
            for e in extents:
                if e.flags & STATE_HOLE:
                    saw_hole = True
                    # A hole must not cover the data in the middle.
                    assert pos + e.length <= 4 * MiB or pos >= 5 * MiB, \
                        extents
                    assert e.flags & STATE_ZERO
                pos += e.length
            assert saw_hole, extents
            # The first MiB is a hole, the data range is data.
            [first] = await source.block_status(0, MiB)
            assert first.flags & STATE_HOLE
            [mid] = await source.block_status(4 * MiB + 100, 1000)
            assert not mid.flags & STATE_HOLE and mid.length == 1000
            # Reads of holes come back as zeroes (OFFSET_HOLE chunks).
            assert await source.read(0, source.size) == expected
            # req_one gives one extent.
            one = await source.client.block_status(0, 8 * MiB,
                                                   req_one=True)
            assert len(one) == 1
        finally:
            await source.close()

    run(main())


def test_block_status_without_contexts_says_all_data(nbd_server, tmp_path):
    path = str(tmp_path / "sparse.raw")
    sparse_image(path)
    server = nbd_server("qemu-nbd", path, read_only=True)

    async def main():
        source = await NbdSource.open(server.address, server.export,
                                      meta_contexts=())
        try:
            assert not source.capabilities.block_status
            extents = await source.block_status(0, source.size)
            assert [(e.length, e.flags) for e in extents] == [
                (source.size, 0)]
            with pytest.raises(BlockError) as info:
                await source.client.block_status(0, 4096)
            assert "not negotiated" in str(info.value)
        finally:
            await source.close()

    run(main())


# -- writes ------------------------------------------------------------

@pytest.mark.parametrize("kind,transport", [
    ("qemu-nbd", "unix"), ("qemu-nbd", "tcp"), ("nbdkit", "unix")])
def test_writes_are_read_back(nbd_server, tmp_path, kind, transport):
    path = str(tmp_path / "rw.raw")
    size = 60 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
    server = nbd_server(kind, path, transport=transport)
    rng = random.Random(SEED + 3)
    shadow = bytearray(size)

    async def main():
        source = await NbdSource.open(server.address, server.export)
        try:
            assert source.capabilities.writable
            # 40 concurrent writes, unaligned, each in its own 384 KiB slot
            # so that the order they land in does not matter.
            slot = 384 * 1024
            writes = []
            for i in range(40):
                n = rng.randint(1, slot - 1)
                off = i * slot + rng.randrange(slot - n)
                writes.append((off, rng.randbytes(n)))
            await asyncio.gather(*(source.write(o, d, fua=(i % 2 == 0))
                                   for i, (o, d) in enumerate(writes)))
            for o, d in writes:
                shadow[o:o + len(d)] = d
            got = await asyncio.gather(*(source.read(o, len(d))
                                         for o, d in writes))
            assert got == [d for _, d in writes]
            # A write bigger than the server's maximum request is split.
            big = rng.randbytes(size - 20 * MiB - 3)
            before = source.stats()["requests"]
            await source.write(20 * MiB + 3, big)
            assert source.stats()["requests"] - before == -(
                -len(big) // source.client.max_request) > 1
            shadow[20 * MiB + 3:] = big
            await source.write_zeroes(MiB + 7, 5000)
            shadow[MiB + 7:MiB + 5007] = bytes(5000)
            # Trim leaves the range undefined until it is written again.
            await source.trim(8 * MiB, MiB)
            await source.write_zeroes(8 * MiB, MiB, fua=True)
            shadow[8 * MiB:9 * MiB] = bytes(MiB)
            await source.flush()
            assert await source.read(0, size) == bytes(shadow)
        finally:
            await source.close()
        with open(path, "rb") as f:
            assert f.read() == bytes(shadow)

    run(main())


def test_write_to_read_only_export(nbd_server, image):
    path, data = image
    server = nbd_server("qemu-nbd", path, read_only=True)

    async def main():
        source = await NbdSource.open(server.address, server.export)
        try:
            assert not source.capabilities.writable
            with pytest.raises(BlockError) as info:
                await source.write(0, b"x")
            assert info.value.errno == errno.EPERM
            assert "read-only" in str(info.value)
            with pytest.raises(BlockError) as info:
                await source.client.write(0, b"x")
            assert info.value.errno == errno.EPERM
            await source.trim(0, 4096)          # advice: ignored
            assert await source.read(0, 3) == data[:3]
        finally:
            await source.close()

    run(main())


# -- errors --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_read_past_end_is_einval_before_sending(nbd_server, image, kind):
    path, data = image
    server = nbd_server(kind, path, read_only=True)
    size = len(data)

    async def main():
        client = await open_nbd(server.address, server.export)
        try:
            for off, n in [(size - 10, 11), (size, 1), (size + 4096, 10)]:
                with pytest.raises(BlockError) as info:
                    await client.read(off, n)
                assert info.value.errno == errno.EINVAL
                msg = str(info.value)
                assert f"offset={off}" in msg and f"size {size}" in msg
                assert client.in_flight == 0
            with pytest.raises(BlockError) as info:
                await client.read(-1, 10)
            assert info.value.errno == errno.EINVAL
            # The connection is still fine.
            assert await client.read(size - 10, 10) == data[-10:]
        finally:
            await client.close()
        source = NbdSource(await open_nbd(server.address, server.export))
        try:
            with pytest.raises(BlockError) as info:
                await source.read(size - 1, 2)
            assert info.value.errno == errno.EINVAL
        finally:
            await source.close()

    run(main())


def test_server_error_reaches_the_request(nbd_server, image, tmp_path):
    """nbdkit's error filter fails reads while a trigger file exists."""
    path, data = image
    trigger = tmp_path / "fail-reads"
    server = nbd_server(
        "nbdkit", path, read_only=True, filters=("error",),
        params=("error=EIO", "error-pread-rate=100%",
                f"error-pread-file={trigger}"))

    async def main():
        client = await open_nbd(server.address, server.export)
        try:
            assert await client.read(0, 100) == data[:100]
            trigger.touch()
            with pytest.raises(BlockError) as info:
                await client.read(0, 100)
            assert info.value.errno == errno.EIO
            assert server.address in str(info.value)
            trigger.unlink()
            # The error failed one request, not the connection.
            assert await client.read(100, 100) == data[100:200]
        finally:
            await client.close()

    run(main())


def test_connect_to_closed_port_names_the_address(tmp_path):
    port = free_port()
    address = f"tcp:127.0.0.1:{port}"

    async def main():
        with pytest.raises(NbdConnectionError) as info:
            await open_nbd(address, "disk", timeout=5)
        assert address in str(info.value)
        assert info.value.errno == errno.ECONNREFUSED
        assert "refused" in str(info.value).lower()

        missing = f"unix:{tmp_path / 'nobody.sock'}"
        with pytest.raises(NbdConnectionError) as info:
            await open_nbd(missing, "disk", timeout=5)
        assert missing in str(info.value)
        assert isinstance(info.value, BlockError)

        with pytest.raises(NbdConnectionError) as info:
            await list_exports(address, timeout=5)
        assert address in str(info.value)

    run(main())


def test_not_an_nbd_server(tmp_path):
    """A server that talks something else: a clear protocol error."""
    async def main():
        async def handle(reader, writer):
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(32))
            await writer.drain()
            await reader.read(100)
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(Exception) as info:
                await open_nbd(f"tcp:127.0.0.1:{port}", "x", timeout=5)
            assert "not an NBD server" in str(info.value)
            assert f"tcp:127.0.0.1:{port}" in str(info.value)
        finally:
            srv.close()
            await srv.wait_closed()

    run(main())


def test_unknown_export_on_qemu_nbd(nbd_server, image):
    path, _ = image
    server = nbd_server("qemu-nbd", path, read_only=True)

    async def main():
        with pytest.raises(NbdHandshakeError) as info:
            await open_nbd(server.address, "no-such-export", timeout=5)
        msg = str(info.value)
        assert "'no-such-export'" in msg and server.address in msg

    run(main())


def test_server_dies_with_requests_in_flight(nbd_server, image):
    path, data = image
    server = nbd_server("nbdkit", path, read_only=True,
                        filters=("delay",), params=("rdelay=2",))

    async def main():
        client = await open_nbd(server.address, server.export)
        reads = [asyncio.ensure_future(client.read(i * 4096, 4096))
                 for i in range(4)]
        # Sent (the server holds every read 2 s), none answered.
        await until(lambda: client.in_flight == 4, "4 reads in flight")
        assert not any(r.done() for r in reads)
        server.proc.kill()
        results = await asyncio.gather(*reads, return_exceptions=True)
        for r in results:
            assert isinstance(r, NbdConnectionError), r
            assert server.address in str(r)
        with pytest.raises(NbdConnectionError):
            await client.read(0, 1)
        await client.close()          # still fine to close

    run(main())


# -- listing, URIs, close ----------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_list_exports_qemu_nbd(nbd_server, image, transport):
    path, _ = image
    server = nbd_server("qemu-nbd", path, transport=transport,
                        export="vm-image-1", read_only=True)

    async def main():
        exports = await list_exports(server.address, timeout=5)
        assert [e.name for e in exports] == ["vm-image-1"]
        # The server is still up for a real client after the listing.
        client = await open_nbd(server.address, "vm-image-1")
        await client.close()

    run(main())


def test_list_exports_nbdkit(nbd_server, image):
    path, _ = image
    server = nbd_server("nbdkit", path, read_only=True)

    async def main():
        exports = await list_exports(server.address, timeout=5)
        # The file plugin (one file) lists just the default export "".
        assert [e.name for e in exports] == [""]
        # nbdkit's file plugin serves any name asked for.
        client = await open_nbd(server.address, "whatever")
        assert client.size == os.path.getsize(path)
        await client.close()

    run(main())


def test_uris(nbd_server, image):
    path, data = image
    unix = nbd_server("qemu-nbd", path, export="a/b c", read_only=True)
    tcp = nbd_server("qemu-nbd", path, transport="tcp", export="disk",
                     read_only=True)
    sock = unix.address[len("unix:"):]
    port = int(tcp.address.rpartition(":")[2])
    uri_unix = f"nbd+unix:///a%2Fb%20c?socket={sock}"
    uri_tcp = f"nbd://127.0.0.1:{port}/disk"
    assert parse_nbd_uri(uri_unix) == (unix.address, "a/b c")
    assert parse_nbd_uri(uri_tcp) == (tcp.address, "disk")

    async def main():
        for uri in (uri_unix, uri_tcp):
            client = await open_nbd(uri)
            try:
                assert await client.read(0, 10) == data[:10]
            finally:
                await client.close()

    run(main())


def test_close_sends_disconnect_and_is_idempotent(nbd_server, image):
    path, data = image
    server = nbd_server("qemu-nbd", path, read_only=True)

    async def main():
        client = await open_nbd(server.address, server.export)
        assert isinstance(client, NbdClient)
        pending = asyncio.ensure_future(client.read(0, MiB))
        await asyncio.sleep(0)
        await client.close()           # waits for the read in flight
        assert pending.result() == data[:MiB]
        await client.close()
        assert client.closed
        with pytest.raises(NbdConnectionError, match="closed"):
            await client.read(0, 1)

    run(main())
    # qemu-nbd logs nothing alarming about a client that says goodbye.
    assert "error" not in server.stderr().lower(), server.stderr()


def test_silent_server_times_out_naming_the_address():
    async def main():
        async def handle(reader, writer):
            await reader.read(100)           # never says NBDMAGIC
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"tcp:127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        try:
            start = time.monotonic()
            with pytest.raises(NbdConnectionError) as info:
                await open_nbd(address, "x", timeout=0.3)
            assert time.monotonic() - start < 2
            assert info.value.errno == errno.ETIMEDOUT
            assert address in str(info.value)
            assert "no NBD greeting" in str(info.value)
        finally:
            srv.close()
            await srv.wait_closed()

    run(main())


def test_aligned_server_without_write_zeroes(nbd_server, tmp_path):
    """A writable nbdkit demanding 512-byte blocks and lacking
    write_zeroes: NbdSource refuses unaligned writes with a reason,
    emulates write_zeroes with writes, and aligns block status queries."""
    path = str(tmp_path / "aligned.raw")
    expected = bytearray(sparse_image(path))
    server = nbd_server(
        "nbdkit", path, filters=("blocksize-policy", "nozero"),
        params=("blocksize-minimum=512", "blocksize-maximum=64K",
                "blocksize-error-policy=error", "zeromode=none"))

    async def main():
        source = await NbdSource.open(server.address, server.export)
        try:
            assert source.capabilities.writable
            assert not source.client.export.can_write_zeroes
            with pytest.raises(BlockError) as info:
                await source.write(100, b"x" * 512)
            assert info.value.errno == errno.EINVAL
            assert "minimum block size 512" in str(info.value)
            # Emulated with 64 KiB writes of zeroes.
            await source.write_zeroes(4 * MiB + 512, 200 * 1024)
            expected[4 * MiB + 512:4 * MiB + 512 + 200 * 1024] = bytes(
                200 * 1024)
            await source.write(MiB, b"\x5a" * 4096, fua=True)
            expected[MiB:MiB + 4096] = b"\x5a" * 4096
            assert await source.read(0, source.size) == bytes(expected)
            # Unaligned status queries are widened and clipped.
            extents = await source.block_status(MiB + 1, 4095)
            assert [(e.length, e.flags & STATE_HOLE) for e in extents] == [
                (4095, 0)]
            extents = await source.block_status(1, source.size - 2)
            assert sum(e.length for e in extents) == source.size - 2
        finally:
            await source.close()

    run(main())
