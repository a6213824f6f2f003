"""`vmthunder serve` with its cache on a full disk (issue 10, item 5).

Reads stay correct (chunks that cannot be stored are served from memory
and fetched again next time), writes get ENOSPC, and stopping the server
exits cleanly: the chunk map is saved (its space is reserved when the
cache opens), or, when even that is impossible, a clear error is logged
and the map left on disk is older but consistent (every chunk it marks
holds the image's bytes; a lost mark only costs a refetch).

The cache lives on a small tmpfs mounted for the test (root only) and
unmounted afterwards, pass or fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time

import pytest

from tests.functional.conftest import make_image
from tests.functional.test_agent import nbd
from vmthunder import blockdev

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
CHUNK = 256 * 1024              # [cache] chunk_size for file images
SIZE = 8 * MiB


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755",
                          "vmthunder-test", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            # Still busy (a server that did not stop): detach it anyway.
            subprocess.run(["umount", "-l", str(mnt)])


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path, leave: int = 0) -> None:
    """Write ``path`` (a new file) until only ``leave`` bytes are free."""
    fs = os.path.dirname(path)
    with open(path, "ab") as f:
        while True:
            want = free_bytes(fs) - leave
            if want <= 0:
                break
            try:
                f.write(b"\xAA" * min(want, MiB))
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    assert free_bytes(fs) == leave, (free_bytes(fs), leave)


def shrink(path, by: int) -> None:
    """Free ``by`` bytes by cutting the end of filler file ``path``."""
    os.truncate(path, os.path.getsize(path) - by)


def cache_dir_of(cache_root) -> str:
    (key,) = [k for k in os.listdir(cache_root)
              if os.path.isdir(os.path.join(cache_root, k))]
    return os.path.join(cache_root, key)


def marked(directory) -> list[int]:
    """The chunks the map on disk marks, after checking that each holds
    the image's bytes (a mark without its data must never happen)."""
    with open(os.path.join(directory, "map"), "rb") as f:
        marks = f.read()
    assert len(marks) in (0, SIZE // CHUNK), len(marks)
    assert set(marks) <= {0, 1}, set(marks)
    return [i for i, mark in enumerate(marks) if mark == 1]


def check_marked_data(directory, image: bytes) -> list[int]:
    chunks = marked(directory)
    with open(os.path.join(directory, "data"), "rb") as f:
        data = f.read()
    bad = [i for i in chunks
           if data[i * CHUNK:(i + 1) * CHUNK]
           != image[i * CHUNK:(i + 1) * CHUNK]]
    assert not bad, f"chunks marked without their data: {bad}"
    return chunks


def wait_for(check, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stored(directory, nbytes: int) -> bool:
    """The cache's data file holds at least ``nbytes`` (allocated)."""
    return os.stat(os.path.join(directory, "data")).st_blocks * 512 \
        >= nbytes


def chunks_present(served) -> int | None:
    try:
        return served.stats()["cache"]["chunks_present"]
    except FileNotFoundError:        # not written yet (once a second)
        return None


def read_all(uri: str, image: bytes) -> None:
    for off in range(0, SIZE, MiB):
        [data] = nbd(uri, ("read", off, MiB))
        assert data == image[off:off + MiB], off


def test_full_cache_disk_reads_stay_right_writes_fail_stop_saves_map(
        small_fs, serve, tmp_path):
    image_path = make_image(tmp_path / "base.raw", SIZE, seed=51)
    with open(image_path, "rb") as f:
        image = f.read()
    cache_root = str(small_fs / "cache")
    filler = str(small_fs / "filler")
    served = serve(image_path, "--snapshot", "vm1", "--sync-interval", "0.2",
                   cache_dir=cache_root)
    directory = cache_dir_of(cache_root)
    # The VM writes while there is room, and does not flush.
    written = b"\x66" * 65536
    nbd(served.uri("vm1"), ("write", 4 * MiB, written))
    # Room for the first MiB of chunks, then nothing.
    fill(filler, leave=MiB)
    [data] = nbd(served.uri("base"), ("read", 0, MiB))
    assert data == image[:MiB]
    wait_for(lambda: stored(directory, MiB), "the first chunks stored")
    assert free_bytes(small_fs) == 0

    # Full: every read is still right (served from memory), writes fail
    # with ENOSPC and change nothing.
    read_all(served.uri("base"), image)
    with pytest.raises(blockdev.BlockError) as info:
        nbd(served.uri("vm1"), ("write", 0, b"\x55" * 65536), ("flush",))
    assert info.value.errno == errno.ENOSPC, info.value
    [data] = nbd(served.uri("vm1"), ("read", 0, 2 * MiB))
    assert data == image[:2 * MiB]
    # The chunks stored before the disk filled get marked (synced).
    wait_for(lambda: chunks_present(served) == 4,
             "the stored chunks marked")

    assert served.stop() == 0, served.stderr()[-3000:]
    log = served.stderr()
    assert "Traceback" not in log, log[-3000:]
    assert "vmthunder: stopped" in log, log[-3000:]
    assert "could not store chunks" in log
    # The map's space was reserved when the cache opened: it was saved.
    assert check_marked_data(directory, image) == [0, 1, 2, 3]

    # Space again (less than the image): the cache goes on from its
    # saved map, and fills up again, harmlessly.
    os.unlink(filler)
    served = serve(image_path, "--snapshot", "vm1", cache_dir=cache_root)
    # The unflushed write is there or not (its mark may not have fitted
    # on the full disk at the stop), never anything else.
    [data] = nbd(served.uri("vm1"), ("read", 4 * MiB, len(written)))
    assert data in (written, image[4 * MiB:4 * MiB + len(written)])
    read_all(served.uri("base"), image)
    assert served.stop() == 0
    stats = served.stats()["cache"]
    assert stats["bytes_fetched"] == SIZE - MiB, stats
    held = check_marked_data(directory, image)
    assert held[:4] == [0, 1, 2, 3] and len(held) > 4, held
    assert "Traceback" not in served.stderr()


def test_map_that_cannot_be_saved_at_stop_is_an_error_not_a_crash(
        small_fs, serve, tmp_path):
    image_path = make_image(tmp_path / "base.raw", SIZE, seed=52)
    with open(image_path, "rb") as f:
        image = f.read()
    cache_root = str(small_fs / "cache")
    filler = str(small_fs / "filler")
    # The cache exists (meta.json, data), its map file does not (lost,
    # or never saved), and the disk is full when the server starts: no
    # room to reserve for the map.
    assert serve(image_path, cache_dir=cache_root).stop() == 0
    directory = cache_dir_of(cache_root)
    os.unlink(os.path.join(directory, "map"))
    fill(filler)

    served = serve(image_path, "--sync-interval", "0.2",
                   cache_dir=cache_root)
    # Room for four chunks, which fill it: their marks cannot be saved.
    shrink(filler, MiB)
    [data] = nbd(served.uri("base"), ("read", 0, MiB))
    assert data == image[:MiB]
    wait_for(lambda: chunks_present(served) == 4,
             "the stored chunks marked")
    wait_for(lambda: "could not save the chunk map" in served.stderr(),
             "a failed map save")
    read_all(served.uri("base"), image)

    assert served.stop() == 0, served.stderr()[-3000:]
    log = served.stderr()
    assert "Traceback" not in log, log[-3000:]
    assert "vmthunder: stopped" in log, log[-3000:]
    assert "ERROR" in log and "chunk map" in log and \
        "No space left on device" in log, log[-3000:]
    assert "fetched again" in log, log[-3000:]
    # Older (nothing marked), consistent.
    assert check_marked_data(directory, image) == []

    # Still full when it starts; space comes back while it runs: the
    # marks it could not save are saved then (the save is retried every
    # cache_layer.MAP_SAVE_RETRY_S), without waiting for the stop.
    served = serve(image_path, "--sync-interval", "0.2",
                   cache_dir=cache_root)
    shrink(filler, MiB)
    [data] = nbd(served.uri("base"), ("read", MiB, MiB))
    assert data == image[MiB:2 * MiB]
    wait_for(lambda: chunks_present(served) == 4,
             "the chunks marked")
    wait_for(lambda: "could not save the chunk map" in served.stderr(),
             "a failed map save")
    assert marked(directory) == []
    os.unlink(filler)
    wait_for(lambda: "chunk map saved after" in served.stderr(),
             "the map saved once there is space", timeout=20)
    assert check_marked_data(directory, image) == [4, 5, 6, 7]
    assert served.stop() == 0, served.stderr()[-3000:]
    log = served.stderr()
    assert "Traceback" not in log, log[-3000:]
    assert check_marked_data(directory, image) == [4, 5, 6, 7]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(filler)
