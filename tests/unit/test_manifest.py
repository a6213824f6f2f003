"""The chunk manifest: digests, verification, both formats, lazy loading."""

import asyncio
import errno
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


@pytest.mark.parametrize("algorithm", sorted(mf.HASHES))
def test_verify_run_agrees_with_verify(tmp_path, algorithm):
    """verify_run over consecutive chunks finds exactly the chunks that
    verify() refuses, with its messages, in every case verify() has."""
    data = random.Random(9).randbytes(CS * 20 + 123)      # short last
    m = mf.build_manifest(make(tmp_path, data), "img", CS,
                          algorithm=algorithm)

    def by_verify(first, piece):
        failed = {}
        for pos in range(0, len(piece), CS):
            try:
                m.verify(first + pos // CS, piece[pos:pos + CS])
            except mf.ChunkMismatch as exc:
                failed[first + pos // CS] = str(exc)
        return failed

    def check(first, piece):
        got = {i: str(e) for i, e in m.verify_run(first, piece).items()}
        assert got == by_verify(first, piece), (first, len(piece))
        return got

    assert check(0, data) == {}
    assert check(5, bytearray(data[5 * CS:12 * CS])) == {}
    assert check(17, memoryview(data)[17 * CS:]) == {}      # the tail
    assert m.verify_run(3, b"") == {}
    bad = bytearray(data)
    bad[6 * CS + 1] ^= 1
    bad[20 * CS] ^= 1                                       # the last one
    assert set(check(0, bad)) == {6, 20}
    assert set(check(6, bad[6 * CS:8 * CS])) == {6}
    check(18, data[18 * CS:20 * CS + 5])           # wrong length at the end
    check(19, data[19 * CS:21 * CS])               # past the end
    check(-1, data[:2 * CS])

    # A lazy manifest: digests not loaded are refused, never trusted.
    lazy = lazy_of(m, [])
    refused = lazy.verify_run(0, data[:2 * CS])
    assert set(refused) == {0, 1}
    assert all("not loaded" in str(e) for e in refused.values())
    asyncio.run(lazy.load(0, 4))
    assert lazy.verify_run(0, data[:4 * CS]) == {}


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


def lazy_of(m, calls, fail=None, table=None):
    """A lazy copy of manifest ``m`` whose table reads are recorded;
    ``table`` (a bytearray, changed at will) is what they return instead
    of the true table (a damaged origin)."""
    raw = m.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    if table is None:
        table = raw[head["table_offset"]:]
    pages = raw[head["pages_offset"]:head["pages_offset"]
                + head["pages_bytes"]]

    async def fetch(offset, length):
        calls.append((offset, length))
        await asyncio.sleep(0.01)
        if fail is not None and fail(offset):
            raise mf.blockdev.BlockError(5, "LUN gone")
        return bytes(table[offset:offset + length])
    return mf.Manifest.lazy(head, pages, fetch, where="test LUN")


def test_lazy_manifest_loads_only_what_is_asked_once(tmp_path):
    chunks = 1300                    # 20800 bytes of table: 6 pages
    data = random.Random(3).randbytes(chunks * CS)
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    calls = []
    m = lazy_of(full, calls)
    assert m.identity() == full.identity() and m == full
    assert m.lazy_loading and not m.loaded(0)
    # Unloaded: refused, never trusted.
    with pytest.raises(mf.ChunkMismatch, match="not loaded"):
        m.verify(0, data[:CS])
    page = mf.PAGE_SIZE

    async def main():
        # Concurrent loads of overlapping ranges: whole pages (each
        # checked against its page digest), each read once, consecutive
        # missing pages in one read.
        await asyncio.gather(m.load(0, 300), m.load(200, 520),
                             m.load(0, 5))
        assert calls == [(0, 2 * page), (2 * page, page)]
        before = len(calls)
        await m.load(3, 700)
        assert len(calls) == before
        await m.load(1290, 4000)                 # clipped to the table
        assert calls[-1] == (5 * page, chunks * mf.DIGEST_SIZE - 5 * page)
    asyncio.run(main())
    for i in list(range(0, 768)) + list(range(1280, 1300)):
        m.verify(i, data[i * CS:(i + 1) * CS])
    assert not m.loaded(800)
    assert m.table_bytes_loaded == sum(n for _, n in calls)


def test_lazy_manifest_load_failure_is_an_io_error(tmp_path):
    data = b"q" * (CS * 600)                 # 3 pages of table
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    calls = []
    m = lazy_of(full, calls, fail=lambda offset: offset == 0)

    async def main():
        with pytest.raises(mf.blockdev.BlockError, match="LUN gone"):
            await m.load(0, 3)
        # Not remembered as loaded; another page still loads.
        assert not m.loaded(0)
        await m.load(400, 401)
        assert m.loaded(400) and not m.loaded(0)
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


def forged(data, index, tmp_path):
    """(manifest of ``data``, the chunk ``index`` forged, the table with
    that chunk's entry replaced by the forged chunk's digest: header and
    page digests untouched)."""
    full = mf.build_manifest(make(tmp_path, data), "img", CS)
    raw = full.to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    chunk = bytearray(data[index * CS:(index + 1) * CS])
    chunk[17] ^= 0xFF
    table = bytearray(raw[head["table_offset"]:])
    ds = full.digest_size
    table[index * ds:(index + 1) * ds] = full._hash(bytes(chunk))
    return full, bytes(chunk), table


@pytest.mark.parametrize("path", ["table", "from_origin", "table_cache"])
def test_forged_table_entry_is_caught_by_its_page_digest(tmp_path, path):
    """A chunk *and* its entry in the table both replaced (header and
    page digests untouched): the table's page does not match its page
    digest, so the load fails (EIO, naming image and page), nothing is
    marked loaded, and the forged chunk is never accepted; the same
    straight from the origin (from_origin) and through a table cache. The
    repaired table loads."""
    chunks = 1000                       # 4 pages of table
    data = random.Random(9).randbytes(chunks * CS)
    bad = 300                           # on page 1
    full, chunk, table = forged(data, bad, tmp_path)
    right = full.to_bytes()[-full.table_bytes:]
    calls = []
    # The damaged side: the origin, or (table_cache) the cache in front.
    m = lazy_of(full, calls, table=table if path != "table_cache" else None)
    if path == "table_cache":
        async def cache_read(offset, length):
            return bytes(table[offset:offset + length])
        m.read_table_through(cache_read)
    elif path == "from_origin":
        async def cache_read(offset, length):     # honest, never asked
            raise AssertionError("from_origin read the table cache")
        m.read_table_through(cache_read)

    async def load(first, last):
        await m.load(first, last, from_origin=path == "from_origin")

    async def main():
        with pytest.raises(mf.blockdev.BlockError) as info:
            await load(bad, bad + 1)
            m.verify(bad, chunk)               # the forgery, accepted
        assert info.value.errno == errno.EIO
        assert isinstance(info.value, mf.ChunkMismatch)
        message = str(info.value)
        assert "'img'" in message and "page 1" in message, message
        assert "damaged" in message, message
        # Nothing marked loaded: neither chunk checks.
        assert not any(m.loaded(i) for i in range(chunks))
        assert m.table_bytes_loaded == 0
        for piece in (chunk, data[bad * CS:(bad + 1) * CS]):
            with pytest.raises(mf.ChunkMismatch, match="not loaded"):
                m.verify(bad, piece)
        # Still refused when asked again (nothing remembered) and when
        # asked with the pages around it.
        with pytest.raises(mf.ChunkMismatch, match="page 1"):
            await load(0, chunks)
        assert not m.loaded(bad)
        # Other pages load and check.
        await load(0, 10)
        m.verify(5, data[5 * CS:6 * CS])
        # Repaired: the right digest, the forgery refused.
        table[:] = right
        await load(bad, bad + 1)
        m.verify(bad, data[bad * CS:(bad + 1) * CS])
        with pytest.raises(mf.ChunkMismatch, match="does not match"):
            m.verify(bad, chunk)
    asyncio.run(main())
