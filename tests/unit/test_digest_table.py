"""A lazily read manifest's digest table fetched through peers
(vmthunder/p2p/digest_table.py): real NBD servers on loopback, real
caches; the origin is the image file and the manifest's table bytes."""

import asyncio
import errno
import random

import pytest

from tests.unit.test_peer_volume import CS, SIZE, FakePeer, Origin, drain
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdServer
from vmthunder.p2p.digest_table import PeerDigestTable, table_name
from vmthunder.p2p.export import PeerExport
from vmthunder.p2p.volume import ImageVolume
from vmthunder.volume import manifest as mf


@pytest.fixture
def image(tmp_path):
    data = random.Random(11).randbytes(SIZE)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    raw = mf.build_manifest(str(path), "img", CS).to_bytes()
    head = mf.parse_header(raw[:mf.HEADER_BYTES])
    return str(path), data, raw, head


class TableOrigin:
    """The manifest LUN's table, counting reads; ``gone`` fails them."""

    def __init__(self, raw, head):
        self.table = raw[head["table_offset"]:]
        self.bytes = 0
        self.gone = False

    async def fetch(self, offset, length):
        if self.gone:
            raise OSError("the origin is gone")
        self.bytes += length
        return self.table[offset:offset + length]


class NamedPeers:
    """A PeerDirectory naming each export of fixed peer addresses."""

    def __init__(self, addresses=()):
        self.addresses = list(addresses)

    def peers_for(self, name):
        return [a.nbd_uri(name) for a in self.addresses]


class Host:
    """origin (+ manifest LUN) -> ImageVolume (+ PeerDigestTable) ->
    CacheLayer, both exported to peers."""

    @classmethod
    async def start(cls, tmp_path, name, image, peers):
        path, _, raw, head = image
        self = cls()
        self.table_origin = TableOrigin(raw, head)
        pages = raw[head["pages_offset"]:head["pages_offset"]
                    + head["pages_bytes"]]
        self.manifest = mf.Manifest.lazy(head, pages,
                                         self.table_origin.fetch)
        self.origin = Origin(path)
        directory = NamedPeers(peers)
        self.volume = ImageVolume(self.origin, self.manifest, "img",
                                  directory, peer_timeout=0.5)
        self.table = PeerDigestTable(self.manifest, "img", directory,
                                     str(tmp_path / name / "tables"),
                                     peer_timeout=0.5)
        self.volume.digest_table = self.table
        self.cache = CacheLayer(self.volume, str(tmp_path / name),
                                chunk_size=CS, verify=None)
        self.server = NbdServer()
        self.server.add_export("img", PeerExport(self.cache),
                               read_only=True)
        self.server.add_export(table_name("img"),
                               self.table.peer_export("held"),
                               read_only=True)
        self.address = await self.server.listen(
            Address("tcp", host="127.0.0.1"))
        return self

    async def read_all(self):
        data = await self.cache.read(0, SIZE)
        await drain(self.cache)
        # The pages kept for peers (digests loaded with origin data).
        await asyncio.gather(*self.table._keeping)
        await drain(self.table.cache)
        return data

    async def stop(self):
        await self.server.close()
        await self.cache.close()


def test_origin_gone_digests_and_data_come_from_a_peer(tmp_path, image):
    data = image[1]

    async def main():
        a = await Host.start(tmp_path, "a", image, [])
        b = None
        try:
            assert await a.read_all() == data
            table_bytes = len(a.table_origin.table)
            # Straight from the origin beside the data, and the pages kept
            # for peers.
            assert a.table_origin.bytes == 2 * table_bytes
            pages = a.table.cache.chunks
            assert a.table.cache.stats()["chunks_fetched"] == pages
            b = await Host.start(tmp_path, "b", image, [a.address])
            b.table_origin.gone = True
            b.origin.gate = asyncio.Event()       # the origin never answers
            assert await b.read_all() == data
            assert b.origin.bytes == 0 and b.table_origin.bytes == 0
            st = b.table.stats()
            assert st["bytes_from_peers"] == table_bytes
            assert b.table.cache.stats()["chunks_fetched"] == pages
            assert b.volume.stats()["bytes_from_peers"] == SIZE
        finally:
            for host in (a, b):
                if host is not None:
                    await host.stop()
    asyncio.run(main())


def test_forged_digests_from_a_peer_are_caught(tmp_path, image):
    """A peer forging a chunk *and* its digest (a table consistent with
    its data) is caught by the page digests: the chunk comes from the
    origin, right."""
    path, data, raw, head = image
    forged = bytearray(data)
    forged[5 * CS + 7] ^= 0xFF
    table = bytearray(raw[head["table_offset"]:])
    ds = head["digest_size"]
    table[5 * ds:6 * ds] = mf.HASHES[head["algorithm"]](
        bytes(forged[5 * CS:6 * CS])).digest()[:ds]

    async def main():
        liar_data = FakePeer(bytes(forged), "honest-looking")
        liar_table = FakePeer(bytes(table), "honest-looking")
        # One address serving both, as an agent would.
        both = NbdServer()
        both.add_export("img", liar_data, read_only=True)
        both.add_export(table_name("img"), liar_table, read_only=True)
        address = await both.listen(Address("tcp", host="127.0.0.1"))
        b = await Host.start(tmp_path, "b", image, [address])
        try:
            got = await b.read_all()
            assert got == data
            tst = b.table.volume.stats()
            assert tst["peer_errors"]["mismatch"] >= 1
            assert b.table_origin.bytes > 0        # the right page, there
            vst = b.volume.stats()
            assert vst["chunks_from_origin"] >= 1  # chunk 5, at least
        finally:
            await b.stop()
            await both.close()
    asyncio.run(main())


def test_forged_chunk_and_digest_on_the_origin_are_refused(tmp_path, image):
    """The origin's chunk *and* its entry in the manifest's table both
    replaced (header and page digests untouched): the table's page does
    not match its page digest, so a read of the chunk fails with EIO,
    the cache marks neither the chunk nor the table's page, and once the
    origin is repaired the read returns the right bytes."""
    path, data, raw, head = image
    bad = 70
    ds = head["digest_size"]
    chunk = bytearray(data[bad * CS:(bad + 1) * CS])
    chunk[123] ^= 0xFF
    table = bytearray(raw[head["table_offset"]:])
    table[bad * ds:(bad + 1) * ds] = mf.HASHES[head["algorithm"]](
        bytes(chunk)).digest()[:ds]
    page = bad * ds // mf.PAGE_SIZE

    def write_chunk(content):
        with open(path, "r+b") as f:
            f.seek(bad * CS)
            f.write(content)

    async def settle(host):
        # Stored, synced and marked (or not), the kept pages too.
        await asyncio.gather(*host.table._keeping, return_exceptions=True)
        for cache in (host.cache, host.table.cache):
            await drain(cache)
            if cache._syncer is not None:
                await asyncio.gather(cache._syncer, return_exceptions=True)

    async def main():
        a = await Host.start(tmp_path, "a", image, [])
        try:
            write_chunk(chunk)
            a.table_origin.table = bytes(table)
            for _ in range(2):          # refused again: nothing remembered
                with pytest.raises(mf.blockdev.BlockError) as info:
                    got = await a.cache.read((bad - 1) * CS, 3 * CS)
                    assert got[CS:2 * CS] != bytes(chunk), "forged served"
                assert info.value.errno == errno.EIO
                assert "'img'" in str(info.value)
                await settle(a)
                assert not a.cache.map.present(bad)
                assert not a.table.cache.map.present(page)
                assert not a.manifest.loaded(bad)
            # Repaired.
            write_chunk(data[bad * CS:(bad + 1) * CS])
            a.table_origin.table = raw[head["table_offset"]:]
            got = await a.cache.read((bad - 1) * CS, 3 * CS)
            assert got == data[(bad - 1) * CS:(bad + 2) * CS]
            await settle(a)
            assert a.cache.map.present(bad)
            assert a.table.cache.map.present(page)
        finally:
            await a.stop()
    asyncio.run(main())
