"""vmthunder.p2p: ImageVolume and PeerExport over real NBD servers.

Every "host" here is a real NbdServer on 127.0.0.1 (a random port)
exporting PeerExport(CacheLayer(origin)); the host under test reads
through an ImageVolume with real NbdClient connections.
"""

import asyncio
import errno
import random
import time

import pytest

from vmthunder import blockdev
from vmthunder.cache import cache_layer
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.client import open_nbd
from vmthunder.nbd.server import NbdServer
from vmthunder.p2p.export import PeerExport
from vmthunder.p2p.owners import OwnerTable, owner_of
from vmthunder.p2p.volume import ImageVolume, StaticOwners, StaticPeers
from vmthunder.volume.file_source import FileSource
from vmthunder.volume.manifest import build_manifest

from tests.waiting import until

CS = 4096
SIZE = 1024 * 1024 - 1000          # 256 chunks, the last one short


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def image(tmp_path):
    data = random.Random(7).randbytes(SIZE)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    manifest = build_manifest(str(path), "img", CS)
    return str(path), data, manifest


class Origin(blockdev.BlockDevice):
    """The image file, counting reads; ``gate`` holds reads back."""

    capabilities = blockdev.Capabilities(block_status=True)

    def __init__(self, path):
        self.inner = FileSource(path)
        self.size = self.inner.size
        self.calls = 0
        self.bytes = 0
        self.gate: asyncio.Event | None = None

    def identity(self):
        return self.inner.identity()

    async def read(self, offset, length):
        self.calls += 1
        self.bytes += length
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.read(offset, length)

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        return await self.inner.block_status(offset, length, context)

    async def close(self):
        await self.inner.close()


class FakePeer(blockdev.BlockDevice):
    """A peer export that claims to hold every chunk and misbehaves:
    ``corrupt`` (one wrong byte per read), ``hang`` (reads never end),
    ``not_held`` (reads refused), ``gate`` (reads wait for ``gate``)."""

    capabilities = blockdev.Capabilities(
        block_status=True,
        contexts=(blockdev.BASE_ALLOCATION, blockdev.VMTHUNDER_CACHE))

    def __init__(self, data, behaviour):
        self.data = data
        self.size = len(data)
        self.behaviour = behaviour
        self.reads = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def read(self, offset, length):
        self.reads += 1
        self.started.set()
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        if self.behaviour == "gate":
            await self.gate.wait()
        if self.behaviour == "not_held":
            raise blockdev.BlockError(errno.ENOTSUP, "not held")
        out = bytearray(self.data[offset:offset + length])
        if self.behaviour == "corrupt":
            out[length // 2] ^= 0xFF
        return bytes(out)

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        if context == blockdev.VMTHUNDER_CACHE:
            return [blockdev.Extent(length, blockdev.STATE_CACHED)]
        return [blockdev.Extent(length, 0)]


async def serve(device, name="img"):
    server = NbdServer()
    server.add_export(name, device, read_only=True)
    addr = await server.listen(Address("tcp", host="127.0.0.1"))
    return server, addr.nbd_uri(name)


async def drain(cache):
    while cache._store_tasks:
        await asyncio.gather(*list(cache._store_tasks),
                             return_exceptions=True)


class Host:
    """A peer host: origin -> CacheLayer -> PeerExport -> NbdServer."""

    @classmethod
    async def start(cls, tmp_path, name, image, *, mode="held",
                    source=None):
        path, _, manifest = image
        self = cls()
        self.origin = source if source is not None else Origin(path)
        self.cache = CacheLayer(
            self.origin, str(tmp_path / name), chunk_size=CS,
            verify=None if isinstance(self.origin, ImageVolume)
            else manifest.verify)
        self.export = PeerExport(self.cache, mode)
        self.server, self.uri = await serve(self.export)
        return self

    async def warm(self, first, last):
        await self.cache.read(first * CS, min(last * CS, SIZE) - first * CS)
        await drain(self.cache)

    async def stop(self):
        await self.server.close()
        await self.cache.close()


def volume(image, uris, **kw):
    path, _, manifest = image
    origin = Origin(path)
    kw.setdefault("peer_timeout", 0.5)
    return ImageVolume(origin, manifest, "img", StaticPeers(uris), **kw), \
        origin


def span(first, last):
    return first * CS, min(last * CS, SIZE) - first * CS


# -- (a) held chunks come from the peer ------------------------------------

def test_held_chunks_come_from_the_peer_not_the_origin(tmp_path, image):
    data = image[1]

    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        await peer.warm(0, 64)
        fetched = peer.cache.stats()["chunks_fetched"]
        vol, origin = volume(image, [peer.uri])
        try:
            assert await vol.read(*span(0, 64)) == data[:64 * CS]
            assert origin.calls == 0
            # Unaligned, over the held/missing border: 60-63 from the
            # peer, 64-69 from the origin.
            got = await vol.read(60 * CS + 100, 10 * CS - 200)
            assert got == data[60 * CS + 100:70 * CS - 100]
            st = vol.stats()
            assert st["chunks_from_peers"] == 68
            assert st["chunks_from_origin"] == 6
            assert origin.bytes == 6 * CS
            assert st["peers"][peer.uri]["chunks"] == 68
            assert st["peer_errors"] == dict.fromkeys(st["peer_errors"], 0)
            # Served from what it held: the peer fetched nothing more.
            assert peer.cache.stats()["chunks_fetched"] == fetched
            # One status query covered both reads (a window, cached).
            assert st["status_queries"] == 1
        finally:
            await vol.close()
            await peer.stop()
    run(main())


def test_cache_over_volume_fetches_runs_from_the_peer(tmp_path, image):
    """The real stack of a host: CacheLayer(verify=None) on ImageVolume."""
    data = image[1]

    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        await peer.warm(0, 256)
        vol, origin = volume(image, [peer.uri])
        cache = CacheLayer(vol, str(tmp_path / "me"), chunk_size=CS)
        try:
            assert await cache.read(0, SIZE) == data
            assert origin.calls == 0
            assert vol.stats()["bytes_from_peers"] == SIZE
            # Runs of chunks, one NBD read each (<= 2 MiB fetches).
            assert peer.export.stats()["reads"] < 256 // 8
        finally:
            await cache.close()        # closes the volume too
            await peer.stop()
    run(main())


def test_status_of_a_window_longer_than_one_reply(tmp_path, image,
                                                  monkeypatch):
    """A server may describe less than a block status asks (ours: at most
    BLOCK_STATUS_MAX per reply, 64 MiB; shrunk here to 16 chunks so that a
    1 MiB image spans many replies): the volume asks again from where each
    answer ends, so chunks past the first reply are known held too and
    come from the peer, not the origin (an image past 64 MiB read ~37%
    from the origin on the second host before)."""
    from vmthunder.nbd import server as server_mod
    monkeypatch.setattr(server_mod, "BLOCK_STATUS_MAX", 16 * CS)
    data = image[1]

    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        await peer.warm(0, 256)
        vol, origin = volume(image, [peer.uri])
        try:
            assert await vol.read(0, SIZE) == data
            assert origin.calls == 0
            st = vol.stats()
            assert st["bytes_from_peers"] == SIZE
            assert st["status_queries"] == 1
        finally:
            await vol.close()
            await peer.stop()
    run(main())


# -- (b) load spreads ----------------------------------------------------

def test_load_spreads_over_two_holders(tmp_path, image):
    data = image[1]

    async def main():
        a = await Host.start(tmp_path, "a", image)
        b = await Host.start(tmp_path, "b", image)
        await a.warm(0, 256)
        await b.warm(0, 256)
        vol, origin = volume(image, [a.uri, b.uri])
        try:
            # One run of 16 chunks: split between the two holders.
            assert await vol.read(*span(0, 16)) == data[:16 * CS]
            per = vol.stats()["peers"]
            assert per[a.uri]["chunks"] == 8 and per[b.uri]["chunks"] == 8
            # Many concurrent single-chunk reads: both serve a fair share.
            idx = list(range(16, 256))
            got = await asyncio.gather(*(vol.read(*span(i, i + 1))
                                         for i in idx))
            assert b"".join(got) == data[16 * CS:]
            per = vol.stats()["peers"]
            assert per[a.uri]["chunks"] + per[b.uri]["chunks"] == 256
            assert min(per[a.uri]["chunks"], per[b.uri]["chunks"]) >= 60
            assert origin.calls == 0
        finally:
            await vol.close()
            await a.stop()
            await b.stop()
    run(main())


# -- (c) a peer that does not hold a chunk ---------------------------------

def test_peer_refuses_unheld_chunk_fast_without_fetching(tmp_path, image):
    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        await peer.warm(0, 4)
        try:
            client = await open_nbd(
                peer.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE])
            t0 = time.monotonic()
            with pytest.raises(blockdev.BlockError) as err:
                await client.read(5 * CS, CS)
            assert time.monotonic() - t0 < 0.5
            assert err.value.errno == errno.ENOTSUP
            # A read spanning held and unheld chunks is refused whole.
            with pytest.raises(blockdev.BlockError):
                await client.read(3 * CS, 2 * CS)
            assert await client.read(0, 4 * CS) == image[1][:4 * CS]
            ext = await client.block_status(0, 8 * CS,
                                            blockdev.VMTHUNDER_CACHE)
            assert [(e.length, e.flags) for e in ext] == [
                (4 * CS, blockdev.STATE_CACHED), (4 * CS, 0)]
            await client.close()
            # No fetch was triggered on the peer.
            assert peer.origin.calls == 1
            assert peer.cache.chunk_states(0, 8) == [cache_layer.HELD] * 4 \
                + [cache_layer.MISSING] * 4
            assert peer.export.stats()["refused"] == 2
        finally:
            await peer.stop()
    run(main())


def test_unheld_chunks_come_from_the_origin(tmp_path, image):
    data = image[1]

    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        liar = FakePeer(data, "not_held")        # stale status, say
        liar_server, liar_uri = await serve(liar)
        vol, origin = volume(image, [peer.uri, liar_uri])
        try:
            assert await vol.read(*span(5, 9)) == data[5 * CS:9 * CS]
            st = vol.stats()
            assert st["chunks_from_origin"] == 4
            assert st["peers"][peer.uri]["chunks"] == 0
            assert peer.export.stats()["reads"] == 0      # never asked
            assert peer.origin.calls == 0                 # nothing fetched
            # The liar's "not held" costs a retry, not an avoidance.
            assert st["peer_errors"]["not_held"] == 1
            assert st["avoided"] == []
        finally:
            await vol.close()
            await liar_server.close()
            await peer.stop()
    run(main())


# -- (d) a peer sending wrong data -------------------------------------------

def test_corrupt_peer_is_detected_avoided_and_bypassed(tmp_path, image):
    data = image[1]

    async def main():
        liar = FakePeer(data, "corrupt")
        server, uri = await serve(liar)
        vol, origin = volume(image, [uri], avoid_s=60)
        try:
            assert await vol.read(*span(0, 8)) == data[:8 * CS]
            st = vol.stats()
            # One read of 8 chunks, one corrupt byte in it: that chunk
            # came from the origin, the seven good ones stayed.
            assert st["peer_errors"]["mismatch"] == 1
            assert st["chunks_from_peers"] == 7
            assert st["chunks_from_origin"] == 1
            assert st["avoided"] == [uri]
            reads = liar.reads
            # Avoided: the next reads go straight to the origin.
            assert await vol.read(*span(8, 40)) == data[8 * CS:40 * CS]
            assert liar.reads == reads
            assert vol.stats()["chunks_from_origin"] == 33
        finally:
            await vol.close()
            await server.close()
    run(main())


def test_origin_mismatch_is_retried_once_then_eio(tmp_path, image):
    path, data, manifest = image

    async def main():
        origin = Origin(path)
        vol = ImageVolume(origin, manifest, "img", StaticPeers([]))
        flips = {"n": 1}
        real = origin.inner.read

        async def flaky(offset, length):
            out = bytearray(await real(offset, length))
            if flips["n"] > 0:
                flips["n"] -= 1
                out[0] ^= 1
            return bytes(out)
        origin.inner.read = flaky
        assert await vol.read(*span(3, 5)) == data[3 * CS:5 * CS]
        assert vol.stats()["origin_mismatches"] == 1
        flips["n"] = 2
        with pytest.raises(blockdev.BlockError) as err:
            await vol.read(*span(9, 10))
        assert err.value.errno == errno.EIO
        assert "'img'" in str(err.value) and "chunk 9" in str(err.value)
        await vol.close()
    run(main())


# -- (e) a peer that hangs -----------------------------------------------

def test_peer_that_never_answers_costs_one_timeout(tmp_path, image):
    data = image[1]

    async def main():
        async def silent(reader, writer):
            # Accepts, never says a word; ends when the client hangs up.
            try:
                await reader.read()
            finally:
                writer.close()
        mute = await asyncio.start_server(silent, "127.0.0.1", 0)
        mute_uri = f"nbd://127.0.0.1:{mute.sockets[0].getsockname()[1]}/img"
        good = await Host.start(tmp_path, "good", image)
        await good.warm(0, 32)
        hung = FakePeer(data, "hang")      # handshakes, then never replies
        hung_server, hung_uri = await serve(hung)
        vol, origin = volume(image, [mute_uri, hung_uri, good.uri],
                             peer_timeout=0.5)
        try:
            t0 = time.monotonic()
            assert await vol.read(*span(0, 32)) == data[:32 * CS]
            first = time.monotonic() - t0
            # The silent one fails its status query (0.5 s); the hung one
            # answers status but not the read (0.5 s more).
            assert first < 1.6, first
            st = vol.stats()
            assert st["peer_errors"]["timeout"] >= 2
            assert set(st["avoided"]) == {mute_uri, hung_uri}
            timeouts = st["peer_errors"]["timeout"]
            assert await vol.read(*span(32, 64)) == data[32 * CS:64 * CS]
            # No timeout again (counted, not timed: a loaded machine can
            # stretch a read, never add a timeout).
            assert vol.stats()["peer_errors"]["timeout"] == timeouts
        finally:
            await vol.close()
            mute.close()
            await mute.wait_closed()
            await hung_server.close()
            await good.stop()
    run(main())


# -- (f) a peer killed mid-read ---------------------------------------------

def test_peer_closed_mid_read_falls_back(tmp_path, image):
    data = image[1]

    async def main():
        peer = FakePeer(data, "gate")
        server, uri = await serve(peer)
        vol, origin = volume(image, [uri], peer_timeout=5.0)
        try:
            t0 = time.monotonic()
            task = asyncio.ensure_future(vol.read(*span(0, 16)))
            await asyncio.wait_for(peer.started.wait(), 2)
            await server.close()          # the peer dies mid-read
            assert await task == data[:16 * CS]
            assert time.monotonic() - t0 < 1.0       # no timeout waited
            st = vol.stats()
            assert st["peer_errors"]["io"] >= 1
            assert st["chunks_from_origin"] == 16
        finally:
            await vol.close()
    run(main())


# -- (g) tree mode -----------------------------------------------------------

def test_tree_mode_reads_through_the_parent(tmp_path, image):
    path, data, manifest = image

    async def main():
        parent_origin = Origin(path)
        parent_vol = ImageVolume(parent_origin, manifest, "img",
                                 StaticPeers([]), mode="tree")
        parent = await Host.start(tmp_path, "parent", image,
                                  mode="through", source=parent_vol)
        vol, origin = volume(image, [parent.uri], mode="tree")
        try:
            assert await vol.read(*span(10, 20)) == data[10 * CS:20 * CS]
            assert origin.calls == 0
            assert parent_origin.calls == 1          # fetched through
            await drain(parent.cache)
            assert parent.cache.chunk_states(10, 20) == \
                [cache_layer.HELD] * 10
            # Again: the parent serves from its cache.
            assert await vol.read(*span(10, 20)) == data[10 * CS:20 * CS]
            assert parent_origin.calls == 1
            assert vol.stats()["chunks_from_peers"] == 20
            # The parent goes away: the origin, no error.
            await parent.server.close()
            assert await vol.read(*span(30, 40)) == data[30 * CS:40 * CS]
            st = vol.stats()
            assert st["chunks_from_origin"] == 10
            assert st["avoided"] == [parent.uri]
        finally:
            await vol.close()
            await parent.cache.close()
    run(main())


def test_tree_mode_without_parent_reads_the_origin(image):
    data = image[1]

    async def main():
        vol, origin = volume(image, [], mode="tree")
        assert await vol.read(100, 3 * CS) == data[100:100 + 3 * CS]
        assert vol.stats()["chunks_from_origin"] == 4
        await vol.close()
    run(main())


# -- (h) a chunk in flight at the peer -----------------------------------

def test_chunk_in_flight_at_peer_is_served_once_it_lands(tmp_path, image):
    data = image[1]

    async def main():
        peer = await Host.start(tmp_path, "peer", image)
        peer.origin.gate = asyncio.Event()
        fetching = asyncio.ensure_future(peer.cache.read(*span(7, 8)))
        while peer.cache.chunk_states(7, 8) != [cache_layer.FETCHING]:
            await asyncio.sleep(0.01)
        vol, origin = volume(image, [peer.uri], peer_timeout=3.0)
        try:
            client = await open_nbd(
                peer.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE])
            ext = await client.block_status(*span(7, 8),
                                            blockdev.VMTHUNDER_CACHE)
            assert ext[0].flags == (blockdev.STATE_CACHED
                                    | blockdev.STATE_FETCHING)
            await client.close()
            task = asyncio.ensure_future(vol.read(*span(7, 8)))
            await asyncio.sleep(0.2)
            assert not task.done()          # waiting at the peer
            peer.origin.gate.set()
            assert await task == data[7 * CS:8 * CS]
            assert await fetching == data[7 * CS:8 * CS]
            assert origin.calls == 0 and peer.origin.calls == 1
            assert vol.stats()["chunks_from_peers"] == 1
        finally:
            await vol.close()
            await peer.stop()
    run(main())


def test_unrooted_fetch_is_neither_offered_nor_waited_for(tmp_path, image):
    """A host fetching a chunk from another peer's in-flight fetch does
    not offer it: waits never chain, two hosts never wait for each
    other."""
    path, data, manifest = image

    async def main():
        rooted = set()

        class Source(Origin):
            def fetch_is_rooted(self, index):
                return index in rooted
        src = Source(path)
        src.gate = asyncio.Event()
        cache = CacheLayer(src, str(tmp_path / "c"), chunk_size=CS,
                           verify=manifest.verify)
        export = PeerExport(cache)
        fetching = asyncio.ensure_future(cache.read(*span(2, 4)))
        await until(lambda: cache.chunk_states(2, 4)
                    == [cache_layer.FETCHING] * 2, "chunks 2-3 in flight")
        rooted.add(3)
        ext = await export.block_status(*span(0, 4),
                                        blockdev.VMTHUNDER_CACHE)
        assert [(e.length, e.flags) for e in ext] == [
            (3 * CS, 0),
            (CS, blockdev.STATE_CACHED | blockdev.STATE_FETCHING)]
        with pytest.raises(blockdev.BlockError) as err:
            await export.read(*span(2, 3))
        assert err.value.errno == errno.ENOTSUP
        src.gate.set()
        assert await export.read(*span(3, 4)) == data[3 * CS:4 * CS]
        await fetching
        await cache.close()
    run(main())


# -- (e') a real peer process, SIGSTOPped -----------------------------------

_PEER_SCRIPT = r"""
import asyncio, sys
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdServer
from vmthunder.p2p.export import PeerExport
from vmthunder.volume.file_source import FileSource
from vmthunder.volume.manifest import build_manifest

async def main(path, cache_dir, chunk):
    manifest = build_manifest(path, "img", chunk)
    cache = CacheLayer(FileSource(path), cache_dir, chunk_size=chunk,
                       verify=manifest.verify)
    await cache.read(0, cache.size)
    server = NbdServer()
    server.add_export("img", PeerExport(cache), read_only=True)
    addr = await server.listen(Address("tcp", host="127.0.0.1"))
    print(addr.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_sigstopped_peer_process_costs_one_timeout(tmp_path, image):
    import os
    import signal
    import subprocess
    import sys
    path, data, _ = image
    proc = subprocess.Popen(
        [sys.executable, "-c", _PEER_SCRIPT, path, str(tmp_path / "p"),
         str(CS)], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        port = int(proc.stdout.readline())
        uri = f"nbd://127.0.0.1:{port}/img"

        async def main():
            vol, origin = volume(image, [uri], peer_timeout=0.5)
            try:
                assert await vol.read(*span(0, 8)) == data[:8 * CS]
                assert origin.calls == 0          # the peer served it
                os.kill(proc.pid, signal.SIGSTOP)
                t0 = time.monotonic()
                # Status still cached: the read itself times out.
                assert await vol.read(*span(8, 16)) == data[8 * CS:16 * CS]
                assert time.monotonic() - t0 < 1.5
                st = vol.stats()
                assert st["peer_errors"]["timeout"] == 1
                assert st["avoided"] == [uri]
                assert st["chunks_from_origin"] == 8
            finally:
                await vol.close()
        run(main())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# -- chunk owners (rendezvous hashing): a boot storm ------------------------

class CountingOrigin(Origin):
    """An origin whose reads are counted per chunk in ``counts``, shared by
    every host (one origin server)."""

    def __init__(self, path, counts):
        super().__init__(path)
        self.counts = counts

    async def read(self, offset, length):
        for i in range(offset // CS, (offset + length - 1) // CS + 1):
            self.counts[i] = self.counts.get(i, 0) + 1
        return await super().read(offset, length)


class FakeOwner(FakePeer):
    """A peer that holds nothing (status: all missing); its reads
    misbehave as FakePeer's."""

    async def block_status(self, offset, length,
                           context=blockdev.BASE_ALLOCATION):
        return [blockdev.Extent(length, 0)]


class MeshHost:
    """A host as the agent builds it: origin -> ImageVolume (owners from
    a StaticOwners) -> CacheLayer -> PeerExport(owns=volume.owns)."""

    @classmethod
    async def start(cls, tmp_path, key, image, counts, **kw):
        path, _, manifest = image
        self = cls()
        self.key = key
        self.directory = StaticOwners(key, {})
        self.origin = CountingOrigin(path, counts)
        kw.setdefault("peer_timeout", 0.5)
        # One chunk per owner region: these tests look at single chunks.
        kw.setdefault("owner_region", CS)
        self.volume = ImageVolume(self.origin, manifest, "img",
                                  self.directory, **kw)
        self.cache = CacheLayer(self.volume, str(tmp_path / key),
                                chunk_size=CS, verify=None)
        self.export = PeerExport(self.cache, "held", owns=self.volume.owns)
        self.server, self.uri = await serve(self.export)
        return self

    def see(self, others):
        """This host's view: ``others`` ({key: host}) announced the
        image."""
        self.directory.keyed = {k: h.uri for k, h in others.items()}
        self.directory.uris = list(self.directory.keyed.values())

    async def read_all(self, seed, workers=4):
        """The whole image, in runs of 1-6 chunks in a random order, by a
        few concurrent readers (VMs booting)."""
        rng = random.Random(seed)
        runs, i = [], 0
        while i < 256:
            n = rng.randint(1, 6)
            runs.append((i, min(i + n, 256)))
            i += n
        rng.shuffle(runs)
        out = bytearray(SIZE)

        async def worker(k):
            for a, b in runs[k::workers]:
                off, length = span(a, b)
                out[off:off + length] = await self.cache.read(off, length)
        await asyncio.gather(*(worker(k) for k in range(workers)))
        return bytes(out)

    async def stop(self):
        await self.server.close()
        await self.cache.close()


async def mesh(tmp_path, image, keys, counts, **kw):
    hosts = [await MeshHost.start(tmp_path, k, image, counts, **kw)
             for k in keys]
    for h in hosts:
        h.see({o.key: o for o in hosts if o is not h})
    return hosts


@pytest.mark.parametrize("max_status_peers", [3, 1])
def test_boot_storm_fetches_each_chunk_from_the_origin_once(
        tmp_path, image, max_status_peers):
    """Also when a host asks only some peers what they hold (1 of 2):
    the chunks of the others come through their owners."""
    data = image[1]

    async def main():
        counts = {}
        hosts = await mesh(tmp_path, image, ["h0", "h1", "h2"], counts,
                           max_status_peers=max_status_peers)
        try:
            t0 = time.monotonic()
            got = await asyncio.gather(*(h.read_all(seed)
                                         for seed, h in enumerate(hosts)))
            assert time.monotonic() - t0 < 5
            assert all(g == data for g in got)
            # Every chunk left the origin once, whoever asked first.
            assert sorted(counts) == list(range(256))
            assert sum(counts.values()) <= 1.1 * 256, counts
            for h in hosts:
                st = h.volume.stats()
                assert st["peer_errors"] == dict.fromkeys(
                    st["peer_errors"], 0)
                # Each host fetched what it owns, and got the others'
                # from their owners or holders.
                assert st["chunks_from_peers"] > 0
                assert h.export.stats()["chunks_fetched_for_peers"] > 0
                assert not h.volume._landing
        finally:
            for h in hosts:
                await h.stop()
    run(main())


def test_owners_that_disagree_never_loop(tmp_path, image):
    """Two hosts with different member lists (a membership change seen by
    one only): each may think the other owns a chunk; they never ask each
    other in a circle, and every read ends without a timeout."""
    data = image[1]

    async def main():
        counts = {}
        a = await MeshHost.start(tmp_path, "a", image, counts,
                                 owner_timeout=5)
        b = await MeshHost.start(tmp_path, "b", image, counts,
                                 owner_timeout=5)
        a.see({"b": b})
        b.see({"x": a})             # b knows a under another key
        try:
            t0 = time.monotonic()
            got = await asyncio.gather(a.read_all(1), b.read_all(2))
            assert time.monotonic() - t0 < 3
            assert got == [data, data]
            for h in (a, b):
                errors = h.volume.stats()["peer_errors"]
                assert errors["timeout"] == errors["io"] == 0
        finally:
            await a.stop()
            await b.stop()
    run(main())


@pytest.mark.parametrize("behaviour", ["hang", "not_held", "closed"])
def test_owner_failure_falls_back_to_the_origin(tmp_path, image, behaviour):
    path, data, manifest = image

    async def main():
        owner = FakeOwner(data, behaviour)
        server, uri = await serve(owner)
        if behaviour == "closed":
            await server.close()
        counts = {}
        vol = ImageVolume(CountingOrigin(path, counts), manifest, "img",
                          StaticOwners("me", {"other": uri}),
                          peer_timeout=0.5, owner_timeout=0.3,
                          owner_region=CS)
        try:
            t0 = time.monotonic()
            assert await vol.read(0, SIZE) == data
            assert time.monotonic() - t0 < 2
            # Every chunk from the origin, once.
            assert counts == dict.fromkeys(range(256), 1)
            st = vol.stats()
            assert st["chunks_from_owners"] == 0
            theirs = sum(not vol.owns(i) for i in range(256))
            assert 80 < theirs < 176
            assert st["owner_fallbacks"] >= (theirs if behaviour != "closed"
                                             else 0)
            if behaviour == "hang":
                assert st["peer_errors"]["timeout"] >= 1
            if behaviour == "not_held":
                # A refusal (the owner sees other members) costs no
                # avoidance.
                assert st["avoided"] == []
                assert owner.reads >= 1
            else:
                assert st["avoided"] == [uri]
                # Avoided: the next reads go to the origin at once.
                t0 = time.monotonic()
                assert await vol.read(0, SIZE) == data
                assert time.monotonic() - t0 < 0.5
        finally:
            await vol.close()
            await server.close()
    run(main())


def test_export_fetches_owned_chunks_and_refuses_the_others(tmp_path,
                                                            image):
    data = image[1]

    async def main():
        counts = {}
        h, other = await mesh(tmp_path, image, ["h0", "h1"], counts)
        mine = [i for i in range(256) if h.volume.owns(i)]
        theirs = [i for i in range(256) if not h.volume.owns(i)]
        assert mine and theirs
        try:
            client = await open_nbd(
                h.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE])
            # Unowned and unheld: refused at once, nothing fetched.
            t0 = time.monotonic()
            with pytest.raises(blockdev.BlockError) as err:
                await client.read(theirs[0] * CS, CS)
            assert err.value.errno == errno.ENOTSUP
            assert time.monotonic() - t0 < 0.5
            assert counts == {}
            # Owned: fetched through the cache, once for every reader.
            i = mine[0]
            got = await asyncio.gather(*(client.read(i * CS, CS)
                                         for _ in range(3)))
            assert got == [data[i * CS:(i + 1) * CS]] * 3
            assert counts == {i: 1}
            await drain(h.cache)
            assert h.cache.chunk_states(i, i + 1) == [cache_layer.HELD]
            # A range of an owned and an unowned unheld chunk: refused
            # whole, the owned one not fetched either.
            j = next(k for k in mine if k + 1 in theirs and k != i)
            with pytest.raises(blockdev.BlockError):
                await client.read(j * CS, 2 * CS)
            assert j not in counts
            assert h.export.stats()["refused"] == 2
            # Without owns (today's export): the owned chunk is refused.
            plain = PeerExport(h.cache, "held")
            with pytest.raises(blockdev.BlockError):
                await plain.read(j * CS, CS)
            await client.close()
        finally:
            await h.stop()
            await other.stop()
    run(main())


def test_export_serves_chunks_being_written_without_waiting(tmp_path,
                                                           image):
    """A chunk the host has read and checked, while its cache still
    writes it to the cache file (the volume handed it over, the chunk is
    still "in flight" in the cache): peers get it at once from the
    cache's memory, owned or not. Before, an owned one waited 5 ms steps
    (PeerExport._later) and an unowned one was refused. The write is held
    back by wrapping the cache's _store (the window is otherwise one
    thread hop, too short to look at)."""
    data = image[1]

    async def main():
        counts = {}
        h, other = await mesh(tmp_path, image, ["h0", "h1"], counts)
        gate = asyncio.Event()
        store = h.cache._store

        async def held_store(*args):
            await gate.wait()
            await store(*args)
        h.cache._store = held_store
        i = next(k for k in range(256) if h.volume.owns(k))
        j = next(k for k in range(256) if not h.volume.owns(k))
        try:
            for k in (i, j):
                assert await h.cache.read(k * CS, CS) == \
                    data[k * CS:(k + 1) * CS]
            assert h.cache.chunk_states(i, i + 1) == [cache_layer.FETCHING]
            assert h.cache.landed(i) and h.cache.landed(j)
            assert h.volume.landing(i) is None
            client = await open_nbd(
                h.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE])
            for k in (i, j):
                t0 = time.monotonic()
                assert await client.read(k * CS, CS) == \
                    data[k * CS:(k + 1) * CS]
                assert time.monotonic() - t0 < 0.5
            stats = h.export.stats()
            assert stats["waits_for_owned"] == 0
            assert stats["refused"] == 0
            assert counts == {i: 1, j: 1}
            await client.close()
        finally:
            gate.set()
            await drain(h.cache)
            await h.stop()
            await other.stop()
    run(main())


def test_peer_waits_for_an_owned_fetch_that_has_not_reached_the_volume(
        tmp_path, image):
    """An owned chunk whose cache fetch has begun but waits (for write
    slots here, held back by wrapping the cache's _take_slots): a peer's
    read of it waits on the chunk's landing future, which the fetch
    resolves when it reaches the volume, not by looking again every 5 ms;
    the origin is read once."""
    data = image[1]

    async def main():
        counts = {}
        h, other = await mesh(tmp_path, image, ["h0", "h1"], counts)
        gate = asyncio.Event()
        take = h.cache._take_slots

        async def held_take(count):
            await gate.wait()
            await take(count)
        h.cache._take_slots = held_take
        i = next(k for k in range(256) if h.volume.owns(k))
        try:
            local = asyncio.ensure_future(h.cache.read(i * CS, CS))
            await until(lambda: h.cache.chunk_states(i, i + 1)
                        == [cache_layer.FETCHING], "the fetch begun")
            client = await open_nbd(
                h.uri, meta_contexts=[blockdev.VMTHUNDER_CACHE])
            remote = asyncio.ensure_future(client.read(i * CS, CS))
            await until(lambda: h.volume.landing(i) is not None,
                        "the peer's read waiting")
            gate.set()
            want = data[i * CS:(i + 1) * CS]
            assert await remote == want
            assert await local == want
            stats = h.export.stats()
            assert stats["waits_for_owned"] == 1
            assert set(stats["serve_ms"]) == {"expected"}
            assert counts == {i: 1}
            assert stats["refused"] == 0
            await client.close()
        finally:
            gate.set()
            await drain(h.cache)
            await h.stop()
            await other.stop()
    run(main())


def test_rendezvous_owners_are_stable_and_balanced():
    keys = [f"host{k}" for k in range(8)]
    n = 4000
    before = [owner_of(keys, "img", i) for i in range(n)]
    share = {k: before.count(k) / n for k in keys}
    assert all(0.09 < s < 0.16 for s in share.values()), share
    # Deterministic, order-free, and per image.
    assert before == [owner_of(reversed(keys), "img", i) for i in range(n)]
    assert before != [owner_of(keys, "other", i) for i in range(n)]
    # host3 leaves: only its chunks move, spread over the others.
    rest = [k for k in keys if k != "host3"]
    after = [owner_of(rest, "img", i) for i in range(n)]
    moved = [i for i in range(n) if before[i] != after[i]]
    assert moved == [i for i in range(n) if before[i] == "host3"]
    assert len({after[i] for i in moved}) == 7
    # host8 joins: it takes chunks only, from everyone.
    grown = [owner_of([*keys, "host8"], "img", i) for i in range(n)]
    assert all(g in (b, "host8") for b, g in zip(before, grown))
    # The cached table follows member changes.
    table = OwnerTable("img")
    assert [table.owner(keys, i) for i in range(50)] == before[:50]
    assert [table.owner(rest, i) for i in range(50)] == after[:50]
    assert table.owner([], 0) is None
    # Regions: consecutive chunks share the owner of their region.
    regions = OwnerTable("img", region_chunks=64)
    assert [regions.owner(keys, i) for i in range(256)] == [
        before[i // 64] for i in range(256)]
