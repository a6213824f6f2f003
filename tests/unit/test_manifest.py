"""The chunk manifest: digests, verification, both formats, lazy loading."""

import asyncio
import random

import pytest

from vmthunder.volume import manifest as mf

CS = 4096


def make(tmp_path, data: bytes) -> str:
    path = tmp_path / "img"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("algorithm", sorted(mf.HASHES))
def test_round_trip_and_verify(tmp_path, algorithm):
    data = bytes(range(256)) * 40 + b"tail"           # 10244: short last
    m = mf.build_manifest(make(tmp_path, data), "img", CS,
                          algorithm=algorithm)
    assert (m.size, m.chunks, m.algorithm) == (len(data), 3, algorithm)
    again = mf.Manifest.from_bytes(m.to_bytes() + b"\0" * 100)
    assert again == m and again.identity() == m.identity()
    for i in range(3):
        again.verify(i, data[i * CS:(i + 1) * CS])
    bad = bytearray(data[CS:2 * CS])
    bad[7] ^= 1
    with pytest.raises(mf.ChunkMismatch, match="chunk 1 .*digest"):
        again.verify(1, bad)
    with pytest.raises(mf.ChunkMismatch, match="has 10 bytes"):
        again.verify(2, b"0123456789")
    with pytest.raises(mf.ChunkMismatch, match="not in the manifest"):
        again.verify(3, b"")


def test_algorithms_give_different_identities(tmp_path):
    if len(mf.HASHES) < 2:
        pytest.skip("blake3 is not installed")
    path = make(tmp_path, b"x" * 5000)
    a = mf.build_manifest(path, "img", CS, algorithm="sha256")
    b = mf.build_manifest(path, "img", CS, algorithm="blake3")
    assert a.identity() != b.identity()
    assert mf.ALGORITHM == "blake3"


def test_unknown_algorithm_is_refused(tmp_path):
    m = mf.build_manifest(make(tmp_path, b"x" * 5000), "img", CS)
    raw = m.to_bytes().replace(m.algorithm.encode(), b"md5")
    with pytest.raises(mf.ManifestError, match="'md5'"):
        mf.Manifest.from_bytes(raw, "LUN 2")


def test_version_2_is_binary_with_truncated_digests(tmp_path):
    data = bytes(range(256)) * 64                      # 4 chunks
    m = mf.build_manifest(make(tmp_path, data), "img", CS)
    raw = m.to_bytes()
    assert (m.version, m.digest_size) == (2, mf.DIGEST_SIZE)
    # Header, one page digest (padded to a page), the table.
    assert len(raw) == mf.HEADER_BYTES + mf.PAGE_SIZE + 4 * mf.DIGEST_SIZE
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    assert head["pages_offset"] == mf.HEADER_BYTES
    assert head["table_offset"] == mf.HEADER_BYTES + mf.PAGE_SIZE
    assert head["size"] == len(data) and head["chunk_size"] == CS
    # A damaged table or page digest is refused when read whole.
    for pos in (head["table_offset"] + 5, head["pages_offset"] + 1):
        bad = bytearray(raw)
        bad[pos] ^= 1
        with pytest.raises(mf.ManifestError, match="damaged"):
            mf.Manifest.from_bytes(bytes(bad), "LUN 2")


def test_version_1_json_is_still_read(tmp_path):
    data = b"y" * 9000
    old = mf.build_manifest(make(tmp_path, data), "img", CS, version=1)
    raw = old.to_bytes()
    assert raw.startswith(b'{"format":"vmthunder-manifest","version":1')
    again = mf.Manifest.from_bytes(raw + b"\0" * 512)
    assert (again.version, again.digest_size, again.chunks) == (1, 32, 3)
    again.verify(2, data[2 * CS:])
    with pytest.raises(mf.ChunkMismatch):
        again.verify(0, b"z" * CS)
    assert mf.parse_header(raw[:mf.HEADER_BYTES]) is None
    # Its identity is the one version 1 always had (old caches match).
    import hashlib
    h = hashlib.sha256(f"9000:{CS}:{old.algorithm}:".encode())
    for i in range(3):
        h.update(mf.HASHES[old.algorithm](
            data[i * CS:(i + 1) * CS]).hexdigest().encode())
    assert again.identity() == f"manifest:{h.hexdigest()}"


def lazy_of(m, calls, fail=None):
    """A lazy copy of manifest ``m`` whose table reads are recorded."""
    raw = m.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    table = raw[head["table_offset"]:]
    pages = raw[head["pages_offset"]:head["pages_offset"]
                + head["pages_bytes"]]

    async def fetch(offset, length):
        calls.append((offset, length))
        await asyncio.sleep(0.01)
        if fail is not None and fail(offset):
            raise mf.blockdev.BlockError(5, "LUN gone")
        return table[offset:offset + length]
    return mf.Manifest.lazy(head, pages, fetch, where="test LUN")


def test_lazy_manifest_loads_only_what_is_asked_once(tmp_path):
    chunks = 200                     # 3200 bytes of table: 7 load units
    data = random.Random(3).randbytes(chunks * CS)
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    calls = []
    m = lazy_of(full, calls)
    assert m.identity() == full.identity() and m == full
    assert m.lazy_loading and not m.loaded(0)
    # Unloaded: refused, never trusted.
    with pytest.raises(mf.ChunkMismatch, match="not loaded"):
        m.verify(0, data[:CS])

    async def main():
        # Concurrent loads of overlapping ranges: each unit read once,
        # consecutive missing units in one read.
        await asyncio.gather(m.load(0, 40), m.load(10, 70), m.load(0, 5))
        assert calls == [(0, 1024), (1024, 512)]
        before = len(calls)
        await m.load(3, 60)
        assert len(calls) == before
        await m.load(190, 400)                   # clipped to the table
        assert calls[-1] == (2560, 640)
    asyncio.run(main())
    for i in list(range(0, 64)) + list(range(190, 200)):
        m.verify(i, data[i * CS:(i + 1) * CS])
    assert not m.loaded(100)
    assert m.table_bytes_loaded == sum(n for _, n in calls)


def test_lazy_manifest_load_failure_is_an_io_error(tmp_path):
    data = b"q" * (CS * 100)
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    calls = []
    m = lazy_of(full, calls, fail=lambda offset: offset == 0)

    async def main():
        with pytest.raises(mf.blockdev.BlockError, match="LUN gone"):
            await m.load(0, 3)
        # Not remembered as loaded; another piece still loads.
        assert not m.loaded(0)
        await m.load(40, 41)
        assert m.loaded(40)
    asyncio.run(main())


def test_the_table_is_an_image_checked_by_its_page_digests(tmp_path):
    """table_manifest(): the table as an image in pages; a wrong page is
    caught like a wrong chunk. table_device() reads it from the origin."""
    chunks = 600                          # 9600 bytes: 3 pages, one short
    data = random.Random(5).randbytes(chunks * CS)
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    raw = full.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    table = raw[head["table_offset"]:]
    tm = full.table_manifest()
    assert (tm.size, tm.chunk_size, tm.chunks) == (9600, mf.PAGE_SIZE, 3)
    for i in range(3):
        tm.verify(i, table[i * mf.PAGE_SIZE:(i + 1) * mf.PAGE_SIZE])
    forged = bytearray(table[:mf.PAGE_SIZE])
    forged[100] ^= 0xff
    with pytest.raises(mf.ChunkMismatch):
        tm.verify(0, forged)
    calls = []
    lazy = lazy_of(full, calls)
    assert lazy.table_manifest() == tm
    device = lazy.table_device()
    assert device.size == 9600
    assert device.identity() != lazy.identity()

    async def main():
        assert await device.read(4000, 200) == table[4000:4200]
        # Reading through another reader (a table cache) from now on.
        lazy.read_table_through(device.read)
        await lazy.load(0, chunks)
    asyncio.run(main())
    for i in range(chunks):
        lazy.verify(i, data[i * CS:(i + 1) * CS])
