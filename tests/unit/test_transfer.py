"""vmthunder.transfer on local files: the Task API and the properties
every copy has (no network, no external binaries)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import blake3
import pytest

from vmthunder import transfer
from vmthunder.transfer import base, destinations, engine

MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


def make_sparse(path, size=64 * MiB, runs=((0, 3 * MiB), (40 * MiB, MiB)),
                seed=1):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return str(path)


def blake3_of(path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".part-" in n)


def test_copy_file_equal_sparse_and_digest(tmp_path):
    src = make_sparse(tmp_path / "a.raw")
    dst = tmp_path / "b.raw"
    task = transfer.copy(src, str(dst))
    result = task.wait(30)
    assert task.done() and task.result == result
    assert dst.read_bytes() == open(src, "rb").read()
    # Sparse: only the data runs (4 MiB) take blocks.
    assert os.stat(dst).st_blocks * 512 <= 5 * MiB
    assert result.size == 64 * MiB
    assert result.bytes_copied == 4 * MiB
    assert result.bytes_skipped == 60 * MiB
    assert result.digest == f"blake3:{blake3_of(src)}"
    assert result.by_source == {src: 4 * MiB}
    assert result.verified is None
    p = task.progress()
    assert p.done == p.total == 64 * MiB and p.stage == "done"
    assert leftovers(tmp_path) == []


def test_zero_blocks_in_data_are_not_written(tmp_path):
    src = tmp_path / "z.raw"
    with open(src, "wb") as f:           # allocated zeros, then data
        f.write(bytes(8 * MiB) + os.urandom(MiB))
    dst = tmp_path / "out.raw"
    result = transfer.copy(str(src), str(dst)).wait(30)
    assert dst.read_bytes() == src.read_bytes()
    assert result.bytes_copied == 9 * MiB and result.bytes_written == MiB
    assert os.stat(dst).st_blocks * 512 <= 2 * MiB


def test_file_uri_and_digest_choice(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=4 * MiB, runs=((0, MiB),))
    dst = tmp_path / "b.raw"
    result = transfer.copy(f"file://{src}", f"file://{dst}",
                           digest="sha256").wait(30)
    import hashlib
    assert result.digest == "sha256:" + hashlib.sha256(
        open(src, "rb").read()).hexdigest()
    assert transfer.copy(src, str(tmp_path / "c.raw"),
                         digest=None).wait(30).digest is None


def test_progress_grows_and_rate_limit_holds(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=8 * MiB, runs=((0, 8 * MiB),))
    t0 = time.monotonic()
    task = transfer.copy(src, str(tmp_path / "b.raw"), rate_limit=16 * MiB,
                         request_size=MiB, max_in_flight=2)
    seen = []
    while not task.done():
        seen.append(task.progress().done)
        time.sleep(0.02)
    task.wait()
    elapsed = time.monotonic() - t0
    assert seen == sorted(seen) and len(set(seen)) > 3
    # 8 MiB at 16 MiB/s, a quarter second of burst.
    assert elapsed >= 0.2


def test_cancel_leaves_no_destination_and_keeps_the_previous(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=32 * MiB,
                      runs=((0, 32 * MiB),))
    dst = tmp_path / "b.raw"
    dst.write_bytes(b"previous")
    task = transfer.copy(src, str(dst), rate_limit=8 * MiB,
                         request_size=MiB)
    while task.progress().done < 2 * MiB:
        time.sleep(0.01)
    assert leftovers(tmp_path)               # written under a temp name
    assert task.cancel() is True
    with pytest.raises(transfer.TransferCancelled) as info:
        task.wait(10)
    assert "cancelled" in str(info.value)
    assert dst.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []
    assert task.progress().stage == "cancelled"
    assert task.cancel() is False


def test_source_and_destination_errors_name_the_side(tmp_path):
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy(str(tmp_path / "missing.raw"),
                      str(tmp_path / "x")).wait(10)
    assert str(info.value).startswith(f"source {tmp_path}/missing.raw: ")
    assert "does not exist" in str(info.value)
    src = make_sparse(tmp_path / "a.raw", size=MiB, runs=((0, MiB),))
    with pytest.raises(transfer.DestinationError) as info:
        transfer.copy(src, str(tmp_path / "no" / "dir" / "b.raw")).wait(10)
    assert str(info.value).startswith("destination ")
    assert "does not exist" in str(info.value)
    with pytest.raises(transfer.SourceError, match="unknown scheme 'ftp'"):
        transfer.copy("ftp://x/y", str(tmp_path / "b"))
    with pytest.raises(transfer.DestinationError, match="cannot write to"):
        transfer.copy(src, "http://example.invalid/x")
    with pytest.raises(TypeError, match="unknown options: bogus"):
        transfer.copy(src, str(tmp_path / "b"), bogus=1)
    with pytest.raises(transfer.TransferError, match="unknown digest"):
        transfer.copy(src, str(tmp_path / "b"), digest="nope")
    assert leftovers(tmp_path) == []


def test_source_shrinking_mid_copy_is_a_short_read(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=16 * MiB,
                      runs=((0, 16 * MiB),))
    task = transfer.copy(src, str(tmp_path / "b.raw"), rate_limit=8 * MiB,
                         request_size=MiB, max_in_flight=1)
    while task.progress().done < MiB:
        time.sleep(0.01)
    os.truncate(src, 4 * MiB)
    with pytest.raises(transfer.SourceError) as info:
        task.wait(20)
    assert "is shorter than its size when the copy began" in str(info.value)
    assert not (tmp_path / "b.raw").exists()
    assert leftovers(tmp_path) == []


def test_awaitable_from_asyncio(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=8 * MiB)

    async def main():
        task = transfer.copy(src, str(tmp_path / "b.raw"))
        with pytest.raises(RuntimeError, match="await"):
            task.wait()
        first = await task
        # A task made by a synchronous caller, awaited from a loop.
        other = await asyncio.to_thread(
            transfer.copy, src, str(tmp_path / "c.raw"))
        second = await other.wait_async()
        return first, second

    first, second = asyncio.run(main())
    assert first.digest == second.digest == f"blake3:{blake3_of(src)}"


def test_stale_temporary_files_of_dead_copies_are_removed(tmp_path):
    dst = tmp_path / "b.raw"
    dead = tmp_path / ".b.raw.part-999999999-abcd"
    dead.write_bytes(b"x")
    mine = tmp_path / f".b.raw.part-{os.getpid()}-abcd"
    mine.write_bytes(b"x")
    live = tmp_path / ".b.raw.part-1-abcd"      # init never dies
    live.write_bytes(b"x")
    assert destinations.remove_stale_temps(str(dst)) == [dead.name]
    assert mine.exists() and live.exists()


@pytest.mark.parametrize("vectorised", [True, False])
def test_data_runs(monkeypatch, vectorised):
    if not vectorised:
        monkeypatch.setattr(engine, "np", None)
    block = engine.ZERO_BLOCK
    z = bytes(block)
    d = b"\1" * block
    assert engine.data_runs(z * 4) == []
    assert engine.data_runs(d * 2) == [(0, 2 * block)]
    assert engine.data_runs(bytearray(z + d + d + z + d[:10])) == [
        (block, 3 * block), (4 * block, 4 * block + 10)]
    assert engine.data_runs(z + z[:10]) == []
    assert engine.data_runs(d + z[:10]) == [(0, block)]


def test_scheme_of():
    assert base.scheme_of("/x/y") == "file"
    assert base.scheme_of("export:img") == "export"
    assert base.scheme_of("NBD+UNIX:///x?socket=/s") == "nbd+unix"
    assert base.file_path("file:///a%20b") == "/a b"


def test_progress_from_another_thread_while_waiting(tmp_path):
    src = make_sparse(tmp_path / "a.raw", size=8 * MiB,
                      runs=((0, 8 * MiB),))
    task = transfer.copy(src, str(tmp_path / "b.raw"), rate_limit=32 * MiB)
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(task.progress().done)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(TimeoutError):
            task.wait(0.01)
        task.wait(20)
    finally:
        stop.set()
        watcher.join()
    assert seen == sorted(seen)
