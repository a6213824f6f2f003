"""Precache: an agent warms an image (whole, or a boot trace's chunks)
through its cache; `vmthunder precache` does it on several agents.

Real agent processes (test_agent.py's), a file origin; one in-process
test for what a fast file origin cannot show (a second request while one
runs, cancel on detach).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import REPO, make_image
from tests.functional.test_agent import (
    nbd, read_file, start_agent, wait_status)
from tests.waiting import until
from vmthunder.agent.client import AgentError, _UnixConnection
from vmthunder import trace as trace_mod

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
CHUNK = 256 * 1024


@pytest.fixture
def agents(tmp_path):
    """Factory: agents(workdir=None, *flags) -> AgentProc (test_agent.py's
    start_agent); all stopped at the end."""
    started = []

    def factory(workdir=None, *extra):
        agent = start_agent(str(workdir or tmp_path / "agent"), *extra)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        with contextlib.suppress(Exception):
            agent.stop()
        with contextlib.suppress(Exception):
            agent.proc.stdout.close()


def post(client, path: str, body) -> tuple[int, dict]:
    """POST raw ``body`` (bytes, or JSON-encoded) -> (HTTP status, reply)."""
    conn = _UnixConnection(client.socket_path, 30)
    try:
        conn.request("POST", path, body=body if isinstance(body, bytes)
                     else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def wait_precache(client, image: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        progress = client.precache_progress(image)
        if progress["state"] != "running":
            return progress
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)


def held_chunks(cache_dir: str) -> list[int]:
    """The chunks a (stopped) agent's cache marked held, from its map."""
    with open(os.path.join(cache_dir, "map"), "rb") as f:
        return [i for i, b in enumerate(f.read()) if b == 1]


def make_trace(path, image_size: int, reads: list[tuple[int, int]]) -> str:
    requests = [trace_mod.Request(0.001 * n, 0.001 * n + 0.0005, "R", off,
                                  length)
                for n, (off, length) in enumerate(reads)]
    # A write is not precached.
    requests.append(trace_mod.Request(1.0, 1.001, "W", 0, 4096))
    header = {"format": trace_mod.FORMAT, "version": trace_mod.VERSION,
              "image_size": image_size, "boot_s": None}
    trace_mod.save(trace_mod.Trace(header, requests), str(path))
    return str(path)


# -- the whole image ----------------------------------------------------

def test_precache_whole_image_then_vm_reads_nothing_from_origin(
        agents, tmp_path):
    size = 4 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=11)
    agent = agents(None, "--peer-listen", f"unix:{tmp_path}/peer.sock")
    client = agent.client
    client.attach_image("base", image)
    with pytest.raises(AgentError) as info:
        client.precache_progress("base")
    assert info.value.status == 404 and "never precached" in str(info.value)

    status, started = post(client, "/images/base/precache", {"trace": None})
    assert status == 202, started
    assert started["started"] is True and started["trace"] is None
    assert started["chunks_total"] == size // CHUNK
    assert started["bytes_total"] == size
    progress = wait_precache(client, "base")
    assert progress["state"] == "done", progress
    assert progress["chunks_done"] == progress["chunks_total"] == 16
    assert progress["bytes_fetched"] == size
    assert progress["from_origin"] == size and progress["from_peers"] == 0
    assert progress["error"] is None and progress["elapsed_s"] > 0
    assert progress["started_at"] <= time.time()

    st = wait_status(client, lambda s: s["images"]["base"]["chunks_held"]
                     == s["images"]["base"]["chunks_total"])
    img = st["images"]["base"]
    assert img["chunks_held"] == img["chunks_total"] == 16, img
    assert img["precache"]["state"] == "done"
    assert img["bytes_from_origin"] == size
    detail = client.request("GET", "/images/base")
    assert detail["precache"]["chunks_done"] == 16
    assert detail["chunks_held"] == 16

    # A VM reading the whole image fetches nothing more.
    vm = client.create_vm("vm1", "base")
    [data] = nbd(vm["nbd"], ("read", 0, size))
    assert data == read_file(image, 0, size)
    img = client.status()["images"]["base"]
    assert img["bytes_from_origin"] == size, img
    assert img["bytes_fetched"] == size, img

    # Again: nothing left to fetch.
    status, again = post(client, "/images/base/precache", b"")
    assert status == 202 and again["chunks_total"] == 0
    assert again["chunks_selected"] == 16
    assert wait_precache(client, "base")["state"] == "done"
    assert agent.stop() == 0
    assert held_chunks(img["cache_dir"]) == list(range(16))


# -- a boot trace --------------------------------------------------------

def test_precache_trace_chunks_only(agents, tmp_path):
    size = 4 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=12)
    # First touches: 5, 2, 3 (one read across both), 9, 0; 5 again.
    path = make_trace(tmp_path / "boot.trace.gz", size,
                      [(5 * CHUNK + 100, 512), (2 * CHUNK + 4096, CHUNK),
                       (9 * CHUNK, 4096), (5 * CHUNK, 4096), (0, 512)])
    order = trace_mod.load(path).chunks(CHUNK)
    assert order == [5, 2, 3, 9, 0]
    agent = agents()
    client = agent.client
    client.attach_image("base", image)
    # One chunk of the trace is held already: not fetched again.
    vm = client.create_vm("vm1", "base")
    nbd(vm["nbd"], ("read", 9 * CHUNK, 512))
    wait_status(client, lambda s: s["images"]["base"]["chunks_held"] == 1)

    started = client.precache("base", path)
    assert started["started"] is True and started["trace"] == path
    assert started["chunks_selected"] == 5
    assert started["chunks_total"] == 4
    progress = wait_precache(client, "base")
    assert progress["state"] == "done", progress
    assert progress["chunks_done"] == 4
    assert progress["bytes_fetched"] == 4 * CHUNK
    img = wait_status(client, lambda s: s["images"]["base"]["chunks_held"]
                      == 5)["images"]["base"]
    assert img["chunks_held"] == 5, img
    assert img["bytes_from_origin"] == 5 * CHUNK
    assert agent.stop() == 0
    assert held_chunks(img["cache_dir"]) == sorted(order)


# -- [agent] background_fetch_rate ---------------------------------------

def test_precache_within_background_fetch_rate(tmp_path):
    """The precache is a copy of the transfer engine: [agent]
    background_fetch_rate (one bucket with the trace prefetches) caps it.
    4 MiB at 2 MiB/s in 1 MiB reads: at least 1.25 s after a quarter
    second of burst (a file origin alone: ~0.05 s); the status names the
    limit."""
    size = 4 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=16)
    agent = start_agent(str(tmp_path / "agent"),
                        config="[agent]\nbackground_fetch_rate = 2M\n")
    try:
        client = agent.client
        client.attach_image("base", image)
        t0 = time.monotonic()
        client.precache("base")
        progress = wait_precache(client, "base")
        took = time.monotonic() - t0
        assert progress["state"] == "done", progress
        assert progress["bytes_fetched"] == size
        assert progress["rate_limit"] == 2 * MiB
        assert took >= 1.0, took
        background = client.status()["background_fetch"]
        assert background["rate"] == 2 * MiB
        assert background["bytes"] == size
        assert background["wait_s"] >= 1.0, background
        from vmthunder.agent.client import format_status
        assert "precache and prefetch limit 16.78 Mbit/s (2.097 MB/s): " \
            "4.0 MiB fetched under it" in format_status(client.status())
    finally:
        with contextlib.suppress(Exception):
            agent.stop()
        with contextlib.suppress(Exception):
            agent.proc.stdout.close()


# -- bad input -----------------------------------------------------------

def test_precache_bad_input_is_refused_and_changes_nothing(agents,
                                                           tmp_path):
    size = 1 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=13)
    not_trace = tmp_path / "notes.txt"
    not_trace.write_text("hello\n")
    big = make_trace(tmp_path / "big.trace", 64 * MiB,
                     [(0, 4096), (40 * MiB, 4096)])
    agent = agents()
    client = agent.client
    client.attach_image("base", image)
    state = agent.state_bytes()

    cases = [
        ("unknown image", lambda: client.precache("nope"), 404,
         "no image 'nope'"),
        ("bad image name", lambda: client.precache("a b"), 400,
         "not valid"),
        ("relative trace", lambda: client.precache("base", "boot.trace"),
         400, "relative path"),
        ("missing trace", lambda: client.precache(
            "base", str(tmp_path / "none.trace.gz")), 400,
         "cannot read trace"),
        ("not a trace", lambda: client.precache("base", str(not_trace)),
         400, "is this a vmthunder trace?"),
        ("trace beyond the image", lambda: client.precache("base", big),
         400, "beyond image 'base'"),
        ("trace not a string", lambda: client.request(
            "POST", "/images/base/precache", {"trace": 5}), 400,
         "must be a string or null"),
        ("unknown field", lambda: client.request(
            "POST", "/images/base/precache", {"path": "/x"}), 400,
         "unknown field(s) path"),
        ("not JSON", lambda: client.request(
            "POST", "/images/base/precache", b"{nope"), 400,
         "not valid JSON"),
        ("progress of an unknown image", lambda: client.precache_progress(
            "nope"), 404, "no image 'nope'"),
    ]
    for what, call, status, words in cases:
        with pytest.raises(AgentError) as info:
            call()
        assert info.value.status == status, (what, str(info.value))
        assert words in str(info.value), (what, str(info.value))
        assert agent.state_bytes() == state, what
    with pytest.raises(AgentError) as info:
        client.precache_progress("base")
    assert info.value.status == 404                 # never started
    img = client.status()["images"]["base"]
    assert img["chunks_held"] == 0 and img["bytes_fetched"] == 0, img
    assert img["precache"] is None
    assert agent.stop() == 0


# -- the CLI on two agents -------------------------------------------------

def test_cli_precache_on_two_agents(agents, tmp_path):
    size = 2 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=14)
    make_trace(tmp_path / "boot.trace.gz", size,
               [(3 * CHUNK, 4096), (CHUNK, 2 * CHUNK)])
    one = agents(tmp_path / "a1")
    two = agents(tmp_path / "a2")
    for agent in (one, two):
        agent.client.attach_image("base", image)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "vmthunder.cli", "precache", *args],
            capture_output=True, text=True, cwd=tmp_path, timeout=30,
            env=dict(os.environ, PYTHONPATH=REPO))

    # A trace given relative to the caller's directory.
    res = cli("base", "--trace", "boot.trace.gz", "--interval", "0.1",
              "--api-socket", one.api_socket, "--api-socket", two.api_socket)
    assert res.returncode == 0, res.stdout + res.stderr
    for agent in (one, two):
        p = agent.client.precache_progress("base")
        assert p["state"] == "done" and p["chunks_done"] == 3, p
        assert p["trace"] == str(tmp_path / "boot.trace.gz")
        finals = [line for line in res.stdout.splitlines()
                  if line.startswith(f"{agent.api_socket}: base done")]
        assert finals, res.stdout
        assert "3/3 chunks (100%), 0.8/0.8 MiB" in finals[-1], finals
        assert "from peers 0.0 MiB, origin 0.8 MiB" in finals[-1], finals
        assert "MiB/s" in finals[-1]

    # The whole image, without waiting; then waiting on what runs.
    res = cli("base", "--no-wait", "--api-socket", one.api_socket)
    assert res.returncode == 0, res.stderr
    assert f"{one.api_socket}: base " in res.stdout
    assert "/5 chunks" in res.stdout            # 8 - 3 held
    assert wait_precache(one.client, "base")["chunks_done"] == 5

    # One agent missing: the other is warmed, the exit says which failed.
    missing = str(tmp_path / "none.sock")
    res = cli("base", "--api-socket", two.api_socket, "--api-socket",
              missing)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{two.api_socket}: base done 5/5 chunks" in res.stdout, \
        res.stdout
    assert f"precache of base on {missing}: cannot reach" in res.stderr
    assert two.client.status()["images"]["base"]["precache"]["state"] \
        == "done"
    res = cli("nope", "--api-socket", one.api_socket)
    assert res.returncode == 1
    assert "no image 'nope'" in res.stderr


# -- in process: a second request while one runs; cancel on detach ------

def test_precache_running_twice_and_cancelled_by_detach(tmp_path):
    from vmthunder.agent.service import Agent, AgentConfig
    from vmthunder.nbd.address import parse_address
    from vmthunder.stack import CacheOptions
    image = make_image(tmp_path / "base.raw", 4 * MiB, seed=15)

    async def main():
        agent = Agent(AgentConfig(
            state_dir=str(tmp_path / "state"),
            api_socket=str(tmp_path / "api.sock"),
            hypervisor_listen=parse_address(f"unix:{tmp_path}/nbd.sock"),
            cache=CacheOptions(str(tmp_path / "cache"), sync_interval=0)))
        await agent.start()
        try:
            await agent.attach_image("base", image)
            source = agent.images["base"].cache.source
            slow_read = source.read_into
            reads = []

            async def read_into(offset, buf):
                reads.append(offset // CHUNK)
                await asyncio.sleep(0.05)
                return await slow_read(offset, buf)
            source.read_into = read_into

            first, started = await agent.precache("base")
            assert started and first["chunks_total"] == 16
            await until(lambda: reads, "the precache to read")
            again, started = await agent.precache("base", "/nonexistent")
            assert not started and again["state"] == "running"
            assert again["trace"] is None
            # Runs of 4 chunks (1 MiB), in order, at most 4 at a time
            # (each read takes 50 ms: none ends while these start).
            await until(lambda: len(reads) >= 4, "4 reads in flight")
            for _ in range(3):
                await asyncio.sleep(0)
            assert sorted(reads) == [0, 4, 8, 12], reads
            run = agent.images["base"].precache
            await agent.detach_image("base")
            assert run.progress()["state"] == "cancelled"
            assert "base" not in agent.status()["images"]
        finally:
            await agent.stop()

    asyncio.run(main())
