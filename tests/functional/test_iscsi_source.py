"""IscsiSource (libiscsi through ctypes, on asyncio) against a real tgtd.

Every test starts its own tgtd on free loopback ports (see
iscsi_fixtures) and the fixture stops it, pass or fail. Faults are real:
a closed port, a portal that accepts TCP and never answers, wrong CHAP
secrets, tgtd killed and started again.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.functional.iscsi_fixtures import free_port, tgtd  # noqa: F401
from tests.waiting import until, wait_until
from vmthunder.blockdev import BlockError
from vmthunder.volume import libiscsi
from vmthunder.volume.iscsi_source import IscsiSource
from vmthunder.volume.manifest import build_manifest

pytestmark = pytest.mark.timeout(40)

MiB = 1 << 20
SEED = int(os.environ.get("VMTHUNDER_TEST_SEED", time.time_ns() % 100000))
IQN = "iqn.2024-01.org.vmthunder.test"


def run(coro):
    return asyncio.run(coro)


def make_file(path, size: int, seed: int = SEED) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def pad512(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


@pytest.fixture
def image(tmp_path):
    """A random 16-64 MiB image (multiple of 4 KiB) and its bytes."""
    rng = random.Random(SEED)
    size = rng.randrange(16 * MiB, 64 * MiB + 1, 4096)
    path = str(tmp_path / "image.raw")
    return path, make_file(path, size)


def served(tgtd, path, name="img", *, chap=None):  # noqa: F811
    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:{name}")
    daemon.add_lun(target, 1, path)
    if chap:
        daemon.add_chap(target, *chap)
    return daemon, target


# -- the binding -------------------------------------------------------

def test_struct_layout_matches_headers(tmp_path):
    """The ctypes structs agree with libiscsi's headers (offsets used)."""
    header = "/usr/include/iscsi/scsi-lowlevel.h"
    if not os.path.exists(header) or shutil.which("cc") is None:
        pytest.skip("libiscsi-dev headers or a C compiler missing")
    src = tmp_path / "off.c"
    src.write_text("""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\\n",
        sizeof(struct scsi_task), offsetof(struct scsi_task, status),
        offsetof(struct scsi_task, residual_status),
        offsetof(struct scsi_task, residual),
        offsetof(struct scsi_task, sense),
        offsetof(struct scsi_task, datain),
        offsetof(struct scsi_sense, key), offsetof(struct scsi_sense, ascq),
        sizeof(struct scsi_iovec), sizeof(struct scsi_sense));
    return 0;
}
""")
    exe = tmp_path / "off"
    subprocess.run(["cc", str(src), "-o", str(exe)], check=True)
    got = [int(x) for x in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    T, S = libiscsi.ScsiTask, libiscsi.ScsiSense
    assert got == [ctypes.sizeof(T), T.status.offset,
                   T.residual_status.offset, T.residual.offset,
                   T.sense.offset, T.datain.offset, S.key.offset,
                   S.ascq.offset, ctypes.sizeof(libiscsi.ScsiIovec),
                   ctypes.sizeof(S)]


# -- reading -----------------------------------------------------------

def test_whole_lun_and_concurrent_unaligned_reads(tgtd, image):  # noqa: F811
    path, data = image
    daemon, target = served(tgtd, path)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1))
        try:
            assert src.size == len(data)
            assert src.block_size == 512
            assert not src.capabilities.writable
            assert src.describe() == (f"iSCSI LUN {target.iqn}/1 at "
                                      f"{daemon.portal}")
            assert src.identity() == f"iscsi:{target.iqn}/1:{len(data)}"
            whole = await src.read(0, src.size)     # split in 1 MiB cmds
            assert whole == data
            rng = random.Random(SEED)
            ranges = [(o, rng.randrange(1, min(3 * MiB, len(data) - o) + 1))
                      for o in (rng.randrange(len(data)) for _ in range(300))]
            ranges += [(0, 1), (len(data) - 1, 1), (511, 2), (513, 511)]
            results = await asyncio.gather(*(src.read(o, n)
                                             for o, n in ranges))
            for (o, n), got in zip(ranges, results):
                assert got == data[o:o + n], (o, n)
            buf = bytearray(3 * MiB)
            await src.read_into(4096, buf)           # aligned: no copy
            assert buf == data[4096:4096 + 3 * MiB]
            await src.read_into(777, memoryview(buf)[:1000])
            assert buf[:1000] == data[777:1777]
            assert await src.read(5, 0) == b""
            with pytest.raises(BlockError) as info:
                await src.read(len(data) - 10, 11)
            assert info.value.errno == errno.EINVAL
            stats = src.stats()
            assert stats["bytes_read"] > len(data)
            assert stats["commands"] >= len(data) // MiB + len(ranges)
            assert stats["reconnects"] == 0
            # A SCSI error (READ past the LUN's end, below the range
            # check) is EIO naming the target and the offset.
            blocks = len(data) // 512
            with pytest.raises(BlockError) as info:
                await src.session.read_into(1, blocks, memoryview(
                    bytearray(512)), f"read at offset {len(data)}")
            assert info.value.errno == errno.EIO
            assert (f"iSCSI LUN {target.iqn}/1 at {daemon.portal}: read at "
                    f"offset {len(data)}: CHECK CONDITION") in str(info.value)
            assert "ILLEGAL_REQUEST" in str(info.value)
        finally:
            await src.close()
            await src.close()                    # idempotent
        with pytest.raises(BlockError):
            await src.read(0, 1)
        assert not libiscsi._handlers           # every callback released
    run(main())


def test_reads_in_flight_are_bounded_and_cancel_safe(tgtd, tmp_path):  # noqa
    path = str(tmp_path / "img.raw")
    data = make_file(path, 8 * MiB)
    daemon, target = served(tgtd, path)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1), max_inflight=4,
                                     max_transfer=64 * 1024)
        try:
            peak = 0
            task = asyncio.ensure_future(src.read(0, 8 * MiB))
            while not task.done():
                peak = max(peak, src.session.in_flight)
                await asyncio.sleep(0)
            assert await task == data
            assert 1 <= peak <= 4
            # A caller that gives up leaves the connection consistent.
            for _ in range(5):
                issued = src.stats()["commands"]
                t = asyncio.ensure_future(src.read(MiB, 4 * MiB))
                await until(lambda: src.stats()["commands"] > issued,
                            "the read's commands in flight")
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
            assert await src.read(12345, 100000) == data[12345:112345]
        finally:
            await src.close()
    run(main())


# -- manifest ----------------------------------------------------------

def export_with_manifest(tgtd, tmp_path, image_size, manifest_size,  # noqa
                         manifest_bytes=None):
    """An origin like `vmthunder export` makes: LUN 1 the image padded
    to 512, LUN 2 the manifest JSON NUL-padded to 512."""
    data = make_file(tmp_path / "src.raw", image_size)
    volume = tmp_path / "volume.raw"
    volume.write_bytes(pad512(data))
    if manifest_bytes is None:
        other = tmp_path / "manifest-of.raw"
        other.write_bytes(data[:manifest_size] if manifest_size <= len(data)
                          else data + bytes(manifest_size - len(data)))
        manifest = build_manifest(str(other), "img", 256 * 1024)
        manifest_bytes = manifest.to_bytes()
    else:
        manifest = None
    mpath = tmp_path / "manifest.lun"
    mpath.write_bytes(pad512(manifest_bytes))
    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:manifest")
    daemon.add_lun(target, 1, str(volume))
    daemon.add_lun(target, 2, str(mpath))
    return daemon, target, data, manifest


def test_manifest_lun_gives_size_and_identity(tgtd, tmp_path):  # noqa: F811
    size = 3 * MiB + 1000                   # LUN rounds up to 512
    daemon, target, data, manifest = export_with_manifest(
        tgtd, tmp_path, size, size)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1), manifest_lun=2)
        try:
            assert src.manifest == manifest
            assert src.lun_size == size + 24 and src.size == size
            assert src.identity() == manifest.identity()
            assert await src.read(0, size) == data
            assert await src.read(size - 7, 7) == data[-7:]
            for i in range(manifest.chunks):
                start, n = manifest.chunk_range(i)
                manifest.verify(i, await src.read(start, n))
            with pytest.raises(BlockError):
                await src.read(size - 7, 8)       # past the image end
        finally:
            await src.close()
    run(main())


@pytest.mark.parametrize("manifest_size", [3 * MiB - 4096, 3 * MiB + 512])
def test_manifest_size_mismatch_is_refused(tgtd, tmp_path,  # noqa: F811
                                           manifest_size):
    daemon, target, _, _ = export_with_manifest(
        tgtd, tmp_path, 3 * MiB, manifest_size)

    async def main():
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(daemon.url(target, 1), manifest_lun=2)
        assert info.value.errno == errno.EINVAL
        assert (f"LUN size {3 * MiB} disagrees with its manifest "
                f"({manifest_size}") in str(info.value)
    run(main())


def test_manifest_lun_that_is_not_a_manifest(tgtd, tmp_path):  # noqa: F811
    daemon, target, _, _ = export_with_manifest(
        tgtd, tmp_path, MiB, MiB, manifest_bytes=b"\x01garbage" * 100)

    async def main():
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(daemon.url(target, 1), manifest_lun=2)
        assert info.value.errno == errno.EINVAL
        assert "manifest LUN 2" in str(info.value)
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(daemon.url(target, 1), manifest_lun=3)
        assert info.value.errno == errno.EINVAL
        assert "manifest LUN 3" in str(info.value)
    run(main())


# -- connecting --------------------------------------------------------

def test_unreachable_portal_names_it():
    port = free_port()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(f"iscsi://127.0.0.1:{port}/{IQN}:x/1",
                                   timeout=5)
        assert time.monotonic() - t0 < 5
        assert info.value.errno == errno.ECONNREFUSED
        assert f"cannot connect to iSCSI portal 127.0.0.1:{port}" in str(
            info.value)
        assert "refused" in str(info.value).lower()
    run(main())


def test_silent_portal_times_out():
    """A portal that accepts TCP and never answers the login."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        async def main():
            t0 = time.monotonic()
            with pytest.raises(BlockError) as info:
                await IscsiSource.open(
                    f"iscsi://127.0.0.1:{port}/{IQN}:x/1", timeout=1)
            assert 0.9 < time.monotonic() - t0 < 3
            assert info.value.errno == errno.ETIMEDOUT
            assert f"127.0.0.1:{port}" in str(info.value)
        run(main())


def test_unknown_target_and_lun(tgtd, tmp_path):  # noqa: F811
    path = str(tmp_path / "img.raw")
    make_file(path, MiB)
    daemon, target = served(tgtd, path)

    async def main():
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(daemon.url(f"{IQN}:nope", 1))
        assert info.value.errno == errno.ENOENT
        assert "no such target" in str(info.value)
        with pytest.raises(BlockError) as info:
            await IscsiSource.open(daemon.url(target, 4))
        assert info.value.errno == errno.ENOENT
        assert "LUN 4" in str(info.value)
    run(main())


def test_chap(tgtd, tmp_path):  # noqa: F811
    path = str(tmp_path / "img.raw")
    data = make_file(path, 2 * MiB)
    daemon, target = served(tgtd, path, chap=("alice", "correct-horse-1"))

    async def main():
        for url, password in [
                (daemon.url(target, 1, user="alice", password="Xyzzy"), None),
                (daemon.url(target, 1, user="mallory", password="x"), None),
                (daemon.url(target, 1), None)]:
            with pytest.raises(BlockError) as info:
                await IscsiSource.open(url)
            assert info.value.errno == errno.EACCES
            assert (f"login to iSCSI target {target.iqn} at {daemon.portal} "
                    "failed: authentication") in str(info.value)
            assert "Xyzzy" not in str(info.value)       # no secret shown
        for url, password in [
                (daemon.url(target, 1, user="alice",
                            password="correct-horse-1"), None),
                (daemon.url(target, 1, user="alice"), "correct-horse-1")]:
            src = await IscsiSource.open(url, password=password)
            try:
                assert await src.read(0, 2 * MiB) == data
            finally:
                await src.close()
    run(main())


def test_second_portal_when_first_is_dead(tgtd, tmp_path):  # noqa: F811
    path = str(tmp_path / "img.raw")
    data = make_file(path, MiB)
    daemon, target = served(tgtd, path)
    dead = free_port()

    async def main():
        src = await IscsiSource.open(
            f"iscsi://127.0.0.1:{dead}/{target.iqn}/1",
            portals=[f"127.0.0.1:{free_port()}", daemon.portal])
        try:
            assert src.describe().endswith(f"at {daemon.portal}")
            assert await src.read(0, MiB) == data
        finally:
            await src.close()
    run(main())


# -- target restarts -----------------------------------------------------

def reads_going(src, reads: int = 8):
    """A condition: ``reads`` reads done and more in flight."""
    def check():
        stats = src.stats()
        return stats["reads"] >= reads and stats["in_flight"] > 0
    return check


def bounce(daemon, ready, down_for: float, crash: bool):
    """Stop tgtd once ``ready()`` holds, start it ``down_for`` s later."""
    def go():
        wait_until(ready, "reads before the outage", timeout=10)
        daemon.kill() if crash else daemon.stop()
        time.sleep(down_for)
        daemon.start()
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


async def read_stream(src, data, stop_at: float, workers: int = 8):
    """Random reads until ``stop_at``; every one checked; latencies."""
    rng = random.Random(SEED)
    latencies = []

    async def worker():
        while time.monotonic() < stop_at:
            o = rng.randrange(len(data) - 1)
            n = rng.randrange(1, min(2 * MiB, len(data) - o) + 1)
            t0 = time.monotonic()
            got = await src.read(o, n)
            latencies.append(time.monotonic() - t0)
            assert got == data[o:o + n], (o, n)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


@pytest.mark.parametrize("crash", [True, False], ids=["kill", "stop"])
def test_target_restart_during_reads(tgtd, tmp_path, crash):  # noqa: F811
    path = str(tmp_path / "img.raw")
    data = make_file(path, 16 * MiB)
    daemon, target = served(tgtd, path)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1),
                                     reconnect_timeout=20)
        try:
            thread = bounce(daemon, reads_going(src), 2.0, crash)
            latencies = await read_stream(src, data, time.monotonic() + 4.5)
            await asyncio.to_thread(thread.join)
            assert daemon.exits == [-9 if crash else 0]
            stats = src.stats()
            assert stats["reconnects"] == 1, stats
            assert stats["reissued"] >= 1, stats
            # Reads stalled across the outage, then completed.
            assert max(latencies) > 1.5
            assert len(latencies) > 50
            assert await src.read(0, len(data)) == data
        finally:
            await src.close()
    run(main())


def test_hung_target_is_detected_by_the_command_timeout(tgtd,  # noqa
                                                        tmp_path):
    """tgtd frozen (SIGSTOP): no FIN, no RST; commands time out, the
    session is replaced once it thaws, reads complete."""
    path = str(tmp_path / "img.raw")
    data = make_file(path, 8 * MiB)
    daemon, target = served(tgtd, path)

    async def main():
        # libiscsi counts whole seconds: 2 means 1 to 2 s.
        src = await IscsiSource.open(daemon.url(target, 1), timeout=1,
                                     command_timeout=2, reconnect_timeout=10)
        try:
            def freeze():
                wait_until(reads_going(src, 4), "reads before the freeze")
                os.kill(daemon.proc.pid, signal.SIGSTOP)
                time.sleep(3)
                os.kill(daemon.proc.pid, signal.SIGCONT)
            thread = threading.Thread(target=freeze, daemon=True)
            thread.start()
            latencies = await read_stream(src, data, time.monotonic() + 4.5,
                                          workers=4)
            await asyncio.to_thread(thread.join)
            assert max(latencies) > 2.5
            assert src.stats()["reconnects"] >= 1
        finally:
            await src.close()
    run(main())


def test_target_not_back_in_time_fails_then_recovers(tgtd, tmp_path):  # noqa
    path = str(tmp_path / "img.raw")
    data = make_file(path, 4 * MiB)
    daemon, target = served(tgtd, path)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1),
                                     reconnect_timeout=1.5)
        try:
            assert await src.read(0, 4096) == data[:4096]
            daemon.kill()
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(src.read(i * MiB, MiB) for i in range(4)),
                return_exceptions=True)
            elapsed = time.monotonic() - t0
            assert 1.3 < elapsed < 5, elapsed
            for exc in results:
                assert isinstance(exc, BlockError), exc
                assert exc.errno == errno.EIO
                assert (f"iSCSI target {target.iqn} (LUN 1, portals "
                        f"{daemon.portal}) did not come back within 1.5 s"
                        in str(exc))
                assert "Connection refused" in str(exc)
            # Still down: a new read tries once more and fails fast.
            t0 = time.monotonic()
            with pytest.raises(BlockError) as info:
                await src.read(0, 512)
            assert time.monotonic() - t0 < 1
            assert info.value.errno == errno.EIO
            # Back: the next read reconnects and succeeds.
            await asyncio.to_thread(daemon.start)
            assert await src.read(MiB, MiB) == data[MiB:2 * MiB]
            assert src.stats()["reconnects"] == 1
        finally:
            await src.close()
    run(main())


def test_reconnect_moves_to_the_next_portal(tgtd, tmp_path):  # noqa: F811
    """Two portals (two tgtd here) serve one target; the first dies."""
    path = str(tmp_path / "img.raw")
    data = make_file(path, 8 * MiB)
    first, target = served(tgtd, path)
    second = tgtd()
    second.add_lun(second.add_target(target.iqn), 1, path)

    async def main():
        src = await IscsiSource.open(first.url(target, 1),
                                     portals=[second.portal],
                                     reconnect_timeout=10)
        try:
            assert src.describe().endswith(first.portal)
            reads = asyncio.ensure_future(
                read_stream(src, data, time.monotonic() + 2.0, workers=4))
            await until(reads_going(src, 4), "reads on the first portal",
                        timeout=1.5)
            first.kill()
            await reads
            assert src.describe().endswith(second.portal)
            assert src.stats()["reconnects"] == 1
        finally:
            await src.close()
    run(main())


def test_manifest_lun_back_after_the_image_lun_is_waited_for(
        tgtd, tmp_path):  # noqa: F811
    """A target set up again one LUN at a time after a restart (as
    tgt-admin or a test fixture does): the session reconnects once LUN 1
    answers, but a read that needs the digest table (LUN 2) waits until
    LUN 2 is back too, and returns the right bytes (it used to fail with
    the LUN's SCSI error)."""
    # Past the first page of the digest table (256 digests of 256 KiB
    # chunks), so the last chunk's digest is read from LUN 2 on demand.
    size = 72 * MiB
    daemon, target, data, manifest = export_with_manifest(
        tgtd, tmp_path, size, size)
    lun2 = daemon.targets[target.tid].luns[2].path

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1), manifest_lun=2,
                                     reconnect_timeout=20)
        try:
            assert src.manifest.lazy_loading
            assert await src.read(0, 4096) == data[:4096]
            daemon.kill()
            daemon.remove_lun(target, 2)
            await asyncio.to_thread(daemon.start)       # LUN 1 only
            offset = size - 256 * 1024              # on the second page
            read = asyncio.ensure_future(src.read(offset, 4096))
            await asyncio.sleep(1.0)
            assert not read.done(), read.exception()    # waits for LUN 2
            await asyncio.to_thread(daemon.add_lun, target, 2, lun2)
            got = await asyncio.wait_for(read, 15)
            assert got == data[offset:offset + 4096]
            manifest.verify(manifest.chunks - 1, await src.read(
                *manifest.chunk_range(manifest.chunks - 1)))
        finally:
            await src.close()
    run(main())


def test_lun_replaced_while_away_is_refused(tgtd, tmp_path):  # noqa: F811
    path = str(tmp_path / "img.raw")
    make_file(path, 4 * MiB)
    daemon, target = served(tgtd, path)

    async def main():
        src = await IscsiSource.open(daemon.url(target, 1),
                                     reconnect_timeout=10)
        try:
            daemon.kill()
            make_file(path, 2 * MiB, seed=SEED + 1)     # another volume
            await asyncio.to_thread(daemon.start)
            with pytest.raises(BlockError) as info:
                await src.read(0, 4096)
            assert info.value.errno == errno.EIO
            assert "changed while reconnecting" in str(info.value)
        finally:
            await src.close()
    run(main())
