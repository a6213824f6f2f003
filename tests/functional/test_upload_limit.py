"""[agent] peer_upload_rate with real agents in network namespaces.

The harness's topology (vmthunder/bench/topology.py: an origin with tgtd
and Redis, two hosts, links shaped by tc), an image of random bytes
exported with its manifest, one vmthunder-agent per host in mesh mode
(test_peer_faults.py's Agent). Host A holds the whole image (precached)
and serves its peers at most 50 Mbit/s; host B reads the whole image
through a VM disk of its own agent, which fetches it from A. What must
hold: A's bytes sent to peers, sampled from its status over B's read,
grow at 50 Mbit/s within 10 %; and a reader of A's own VM disk keeps
reading at its unloaded rate meanwhile (its disk is not behind the
limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time

import pytest

from tests.functional import test_peer_faults as _pf
from tests.functional.conftest import REPO, make_image, need

pytestmark = [_pf.NEEDS_ROOT, pytest.mark.timeout(240)]

MiB = 1 << 20
IMAGE_SIZE = 48 * MiB
LIMIT = "50mbit"
LIMIT_BYTES = 50e6 / 8
# Reads of a VM disk: this size, this many in flight.
PIECE, PARALLEL = 1 * MiB, 4


@pytest.fixture(scope="module")
def net():
    need("tgtd", "tgtadm", "redis-server", "nbdkit")
    # Links far faster than the limit: what holds A's uploads at 50
    # Mbit/s is the agent, not the network.
    with _pf.mesh_net(None, 2, "vmt-ul", make=lambda workdir: make_image(
            os.path.join(workdir, "image.raw"), IMAGE_SIZE, seed=17)) as net:
        yield net


@pytest.fixture
def agents(net, tmp_path):
    """Factory: agent(host, extra [agent] lines) started, image attached;
    all stopped at the end; their logs must hold no internal error."""
    with _pf.configured_agents(net, str(tmp_path)) as start:
        yield start


async def read_disk(uri: str, *, until=None, digest=None) -> tuple:
    """Read the NBD export ``uri`` from the start, PARALLEL reads of
    PIECE in flight, once through (``until`` None) or round and round
    until ``until()`` is true; (bytes read, seconds). ``digest``: a
    hashlib object fed the data in order (one pass)."""
    from vmthunder.nbd.client import open_nbd
    client = await open_nbd(uri)
    size = client.size
    done = 0
    pending: dict[int, asyncio.Task] = {}
    nxt = 0
    t0 = time.monotonic()
    try:
        while True:
            more = nxt < size if until is None else not until()
            while more and len(pending) < PARALLEL:
                off = nxt % size
                pending[nxt] = asyncio.ensure_future(
                    client.read(off, min(PIECE, size - off)))
                nxt += PIECE
                more = nxt < size if until is None else not until()
            if not pending:
                break
            first = min(pending)
            data = await pending.pop(first)
            done += len(data)
            if digest is not None:
                digest.update(data)
    finally:
        for task in pending.values():
            task.cancel()
        await client.close()
    return done, time.monotonic() - t0


def test_upload_limit_holds_and_own_vms_keep_their_rate(net, agents):
    host_a, host_b = net.hosts[0], net.hosts[1]
    a = agents(host_a, f"peer_upload_rate = {LIMIT}\n")
    a.client.precache(_pf.IMAGE)
    _pf.wait_for(lambda: a.client.precache_progress(_pf.IMAGE)["state"]
                 == "done", "A's precache", timeout=60)
    b = agents(host_b)
    vm_a = a.create_vm("vm-a")
    vm_b = b.create_vm("vm-b")
    with open(net.image, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()

    async def scenario():
        # A's own VM alone: its unloaded rate (A's cache, page cache).
        stop = time.monotonic() + 2.0
        alone = await read_disk(vm_a, until=lambda: time.monotonic() > stop)
        # B reads the whole image from A; A's bytes sent to peers are
        # sampled meanwhile, and A's own VM reads again.
        samples: list[tuple[float, int]] = []
        b_done = asyncio.Event()

        async def sample():
            while not b_done.is_set():
                asked = time.monotonic()
                st = await asyncio.to_thread(a.client.status)
                answered = time.monotonic()
                # A sample that straddles B's end is not of the loaded
                # phase; one whose answer took long has a vague time.
                if not b_done.is_set() and answered - asked < 0.1:
                    samples.append(((asked + answered) / 2,
                                    st["peer_upload"]["bytes_sent"]))
                await asyncio.sleep(0.2)

        got = hashlib.sha256()

        async def b_reader():
            try:
                return await read_disk(vm_b, digest=got)
            finally:
                b_done.set()

        async def a_reader():
            await asyncio.sleep(1.0)            # B's read is under way
            stop = time.monotonic() + 3.0
            return await read_disk(
                vm_a, until=lambda: time.monotonic() > stop
                or b_done.is_set())

        t0 = time.monotonic()
        b_result, loaded, _ = await asyncio.gather(b_reader(), a_reader(),
                                                   sample())
        return t0, alone, loaded, b_result, samples, got.hexdigest()

    t0, alone, loaded, (b_bytes, b_secs), samples, got = \
        _pf.run(scenario(), timeout=120)
    assert b_bytes == IMAGE_SIZE and got == want
    st_b = b.status()
    # B's bytes came from A (none, or a few refused reads, from the
    # origin).
    assert st_b["bytes_from_peers"] >= 0.9 * IMAGE_SIZE, st_b

    # A's upload rate over B's read, past its first second (the bucket's
    # quarter second of burst).
    window = [(t, n) for t, n in samples if t >= t0 + 1.0]
    assert len(window) >= 10, samples
    (t1, n1), (t2, n2) = window[0], window[-1]
    rate = (n2 - n1) / (t2 - t1)
    print(f"A sent its peers {rate * 8 / 1e6:.1f} Mbit/s "
          f"(limit {LIMIT}); B read the image in {b_secs:.1f} s")
    # Above the limit is what must never be; below it a loaded machine
    # can leave the bucket idle for a moment.
    assert 0.85 * LIMIT_BYTES <= rate <= 1.10 * LIMIT_BYTES, (
        f"A uploaded {rate * 8 / 1e6:.1f} Mbit/s to its peers, not "
        f"{LIMIT} -15 % / +10 %", samples)

    # A's own VM: its disk is not behind the limit.
    alone_rate = alone[0] / alone[1]
    loaded_rate = loaded[0] / loaded[1]
    print(f"A's VM read {alone_rate / MiB:.0f} MiB/s alone, "
          f"{loaded_rate / MiB:.0f} MiB/s while A served B")
    # Four times the limit: not behind it (a ratio to the alone phase
    # would measure the machine's load between the phases).
    assert loaded_rate >= 4 * LIMIT_BYTES, (alone_rate, loaded_rate)

    # Status: the limit, what was sent, the time replies waited for it.
    up = a.client.status()["peer_upload"]
    assert up["rate"] == LIMIT_BYTES and up["limit"].startswith("50 Mbit/s")
    assert up["bytes_sent"] >= IMAGE_SIZE * 0.9 and up["wait_s"] > 1, up
    out = a.host.run(
        [sys.executable, "-m", "vmthunder.cli", "status", "--api-socket",
         a.api], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "upload limit 50 Mbit/s (6.25 MB/s)" in out.stdout, out.stdout
    # B has no limit: its status says so.
    assert b.client.status()["peer_upload"]["limit"] == "unlimited"

