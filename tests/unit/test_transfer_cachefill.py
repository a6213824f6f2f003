"""vmthunder.transfer.cachefill and the agent's precache on the copy
engine: a real CacheLayer over a real file source, the chunks of an
order fetched through the cache into a sink."""

import asyncio
import errno
import time

import pytest

from tests.unit.test_cache_layer import (CS, SIZE, CountingSource, drain,
                                        make_image)
from vmthunder import blockdev
from vmthunder.agent.precache import Precache
from vmthunder.cache.cache_layer import HELD, CacheLayer
from vmthunder.ratelimit import RateLimit
from vmthunder.transfer import engine
from vmthunder.transfer.cachefill import CacheChunksSource
from vmthunder.transfer.destinations import DiscardDestination
from vmthunder.transfer.errors import SourceError

LAST = SIZE // CS               # the short last chunk (37)


def held(cache) -> list[int]:
    return [i for i, st in enumerate(cache.chunk_states(0, cache.chunks))
            if st == HELD]


async def open_cache(tmp_path, delay=0.0):
    path, data = make_image(tmp_path / "img", seed=3)
    source = CountingSource(path, delay=delay)
    cache = CacheLayer(source, str(tmp_path / "cache"), chunk_size=CS,
                       sync_interval=0)
    return cache, source, data


def test_chunks_in_order_through_the_cache_into_a_sink(tmp_path):
    async def main():
        cache, source, data = await open_cache(tmp_path)
        try:
            # Trace order, the short last chunk in the middle.
            order = [5, LAST, 2, 3, 9, 0]
            src = CacheChunksSource(cache, order, request_size=2 * CS,
                                    max_in_flight=1)
            sink = DiscardDestination()
            result = await engine.Copy(src, sink, digest=None,
                                       detect_zeroes=False).run()
            # One slot per chunk; each read of two slots fetched its
            # consecutive chunks at once, in the order given.
            assert result.size == len(order) * CS
            assert sink.bytes_written == len(order) * CS
            assert [off // CS for off, _ in source.calls] == \
                [5, LAST, 2, 9, 0]
            assert src.chunks_done == src.chunks_total == 6
            assert src.bytes_fetched == src.bytes_total == \
                5 * CS + SIZE % CS
            await drain(cache)
            assert sorted(held(cache)) == sorted(order)
            # The cache holds the image's bytes.
            got = await cache.read(LAST * CS, SIZE % CS)
            assert got == data[LAST * CS:]
        finally:
            await cache.close()
    asyncio.run(main())


def test_a_failing_fetch_names_its_chunks(tmp_path):
    async def main():
        cache, source, _ = await open_cache(tmp_path)
        try:
            source.fail = blockdev.BlockError(errno.EIO, "origin gone")
            src = CacheChunksSource(cache, [7, 8], max_in_flight=1)
            with pytest.raises(SourceError) as info:
                await engine.Copy(src, DiscardDestination(), digest=None,
                                  detect_zeroes=False).run()
            assert info.value.reason.startswith("chunks 7-8: "), \
                info.value.reason
            assert "origin gone" in info.value.reason
            assert held(cache) == []
        finally:
            await cache.close()
    asyncio.run(main())


def test_precache_in_flight_bound_and_rate_limit(tmp_path, monkeypatch):
    from vmthunder.agent import precache as precache_mod
    monkeypatch.setattr(precache_mod, "PRECACHE_RUN_BYTES", CS)

    async def main():
        cache, source, _ = await open_cache(tmp_path, delay=0.02)
        try:
            # A chunk held already is not in the precache's work.
            await cache.read(4 * CS, 10)
            await drain(cache)
            in_flight = most = 0
            inner = source.read

            async def counted(offset, length):
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                try:
                    return await inner(offset, length)
                finally:
                    in_flight -= 1
            source.read = counted

            # Unlimited: PRECACHE_PARALLEL reads of one chunk at a time.
            run = Precache("img", cache, list(range(20)), None)
            assert run.chunks_total == 19 and run.chunks_selected == 20
            run.start()
            await run.task
            p = run.progress()
            assert p["state"] == "done", p
            assert p["chunks_done"] == 19 and p["bytes_fetched"] == 19 * CS
            assert p["rate_limit"] is None
            assert most == precache_mod.PRECACHE_PARALLEL, most

            # 8 chunks at 16 chunks per second: ~0.44 s (the first
            # goes at once), against ~0.04 s unlimited; the bucket is the
            # caller's (the agent shares one for background fetches).
            limit = RateLimit(16 * CS, burst=0)
            run = Precache("img", cache, list(range(20, 28)), None,
                           rate_limit=limit)
            t0 = time.monotonic()
            run.start()
            await run.task
            took = time.monotonic() - t0
            p = run.progress()
            assert p["state"] == "done" and p["chunks_done"] == 8, p
            assert p["rate_limit"] == 16 * CS
            assert took >= 0.4, took
            assert limit.bytes == 8 * CS
        finally:
            await cache.close()
    asyncio.run(main())
