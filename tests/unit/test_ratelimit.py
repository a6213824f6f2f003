"""vmthunder.ratelimit: the token bucket (burst, long-run rate, order of
callers), rates as written in the config, and the NBD server's upload
limit (one bucket for all connections; reads refused when its queue is
full)."""

from __future__ import annotations

import asyncio
import errno
import random
import time

import pytest
from oslo_config import cfg

from vmthunder import blockdev, opts
from vmthunder.nbd.address import Address
from vmthunder.nbd.client import open_nbd
from vmthunder.nbd.server import NbdServer
from vmthunder.ratelimit import RateLimit, format_rate, parse_rate

MiB = 1 << 20


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_burst_then_rate():
    """A fresh or idle bucket lets `burst` seconds' worth through at
    once; beyond it every byte waits its 1/rate share."""
    clock = FakeClock()
    bucket = RateLimit(1000, burst=0.25, clock=clock)
    clock.now += 10                       # idle: the burst is full
    assert bucket.reserve(250) == 0       # the whole burst, no wait
    assert bucket.reserve(100) == pytest.approx(0.0)   # now's own slot
    assert bucket.reserve(100) == pytest.approx(0.1)
    assert bucket.reserve(500) == pytest.approx(0.2)
    assert bucket.bytes == 950
    assert bucket.waited == pytest.approx(0.3)
    # Idle again: waiting does not accumulate credit beyond the burst.
    clock.now += 100
    assert bucket.reserve(250) == 0
    assert bucket.reserve(1000) == pytest.approx(0.0)
    assert bucket.reserve(1) == pytest.approx(1.0)


def test_long_run_rate_with_fake_clock():
    """Callers that send as soon as allowed get rate x time + burst."""
    clock = FakeClock()
    bucket = RateLimit(1_000_000, burst=0.25, clock=clock)
    clock.now += 1                        # idle: the burst is full
    sent = 0
    end = clock.now + 60
    while clock.now < end:
        clock.now += bucket.reserve(64 * 1024)
        sent += 64 * 1024
    # Each chunk goes at the start of its slot: up to two beyond.
    assert 60 * 1_000_000 + 250_000 <= sent <= 60_250_000 + 2 * 65536


def test_acquire_long_run_rate_real_time():
    """Four concurrent senders share one bucket: together they stay at
    the rate (within 5 % over ~1 s on a loaded machine), each gets a
    share."""
    rate = 4 * 1024 * 1024
    bucket = RateLimit(rate, burst=0.0)
    counts = [0] * 4

    async def sender(i, deadline):
        while time.monotonic() < deadline:
            await bucket.acquire(32 * 1024)
            counts[i] += 32 * 1024

    async def main():
        t0 = time.monotonic()
        await asyncio.gather(*(sender(i, t0 + 1.0) for i in range(4)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    total = sum(counts)
    # Never above the rate; below it only by a moment the loaded machine
    # did not run the senders (a bucket without burst cannot catch up).
    assert 0.85 * rate <= total / elapsed <= 1.05 * rate, total / elapsed
    assert min(counts) > total / 8, counts


def test_bad_rate_limit():
    with pytest.raises(ValueError, match="must be positive"):
        RateLimit(0)


@pytest.mark.parametrize("text, expected", [
    ("50mbit", 50e6 / 8), ("1gbit", 1e9 / 8), ("10mbps", 10e6),
    ("800kbit", 100e3), ("6250000", 6250000.0), ("64K", 65536.0),
    ("1.5M", 1.5 * 2**20), ("2MiB", 2 * 2**20), ("0", 0.0), (0, 0.0),
    (" 50 MBit ", 50e6 / 8),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["fast", "50 mbits/s", "-5", "1e999", ""])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_format_rate():
    assert format_rate(None) == "unlimited"
    assert format_rate(0) == "unlimited"
    assert format_rate(50e6 / 8) == "50 Mbit/s (6.25 MB/s)"


def test_config_options(tmp_path):
    path = tmp_path / "v.conf"
    path.write_text("[agent]\npeer_upload_rate = 50mbit\n"
                    "background_fetch_rate = 2M\n")
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[str(path)])
    assert conf.agent.peer_upload_rate == 50e6 / 8
    assert conf.agent.background_fetch_rate == 2 * 2**20

    path.write_text("[agent]\npeer_upload_rate = lots\n")
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[str(path)])
    with pytest.raises(ValueError, match="'lots' is not a rate"):
        conf.agent.peer_upload_rate


# -- the NBD server's upload limit (real server and client, loopback) ----

class Memory(blockdev.BlockDevice):
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    async def read(self, offset, length):
        return self.data[offset:offset + length]


async def _serve(limit, max_wait=1.0):
    data = random.Random(7).randbytes(4 * MiB)
    server = NbdServer(upload_limit=limit, upload_max_wait=max_wait)
    server.add_export("img", Memory(data), read_only=True)
    addr = await server.listen(Address("tcp", host="127.0.0.1"))
    return server, addr.nbd_uri("img"), data


def test_server_upload_limit_rate():
    """Reads of every connection share the one bucket: two clients, 3 MiB
    in all (big reads, and small ones that the fast path answers), at
    2 MiB/s with no burst take ~1.5 s, the data intact; a server without
    the limit answers the same at once."""
    rate = 2 * MiB

    async def main(limit):
        server, uri, data = await _serve(limit)
        clients = [await open_nbd(uri), await open_nbd(uri)]
        t0 = time.monotonic()
        try:
            async def reader(client, base, size):
                for off in range(base, base + 1 * MiB, size):
                    assert await client.read(off, size) == \
                        data[off:off + size]
            await asyncio.gather(
                reader(clients[0], 0, 256 * 1024),
                reader(clients[1], 1 * MiB, 256 * 1024),
                reader(clients[0], 2 * MiB, 4096))
            elapsed = time.monotonic() - t0
        finally:
            for client in clients:
                await client.close()
            await server.close()
        assert server.read_bytes == 3 * MiB
        return elapsed

    limit = RateLimit(rate, burst=0)
    elapsed = asyncio.run(main(limit))
    assert 1.4 <= elapsed <= 2.5, elapsed
    assert limit.bytes == 3 * MiB
    assert limit.waited > 1.0
    assert asyncio.run(main(None)) < 0.7


def test_server_upload_limit_refuses_when_queue_full():
    """More than upload_max_wait seconds of replies queued: further reads
    get ENOTSUP at once ("read it elsewhere"), the others their data."""
    async def main():
        limit = RateLimit(1 * MiB, burst=0)
        server, uri, data = await _serve(limit, max_wait=0.3)
        client = await open_nbd(uri)
        try:
            results = await asyncio.gather(
                *(client.read(i * 256 * 1024, 256 * 1024)
                  for i in range(8)), return_exceptions=True)
        finally:
            await client.close()
            await server.close()
        return server, results, data

    server, results, data = asyncio.run(main())
    refused = [r for r in results if isinstance(r, Exception)]
    served = [(i, r) for i, r in enumerate(results)
              if not isinstance(r, Exception)]
    # 0.3 s at 1 MiB/s: the first two reads (0 and 0.25 s of backlog)
    # pass, then reads whose turn is more than 0.3 s away are refused.
    assert 2 <= len(served) <= 4, results
    assert refused and all(getattr(e, "errno", None) == errno.ENOTSUP
                           for e in refused), refused
    assert "upload limit" in str(refused[0])
    assert server.upload_refused == len(refused)
    for i, got in served:
        assert got == data[i * 256 * 1024:(i + 1) * 256 * 1024]


def test_status_text_upload_line():
    from vmthunder.agent.client import format_status
    base = {"uptime_s": 1, "hypervisor_nbd": "unix:/x", "images": {},
            "vms": {}}
    limited = {"rate": 50e6 / 8, "limit": format_rate(50e6 / 8),
               "bytes_sent": 3 * MiB, "wait_s": 2.5, "refused": 1}
    text = format_status({**base, "peer_nbd": "tcp:10.0.0.1:10810",
                          "peer_upload": limited})
    assert ("sent to peers 3.0 MiB, upload limit 50 Mbit/s (6.25 MB/s); "
            "replies waited 2.5 s for it, 1 read(s) refused") in text
    # No peer server: nothing sent, no line.
    text = format_status({**base, "peer_nbd": None,
                          "peer_upload": dict(limited, rate=0)})
    assert "upload" not in text
