"""The agent's local API against hostile input (issue 10, items 3 and 5):
trace files it reads on request are bounded (regular files only, size,
decompressed size, requests, extents), and deeply nested JSON is a 400.

Each call is watched: the agent is killed, and the test fails, if it
grows past WATCH_RSS or does not answer in time, so a regression cannot
eat the host's memory or hang the run.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import threading
import time

import pytest

from tests.functional.conftest import make_image
from tests.functional.test_agent import start_agent
from vmthunder.agent import precache as precache_mod
from vmthunder.agent.client import AgentError
from vmthunder import trace as trace_mod

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
SIZE = 1 * MiB
# Far above an idle agent (~100 MiB), far below what the holes took.
WATCH_RSS = 400 * MiB
HEADER = json.dumps({"format": trace_mod.FORMAT,
                     "version": trace_mod.VERSION, "image_size": SIZE})


@pytest.fixture
def agent(tmp_path):
    """One agent with image "base" (1 MiB) attached; stopped at the end."""
    proc = start_agent(str(tmp_path / "agent"))
    try:
        proc.client.attach_image("base", make_image(tmp_path / "base.raw",
                                                    SIZE, seed=61))
        yield proc
    finally:
        with contextlib.suppress(Exception):
            proc.stop()
        with contextlib.suppress(Exception):
            proc.proc.stdout.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def watched(agent, call, timeout: float = 20):
    """call() (a request to ``agent``) in a thread; its result, or what
    it raised. Fails the test, killing the agent, when the agent grows
    past WATCH_RSS or the call is not answered within ``timeout``."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as exc:        # handed to the test thread
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        try:
            size = rss(agent.proc.pid)
        except FileNotFoundError:
            size = 0
        why = None
        if size > WATCH_RSS:
            why = f"the agent grew to {size // MiB} MiB"
        elif time.monotonic() > deadline:
            why = f"no answer within {timeout} s"
        if why:
            agent.proc.kill()
            thread.join(40)
            pytest.fail(why)
        time.sleep(0.02)
    if "error" in out:
        raise out["error"]
    return out["value"]


def refused(agent, call, status: int = 400, timeout: float = 20) -> str:
    """The message of the AgentError ``call`` must raise; the agent
    still answers afterwards and its state is unchanged."""
    state = agent.state_bytes()
    with pytest.raises(AgentError) as info:
        watched(agent, call, timeout)
    assert info.value.status == status, str(info.value)
    assert agent.client.status()["images"]["base"]["precache"] is None
    assert agent.state_bytes() == state
    return str(info.value)


def precache(agent, path):
    return lambda: agent.client.precache("base", str(path))


def write_gzip(path, pieces) -> str:
    """Gzip ``pieces`` (an iterable of bytes) into ``path``, streaming."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        for piece in pieces:
            f.write(piece)
    return str(path)


# -- trace files -----------------------------------------------------------

def test_trace_from_dev_zero_is_refused_not_read(agent):
    message = refused(agent, precache(agent, "/dev/zero"))
    assert "/dev/zero" in message and "not a regular file" in message, \
        message
    assert "character device" in message, message


def test_trace_that_is_a_fifo_does_not_hang_the_agent(agent, tmp_path):
    fifo = tmp_path / "boot.trace"
    os.mkfifo(fifo)
    try:
        message = refused(agent, precache(agent, fifo), timeout=10)
        assert str(fifo) in message and "FIFO" in message, message
    finally:
        # Whoever still waits to open it for reading gets an end of file.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_trace_that_is_a_directory_is_refused(agent, tmp_path):
    message = refused(agent, precache(agent, tmp_path))
    assert str(tmp_path) in message and "directory" in message, message


def test_gzip_bomb_trace_is_cut_at_the_decompressed_limit(agent, tmp_path):
    limit = precache_mod.PRECACHE_TRACE_MAX_TEXT_BYTES
    # 1 GiB of one endless line: a few MiB on disk.
    bomb = write_gzip(tmp_path / "bomb.trace.gz", [
        HEADER.encode() + b"\n"] + [b"0" * (16 * MiB)] * 64)
    assert os.path.getsize(bomb) < precache_mod.PRECACHE_TRACE_MAX_FILE_BYTES
    message = refused(agent, precache(agent, bomb))
    assert bomb in message and str(limit) in message, message
    assert "decompressed" in message, message


def test_trace_file_above_the_size_limit_is_refused_unread(agent, tmp_path):
    limit = precache_mod.PRECACHE_TRACE_MAX_FILE_BYTES
    big = tmp_path / "big.trace"
    with open(big, "wb") as f:
        f.write(HEADER.encode() + b"\n")
        f.truncate(limit + 1)          # sparse: nothing to write
    message = refused(agent, precache(agent, big))
    assert str(big) in message and str(limit) in message, message
    assert f"{limit + 1} bytes" in message, message


def test_trace_with_too_many_requests_is_refused(agent, tmp_path):
    limit = precache_mod.PRECACHE_TRACE_MAX_REQUESTS
    line = b"0 0.001 R 0 512\n"
    path = write_gzip(tmp_path / "long.trace.gz", [
        HEADER.encode() + b"\n", line * (limit + 1)])
    message = refused(agent, precache(agent, path))
    assert path in message and f"more than {limit} requests" in message, \
        message


def test_trace_reading_far_past_the_image_is_refused_at_once(agent,
                                                              tmp_path):
    # A header claiming an exabyte image and one read of all of it: the
    # chunks it covers must not be listed one by one.
    huge = 1 << 60
    path = tmp_path / "huge.trace"
    path.write_text(json.dumps({"format": trace_mod.FORMAT,
                                "version": trace_mod.VERSION,
                                "image_size": huge}) + "\n"
                    f"0 0.001 R 0 {huge}\n")
    message = refused(agent, precache(agent, path), timeout=10)
    assert "beyond image 'base'" in message, message
    # The agent still serves a good trace afterwards.
    good = tmp_path / "good.trace"
    good.write_text(HEADER + "\n0 0.001 R 0 4096\n")
    started = agent.client.precache("base", str(good))
    assert started["started"] and started["chunks_selected"] == 1, started


# -- JSON ------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/images", b"[" * 30000 + b"]" * 30000),
    ("/images", b'{"name": "x", "origin": ' + b"[" * 30000 + b"]" * 30000
     + b"}"),
    ("/vms", b'{"name": "vm1", "image": "base", "size": '
     + b'{"a": ' * 6000 + b"1" + b"}" * 6000 + b"}"),
    ("/images/base/precache", b'{"trace": ' + b"[" * 30000 + b"]" * 30000
     + b"}"),
])
def test_deeply_nested_json_is_a_400(agent, path, body):
    assert len(body) < 64 * 1024            # under the body size limit
    state = agent.state_bytes()
    with pytest.raises(AgentError) as info:
        watched(agent, lambda: agent.client.request("POST", path, body))
    assert info.value.status == 400, str(info.value)
    assert "nested" in str(info.value), str(info.value)
    assert agent.state_bytes() == state
    # Shallow nesting is still parsed (and refused for what it is).
    with pytest.raises(AgentError) as info:
        agent.client.request("POST", path, b'{"name": [[["x"]]]}')
    assert info.value.status == 400 and "nested" not in str(info.value)
    assert agent.stop() == 0


def test_json_body_above_the_size_limit_is_a_413(agent):
    body = json.dumps({"name": "x", "origin": "a" * (64 * 1024)})
    with pytest.raises(AgentError) as info:
        agent.client.request("POST", "/images", body)
    assert info.value.status == 413, str(info.value)
    assert "larger than" in str(info.value)


def test_brackets_inside_strings_do_not_count_as_nesting(agent, tmp_path):
    # A trace path full of brackets is a path, not nesting.
    name = "[" * 100 + "{" * 100
    with pytest.raises(AgentError) as info:
        agent.client.precache("base", str(tmp_path / name))
    assert info.value.status == 400, str(info.value)
    assert "cannot read trace" in str(info.value), str(info.value)
    assert "nested" not in str(info.value)
