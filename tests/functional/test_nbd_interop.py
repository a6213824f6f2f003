"""`vmthunder serve` against the real NBD clients: qemu-img, qemu-io,
nbdinfo and nbdcopy.

Every test serves a pseudo-random image with a sparse tail and checks
what the clients see against the source file, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.functional.conftest import REPO, make_image, need
from tests.waiting import wait_until

MiB = 1024 * 1024
SIZE = 32 * MiB
HOLE_AT = 20 * MiB            # data before, a hole after
CHUNK = 256 * 1024
EXPORT = "img"
TIMEOUT = 60
pytestmark = pytest.mark.timeout(120)


# -- helpers --------------------------------------------------------------

def run(argv, *, check=True, timeout=TIMEOUT, text=True):
    proc = subprocess.run(argv, capture_output=True, text=text,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return proc


def qemu_io(uri, *commands, read_only=False, check=True):
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for cmd in commands:
        argv += ["-c", cmd]
    proc = run(argv + [uri], check=check)
    if check:
        # qemu-io reports some failures only in its output.
        assert "failed" not in proc.stdout.lower(), proc.stdout
        assert "error" not in (proc.stdout + proc.stderr).lower(), (
            proc.stdout + proc.stderr)
    return proc


def parse_read_v(output: str) -> bytes:
    """The bytes of a `qemu-io -c 'read -v ...'` hex dump."""
    data = bytearray()
    for line in output.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})", line)
        if m:
            data += bytes.fromhex(m.group(1))
    return bytes(data)


def export_bytes(uri) -> bytes:
    """The whole export, copied with nbdcopy."""
    proc = run(["nbdcopy", uri, "-"], text=False)
    return proc.stdout


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def nbdinfo_map(uri, context="base:allocation"):
    out = run(["nbdinfo", "--json", f"--map={context}", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def cached_chunks(uri) -> set:
    """Chunk indices vmthunder:cache reports as held (flag 1)."""
    extents = nbdinfo_map(uri, "vmthunder:cache")
    assert sum(length for _, length, _ in extents) == SIZE
    chunks = set()
    for offset, length, flags in extents:
        assert flags in (0, 1), extents
        # Cache state changes only at chunk boundaries.
        assert offset % CHUNK == 0, extents
        assert length % CHUNK == 0 or offset + length == SIZE, extents
        if flags & 1:
            chunks.update(range(offset // CHUNK,
                                (offset + length + CHUNK - 1) // CHUNK))
    return chunks


def chunks_of(ranges) -> set:
    return {i for offset, length in ranges
            for i in range(offset // CHUNK, (offset + length - 1) // CHUNK
                           + 1)}


def live_stats(served) -> dict:
    """The stats file of a running server; {} before its first write."""
    try:
        return served.stats()
    except FileNotFoundError:
        return {}


def vmthunder(*args):
    return subprocess.run([sys.executable, "-m", "vmthunder.cli", *args],
                          capture_output=True, text=True, cwd=REPO,
                          timeout=TIMEOUT)


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "img.raw", SIZE, seed=11, hole_at=HOLE_AT)


@pytest.fixture
def short_dir():
    # unix socket paths are limited to 107 bytes; tmp_path can be long.
    path = tempfile.mkdtemp(prefix="vmt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(serve, image, *args, **kw):
    return serve(image, "--export", EXPORT, "--chunk-size", str(CHUNK),
                 *args, **kw)


# -- 1. qemu-img info -----------------------------------------------------

def test_qemu_img_info_reports_size_and_raw_format(serve, image):
    need("qemu-img")
    served = start(serve, image, "--snapshot", "vm1")
    for export in (EXPORT, "vm1"):
        out = run(["qemu-img", "info", "--output=json",
                   served.uri(export)]).stdout
        info = json.loads(out)
        assert info["virtual-size"] == SIZE, info
        assert info["format"] == "raw", info
    text = run(["qemu-img", "info", served.uri(EXPORT)]).stdout
    assert f"virtual size: 32 MiB ({SIZE} bytes)" in text, text
    assert "file format: raw" in text, text


# -- 2. qemu-img compare --------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_img_compare_exports_equal_source(serve, image, short_dir,
                                               transport):
    need("qemu-img")
    listen = ("tcp:127.0.0.1:0" if transport == "tcp"
              else f"unix:{os.path.join(short_dir, 'nbd.sock')}")
    served = start(serve, image, "--snapshot", "vm1", listen=listen)
    if transport == "unix":
        assert served.uri(EXPORT).startswith("nbd+unix://")
    for export in (EXPORT, "vm1", EXPORT):      # cold cache, then warm
        proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                    served.uri(export), image], check=False)
        assert proc.returncode == 0, (export, proc.stdout, proc.stderr)
        assert "Images are identical" in proc.stdout
    # The comparison does look at the data: one changed byte is found.
    changed = os.path.join(short_dir, "changed.raw")
    shutil.copyfile(image, changed)
    with open(changed, "r+b") as f:
        f.seek(HOLE_AT - 1)
        byte = f.read(1)
        f.seek(HOLE_AT - 1)
        f.write(bytes([byte[0] ^ 1]))
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                served.uri(EXPORT), changed], check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    # (qemu-img reports the 512-byte sector the difference is in)
    assert f"offset {(HOLE_AT - 1) // 512 * 512}!" in proc.stdout


# -- 3. writes through a snapshot -----------------------------------------

def test_qemu_io_writes_through_snapshot(serve, image):
    need("qemu-io", "qemu-img", "nbdcopy")
    source_sha = sha256_file(image)
    source = read_file(image)
    served = start(serve, image, "--snapshot", "vm1", "--snapshot", "vm2")
    vm1 = served.uri("vm1")

    expected = bytearray(source)
    commands = []
    checks = []

    def write(offset, length, pattern, check=True):
        commands.append(f"write -P {pattern:#x} {offset} {length}")
        expected[offset:offset + length] = bytes([pattern]) * length
        if check:
            checks.append(f"read -P {pattern:#x} {offset} {length}")

    write(1000, 5000, 0xab, check=False)         # unaligned, in chunk 0
    checks += ["read -P 0xab 1000 1000", "read -P 0xab 2100 3900"]
    write(MiB, MiB, 0xcd)                        # aligned 1 MiB
    write(HOLE_AT - 7000, 13001, 0x11)           # across data | hole
    write(3 * CHUNK - 100, 300, 0x22)            # across two chunks
    write(SIZE - 3, 3, 0x5a)                     # the very last bytes
    write(2000, 100, 0xee)                       # over an earlier write
    commands.append("write -z 3000000 100000")   # write zeroes, unaligned
    expected[3000000:3100000] = bytes(100000)
    checks.append("read -P 0 3000000 100000")
    # Discard: a trimmed range reads as the image again (snapshot.py:
    # the VM's own blocks are forgotten).
    discard_at = 5 * MiB
    commands.append(f"write -P 0x77 {discard_at} {MiB}")
    commands.append(f"discard {discard_at} {MiB}")
    commands.append("flush")
    out = qemu_io(vm1, *commands).stdout
    assert out.count("wrote ") == 8, out
    assert "discard 1048576/1048576 bytes" in out, out

    # Read back in a new process: what the server holds, not qemu's.
    qemu_io(vm1, *checks)
    dump = parse_read_v(qemu_io(vm1, "read -v 990 32").stdout)
    assert dump == bytes(expected[990:1022])
    assert dump[:10] == source[990:1000] and dump[10:] == b"\xab" * 22
    dump = parse_read_v(qemu_io(vm1, f"read -v {SIZE - 16} 16").stdout)
    assert dump == source[SIZE - 16:SIZE - 3] + b"\x5a" * 3
    # A pattern that was not written is not there (the check can fail).
    proc = qemu_io(vm1, "read -P 0xab 1000 5001", check=False)
    assert "Pattern verification failed" in proc.stdout

    # The whole export, byte for byte.
    got = export_bytes(vm1)
    assert len(got) == SIZE
    assert got[discard_at:discard_at + MiB] == \
        source[discard_at:discard_at + MiB], "discarded range"
    expected[discard_at:discard_at + MiB] = source[discard_at:
                                                  discard_at + MiB]
    if got != bytes(expected):
        first = next(i for i in range(SIZE) if got[i] != expected[i])
        pytest.fail(f"vm1 differs from the expected content at {first}")

    # Nothing below the snapshot changed.
    assert sha256_file(image) == source_sha
    for export in (EXPORT, "vm2"):
        proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                    served.uri(export), image], check=False)
        assert proc.returncode == 0, (export, proc.stdout)
    proc = qemu_io(served.uri("vm2"), "read -P 0xab 1000 5000",
                   check=False)
    assert "Pattern verification failed" in proc.stdout
    # The read-only cache export refuses writes.
    proc = qemu_io(served.uri(EXPORT), "write -P 0x1 0 512", check=False)
    assert proc.returncode != 0
    assert sha256_file(image) == source_sha

    assert served.stop() == 0
    stats = served.stats()
    assert stats["snapshots"]["vm1"]["bytes_written"] > 0
    assert stats["snapshots"]["vm2"]["blocks_written"] == 0
    assert stats["snapshots"]["vm2"]["bytes_written"] == 0


# -- 4. snapshot persistence ----------------------------------------------

def test_snapshot_persists_across_restart_until_deleted(serve, image,
                                                        tmp_path):
    need("qemu-io", "qemu-img")
    cache_dir = str(tmp_path / "cache")
    offset, length = 3 * 4096 + 17, 70000
    served = start(serve, image, "--snapshot", "vm1", cache_dir=cache_dir)
    qemu_io(served.uri("vm1"), f"write -P 0x42 {offset} {length}",
            f"write -P 0x43 {SIZE - 4096} 4096", "flush")
    assert served.stop(signal.SIGTERM) == 0
    assert "vmthunder: stopped" in served.stderr()

    served = start(serve, image, "--snapshot", "vm1", cache_dir=cache_dir)
    qemu_io(served.uri("vm1"), f"read -P 0x42 {offset} {length}",
            f"read -P 0x43 {SIZE - 4096} 4096")
    dump = parse_read_v(qemu_io(served.uri("vm1"),
                                f"read -v {offset - 8} 16").stdout)
    assert dump == read_file(image)[offset - 8:offset] + b"\x42" * 8
    # The cache export never had the write.
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                served.uri(EXPORT), image], check=False)
    assert proc.returncode == 0, proc.stdout
    assert served.stop() == 0

    proc = vmthunder("snapshot-delete", image, "vm1", "--cache-dir",
                     cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "deleted snapshot 'vm1'" in proc.stdout
    # Twice: nothing left to delete, and it says so.
    proc = vmthunder("snapshot-delete", image, "vm1", "--cache-dir",
                     cache_dir)
    assert proc.returncode == 1
    assert "no snapshot 'vm1'" in proc.stderr

    served = start(serve, image, "--snapshot", "vm1", cache_dir=cache_dir)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                served.uri("vm1"), image], check=False)
    assert proc.returncode == 0, proc.stdout
    proc = qemu_io(served.uri("vm1"), f"read -P 0x42 {offset} {length}",
                   check=False)
    assert "Pattern verification failed" in proc.stdout


# -- 5. nbdinfo: list, base:allocation, vmthunder:cache -------------------

def test_nbdinfo_list_shows_all_exports(serve, image):
    need("nbdinfo")
    served = start(serve, image, "--snapshot", "vm1", "--snapshot", "vm2")
    out = run(["nbdinfo", "--json", "--list", served.uri(EXPORT)]).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(exports) == {EXPORT, "vm1", "vm2"}
    for name, e in exports.items():
        assert e["export-size"] == SIZE, e
        assert "base:allocation" in e["contexts"]
        assert e["is_read_only"] is (name == EXPORT), e
        assert e["can_trim"] is (name != EXPORT), e
    assert "vmthunder:cache" in exports[EXPORT]["contexts"]
    assert exports[EXPORT]["description"] == f"cache of {image}"
    assert exports["vm2"]["description"] == f"VM vm2 on {image}"
    text = run(["nbdinfo", "--list", served.uri(EXPORT)]).stdout
    for name in (EXPORT, "vm1", "vm2"):
        assert f'export="{name}":' in text


def test_nbdinfo_map_shows_data_and_sparse_tail(serve, image):
    need("nbdinfo")
    served = start(serve, image, "--snapshot", "vm1")
    for export in (EXPORT, "vm1"):
        assert nbdinfo_map(served.uri(export)) == [
            (0, HOLE_AT, 0), (HOLE_AT, SIZE - HOLE_AT, 3)], export
    text = run(["nbdinfo", "--map", served.uri(EXPORT)]).stdout
    assert re.search(rf"^\s*0\s+{HOLE_AT}\s+0\s+data$", text, re.M), text
    assert re.search(rf"^\s*{HOLE_AT}\s+{SIZE - HOLE_AT}\s+3\s+hole,zero$",
                     text, re.M), text


def test_nbdinfo_cache_map_shows_exactly_the_chunks_read(serve, image):
    need("nbdinfo", "qemu-io")
    served = start(serve, image)
    uri = served.uri(EXPORT)
    assert nbdinfo_map(uri, "vmthunder:cache") == [(0, SIZE, 0)]
    assert cached_chunks(uri) == set()

    ranges = [(100, 10),                      # chunk 0
              (3 * CHUNK - 10, 20),           # chunks 2 and 3
              (10 * MiB + 1, MiB),            # five chunks, unaligned
              (HOLE_AT + CHUNK, 4096),        # in the sparse tail
              (SIZE - 1, 1)]                  # the last chunk
    want = chunks_of(ranges)
    assert len(want) == 1 + 2 + 5 + 1 + 1
    qemu_io(uri, *(f"read {o} {n}" for o, n in ranges), read_only=True)
    # A chunk is marked once its data is durable, just after the read.
    wait_until(lambda: cached_chunks(uri) == want,
               f"the cache map to show chunks {sorted(want)}")
    assert cached_chunks(uri) == want
    # base:allocation is not affected by what is cached.
    assert nbdinfo_map(uri) == [(0, HOLE_AT, 0), (HOLE_AT, SIZE - HOLE_AT,
                                                  3)]
    # The stats file (rewritten every second) agrees.
    wait_until(lambda: live_stats(served).get("cache", {}).get(
        "chunks_present") == len(want), "the stats file to catch up")
    assert served.stop() == 0
    cache = served.stats()["cache"]
    assert cache["chunk_size"] == CHUNK
    assert cache["chunks"] == SIZE // CHUNK
    assert cache["chunks_present"] == len(want)
    assert cache["chunks_fetched"] == len(want)
    assert cache["bytes_fetched"] == len(want) * CHUNK
    assert served.stats()["source"]["bytes_read"] == len(want) * CHUNK

    # After a restart on the same cache the map is the same.
    served = start(serve, image, cache_dir=served.cache_dir)
    assert cached_chunks(served.uri(EXPORT)) == want


# -- 6. nbdcopy -----------------------------------------------------------

def test_nbdcopy_whole_export_matches_source(serve, image, tmp_path):
    need("nbdcopy")
    served = start(serve, image, "--snapshot", "vm1")
    want = sha256_file(image)
    # Cold, to stdout.
    assert hashlib.sha256(export_bytes(served.uri(EXPORT))).hexdigest() \
        == want
    # Warm, to a file, over several connections (multi-conn).
    out = tmp_path / "copy.raw"
    run(["nbdcopy", "--connections=4", served.uri(EXPORT), str(out)])
    assert os.path.getsize(out) == SIZE
    assert sha256_file(out) == want
    # The snapshot export, never written, is the image too.
    assert hashlib.sha256(export_bytes(served.uri("vm1"))).hexdigest() \
        == want


# -- 7. many clients at once ----------------------------------------------

def test_concurrent_clients_fetch_each_chunk_once(serve, image, tmp_path):
    need("nbdcopy", "qemu-img")
    served = start(serve, image)
    uri = served.uri(EXPORT)
    want = sha256_file(image)
    procs = []
    for i in range(8):
        if i % 2:
            argv = ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri,
                    image]
        else:
            argv = ["nbdcopy", "--connections=2", uri,
                    str(tmp_path / f"copy{i}.raw")]
        procs.append((argv, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)))
    for argv, proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, (argv, out)
    for i in range(0, 8, 2):
        assert sha256_file(tmp_path / f"copy{i}.raw") == want, i

    assert served.stop() == 0
    stats = served.stats()
    cache = stats["cache"]
    chunks = SIZE // CHUNK
    assert cache["chunks"] == chunks
    assert cache["fetch_errors"] == 0 and cache["store_errors"] == 0
    # Every data chunk was needed; a chunk is fetched at most once however
    # many clients wanted it at the same time.
    assert HOLE_AT // CHUNK <= cache["chunks_fetched"] <= chunks, cache
    assert cache["chunks_fetched"] == cache["chunks_present"], cache
    assert cache["bytes_fetched"] == cache["chunks_fetched"] * CHUNK
    assert stats["source"]["bytes_read"] == cache["bytes_fetched"]
    # 8 clients read far more than the source gave.
    assert cache["bytes_read"] >= 4 * HOLE_AT, cache
