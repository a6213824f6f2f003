"""Crash safety of the cache and the snapshots: SIGKILL a real server.

The cache rule (docs: DESIGN.md, "Chunk state and crash rules"): a chunk
is marked present only after its data is durable, so whatever moment the
process dies at, every chunk the on-disk map marks holds the image's
bytes. A snapshot keeps what a flush (or FUA write) acknowledged, and a
block written without a flush reads back as its old or its new data,
never as anything else.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from tests.functional.conftest import make_image, need

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
CHUNK = 4096
BLOCK = 4096                    # [snapshot] block_size default
READERS = 8


def cache_files(cache_dir):
    """(map bytes, data path) of the one cache under cache_dir."""
    keys = [k for k in os.listdir(cache_dir)
            if os.path.isdir(os.path.join(cache_dir, k))]
    assert len(keys) == 1, keys
    directory = os.path.join(cache_dir, keys[0])
    try:
        with open(os.path.join(directory, "map"), "rb") as f:
            marks = f.read()
    except FileNotFoundError:
        marks = b""
    return marks, os.path.join(directory, "data"), directory


def check_cache_invariant(cache_dir, image: bytes) -> int:
    """Every chunk marked in the map file holds the image's bytes.

    Returns how many chunks are marked.
    """
    marks, data_path, _ = cache_files(cache_dir)
    chunks = (len(image) + CHUNK - 1) // CHUNK
    # The map is empty (never saved) or exactly one byte per chunk.
    assert len(marks) in (0, chunks), len(marks)
    with open(data_path, "rb") as f:
        data = f.read()
    bad = []
    for i, mark in enumerate(marks):
        if mark == 1:
            lo, hi = i * CHUNK, min((i + 1) * CHUNK, len(image))
            if data[lo:hi] != image[lo:hi]:
                bad.append(i)
        else:
            assert mark == 0, f"map byte {i} is {mark}"
    assert not bad, f"chunks marked present without their data: {bad[:20]}"
    return marks.count(1)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def export_uri(served):
    (uri,) = served.uris.values()
    return uri


def cold_reader(uri, image, wanted, rng, errors, stop):
    """Read ranges around the chunks in ``wanted`` until the server dies.

    Ranges start anywhere in a chunk and may straddle into the next ones,
    so reads mix cached and uncached chunks. Every reply is checked.
    """
    try:
        h = connect(uri)
    except nbd.Error:
        return
    try:
        for index in wanted:
            if stop.is_set():
                return
            offset = index * CHUNK + rng.randrange(CHUNK)
            length = rng.randint(1, 2 * CHUNK)
            offset = min(offset, len(image) - 1)
            length = min(length, len(image) - offset)
            try:
                got = h.pread(length, offset)
            except nbd.Error:
                return              # the server was killed
            if got != image[offset:offset + length]:
                errors.append((offset, length))
                return
    finally:
        try:
            h.close()
        except Exception:
            pass


@pytest.mark.timeout(120)
def test_sigkill_during_cold_reads_never_marks_chunks_without_data(
        tmp_path, serve):
    need("nbdcopy")
    size = 128 * MiB - 1234             # the last chunk is short
    image_path = make_image(tmp_path / "image.raw", size, seed=42)
    with open(image_path, "rb") as f:
        image = f.read()
    chunks = (size + CHUNK - 1) // CHUNK
    cache_dir = str(tmp_path / "cache")
    rng = random.Random(1234)
    # Kill points spread over 20 ms .. 1.5 s, in random order.
    delays = [0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0,
              1.2, 1.5]
    rng.shuffle(delays)
    history = []
    for delay in delays:
        # Sync as often as possible: kills then land between data, sync
        # and mark, which is what this test is about.
        served = serve(image_path, "--chunk-size", "4K",
                       "--sync-interval", "0",
                       cache_dir=cache_dir)
        uri = export_uri(served)
        marks, _, _ = cache_files(cache_dir)
        missing = [i for i in range(chunks)
                   if i >= len(marks) or marks[i] != 1]
        rng.shuffle(missing)
        errors, stop = [], threading.Event()
        readers = []
        for n in range(READERS):
            part = missing[n::READERS]
            t = threading.Thread(
                target=cold_reader,
                args=(uri, image, part, random.Random(rng.random()),
                      errors, stop),
                daemon=True)
            t.start()
            readers.append(t)
        time.sleep(delay)
        assert served.proc.poll() is None, served.stderr()[-3000:]
        served.stop(signal.SIGKILL)
        assert served.proc.returncode == -signal.SIGKILL
        stop.set()
        for t in readers:
            t.join(10)
            assert not t.is_alive(), "a reader hangs on a killed server"
        assert not errors, f"wrong data served at {errors[:5]}"
        assert "Traceback" not in served.stderr(), served.stderr()[-3000:]
        present = check_cache_invariant(cache_dir, image)
        history.append((delay, present))
        # A restart never loses what earlier processes stored for good.
        if len(history) > 1:
            assert present >= history[-2][1], history
    assert history[-1][1] > 0, f"nothing was ever cached: {history}"
    # Most kills must hit a cache that still had chunks to fetch, or they
    # test nothing.
    cold = sum(1 for _, present in history if present < chunks)
    assert cold >= len(history) // 2, history

    # The check above can fail: one wrong byte in a marked chunk.
    marks, data_path, _ = cache_files(cache_dir)
    victim = marks.index(1) * CHUNK
    with open(data_path, "r+b") as f:
        f.seek(victim)
        f.write(bytes([image[victim] ^ 0xFF]))
    with pytest.raises(AssertionError, match="without their data"):
        check_cache_invariant(cache_dir, image)
    with open(data_path, "r+b") as f:
        f.seek(victim)
        f.write(image[victim:victim + 1])

    # A last, clean run: the whole export equals the image.
    served = serve(image_path, "--chunk-size", "4K", cache_dir=cache_dir)
    out = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", export_uri(served), str(out)], check=True,
                   timeout=60)
    with open(out, "rb") as f:
        copied = f.read()
    assert len(copied) == size
    assert hashlib.sha256(copied).digest() == \
        hashlib.sha256(image).digest()
    assert served.stop() == 0
    assert check_cache_invariant(cache_dir, image) == chunks
    stats = served.stats()
    # The clean run fetched only what the killed ones had not stored.
    assert stats["cache"]["chunks_fetched"] == chunks - history[-1][1]
    os.unlink(out)


def snapshot_uri(served, name="vm1"):
    return served.uri(name)


def test_snapshot_flushed_data_survives_sigkill(tmp_path, serve):
    size = 8 * MiB
    image_path = make_image(tmp_path / "image.raw", size, seed=7)
    with open(image_path, "rb") as f:
        image = f.read()
    cache_dir = str(tmp_path / "cache")
    rng = random.Random(99)

    served = serve(image_path, "--snapshot", "vm1", cache_dir=cache_dir)
    h = connect(snapshot_uri(served))
    flushed = {
        0: rng.randbytes(BLOCK),                # aligned block
        5 * BLOCK + 100: rng.randbytes(50),     # tiny, inside a block
        9 * BLOCK - 7: rng.randbytes(3 * BLOCK),  # straddling blocks
        size - 1000: rng.randbytes(1000),       # the device end
    }
    for offset, data in flushed.items():
        h.pwrite(data, offset)
    h.flush()
    # A FUA write is durable without a flush.
    assert h.can_fua()
    fua = {40 * BLOCK + 3: rng.randbytes(5000)}
    for offset, data in fua.items():
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
    # Written, acknowledged, never flushed: an overwrite of a flushed
    # block and blocks the VM never wrote before.
    unflushed = {
        0: rng.randbytes(BLOCK),
        20 * BLOCK: rng.randbytes(4 * BLOCK),
        30 * BLOCK + 11: rng.randbytes(77),
    }
    expected_old = bytearray(image)
    for offset, data in {**flushed, **fua}.items():
        expected_old[offset:offset + len(data)] = data
    expected_new = bytearray(expected_old)
    for offset, data in unflushed.items():
        h.pwrite(data, offset)
        expected_new[offset:offset + len(data)] = data
    served.stop(signal.SIGKILL)
    assert served.proc.returncode == -signal.SIGKILL

    served = serve(image_path, "--snapshot", "vm1", cache_dir=cache_dir)
    h = connect(snapshot_uri(served))
    got = h.pread(size, 0)
    h.shutdown()
    # Flushed and FUA data is there, exactly.
    for offset, data in {**flushed, **fua}.items():
        if offset != 0:         # block 0 was overwritten since
            ok = got[offset:offset + len(data)] == data
            assert ok, f"flushed data at {offset} is lost"
    # Every block is the old or the new content; nothing else changed.
    seen = {"old": 0, "new": 0}
    for b in range(size // BLOCK):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        old, new = expected_old[lo:hi], expected_new[lo:hi]
        value = got[lo:hi]
        ok = value in (old, new)
        assert ok, f"block {b} is neither old nor new"
        if old != new:
            seen["old" if value == old else "new"] += 1
    assert sum(seen.values()) == 1 + 4 + 1
    # The image and the shared cache were not written.
    with open(image_path, "rb") as f:
        assert f.read() == image
    served.stop()


def snapshot_writer(uri, region, rng, history, durable, stop, failures):
    """Write and flush blocks [lo, hi) in a loop; record their states.

    history[b] lists the values block b held, oldest first; a value is
    added before its write is sent (the write may land though its reply
    never arrives). durable[b] is the index of the value a completed
    flush made durable.
    """
    try:
        h = connect(uri)
    except nbd.Error as exc:
        failures.append(repr(exc))
        return
    model = {}
    start, end = region[0] * BLOCK, region[1] * BLOCK
    try:
        while not stop.is_set():
            for _ in range(rng.randint(1, 8)):
                if rng.random() < 0.5:
                    first = rng.randrange(*region)
                    offset, length = first * BLOCK, BLOCK * rng.randint(1, 4)
                else:
                    offset = rng.randrange(start, end)
                    length = rng.randint(1, 2 * BLOCK)
                length = min(length, end - offset)
                data = rng.randbytes(length)
                for b in range(offset // BLOCK,
                               (offset + length - 1) // BLOCK + 1):
                    lo = b * BLOCK
                    cur = bytearray(model.get(b, history[b][-1]))
                    s, e = max(offset, lo), min(offset + length, lo + BLOCK)
                    cur[s - lo:e - lo] = data[s - offset:e - offset]
                    model[b] = bytes(cur)
                    history[b].append(model[b])
                h.pwrite(data, offset)
            mark = {b: len(history[b]) - 1 for b in model}
            h.flush()
            for b, index in mark.items():
                durable[b] = index
    except nbd.Error:
        return                      # the server was killed
    finally:
        try:
            h.close()
        except Exception:
            pass


def test_snapshot_sigkill_while_writing_keeps_old_or_new(tmp_path, serve):
    size = 4 * MiB
    image_path = make_image(tmp_path / "image.raw", size, seed=8)
    with open(image_path, "rb") as f:
        image = f.read()
    cache_dir = str(tmp_path / "cache")
    rng = random.Random(2024)
    blocks = size // BLOCK
    history = {b: [image[b * BLOCK:(b + 1) * BLOCK]] for b in range(blocks)}
    durable = {b: 0 for b in range(blocks)}
    writes = 0
    writers = 4
    per = blocks // writers
    for delay in (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0):
        served = serve(image_path, "--snapshot", "vm1", cache_dir=cache_dir)
        stop, failures = threading.Event(), []
        threads = [threading.Thread(
            target=snapshot_writer,
            args=(snapshot_uri(served), (n * per, (n + 1) * per),
                  random.Random(rng.random()), history, durable, stop,
                  failures),
            daemon=True) for n in range(writers)]
        for t in threads:
            t.start()
        time.sleep(delay)
        served.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert not failures, failures

        served = serve(image_path, "--snapshot", "vm1", cache_dir=cache_dir)
        h = connect(snapshot_uri(served))
        got = h.pread(size, 0)
        h.shutdown()
        served.stop()
        for b in range(blocks):
            value = got[b * BLOCK:(b + 1) * BLOCK]
            ok = value in history[b]
            assert ok, (f"after a kill at {delay}s block {b} holds data it "
                        f"never had (zeros: {not any(value)})")
            newest = max(k for k, v in enumerate(history[b]) if v == value)
            assert newest >= durable[b], \
                f"after a kill at {delay}s block {b} lost a flushed write"
            # What survived is now the block's one and only state.
            history[b] = [value]
            durable[b] = 0
        writes += sum(1 for b in range(blocks) if got[b * BLOCK:
                                                      (b + 1) * BLOCK]
                      != image[b * BLOCK:(b + 1) * BLOCK])
    assert writes > 0, "no write ever survived a kill"
