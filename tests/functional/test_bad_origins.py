"""Image origins that are not images (issue 10, item 4).

A directory used to be accepted as a 4096-byte image whose reads then
failed, and a FIFO blocked the agent's event loop in open(), hanging
every VM and the API. Only regular files and block devices are images:
the agent's API answers 400 and `vmthunder serve` exits with an error
naming what the path is; a block device (a loop device here) is served.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO, make_image, need
from tests.functional.test_agent_bounds import watched
from tests.functional.test_agent import start_agent
from vmthunder.agent.client import AgentError

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024


@pytest.fixture
def agent(tmp_path):
    proc = start_agent(str(tmp_path / "agent"))
    try:
        yield proc
    finally:
        with contextlib.suppress(Exception):
            proc.stop()
        with contextlib.suppress(Exception):
            proc.proc.stdout.close()


def not_an_image(tmp_path, kind: str) -> str:
    path = tmp_path / f"origin-{kind}"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_agent_refuses_an_origin_that_is_not_an_image(agent, tmp_path,
                                                      kind):
    origin = not_an_image(tmp_path, kind)
    # No state file yet (nothing attached); it must stay that way.
    state = os.path.exists(agent.state_file) and agent.state_bytes()
    with pytest.raises(AgentError) as info:
        watched(agent, lambda: agent.client.attach_image("img", origin),
                timeout=10)
    message = str(info.value)
    assert info.value.status == 400, message
    assert origin in message, message
    assert ("a directory" if kind == "directory" else "a FIFO") in message
    assert "raw image file or a block device" in message, message
    # Nothing recorded; the agent still answers and still attaches.
    assert (os.path.exists(agent.state_file) and agent.state_bytes()) \
        == state
    assert agent.client.status()["images"] == {}
    good = make_image(tmp_path / "good.raw", 1 * MiB, seed=5)
    agent.client.attach_image("img", good)
    assert "img" in agent.client.status()["images"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_serve_refuses_an_image_that_is_not_an_image(tmp_path, kind):
    origin = not_an_image(tmp_path, kind)
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "serve", origin,
         "--listen", "tcp:127.0.0.1:0", "--cache-dir",
         str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert ("a directory" if kind == "directory" else "a FIFO") \
        in proc.stderr, proc.stderr
    assert origin in proc.stderr, proc.stderr


def test_block_device_origin_is_served(serve, tmp_path):
    """A loop device over an image file: its size comes from the device
    (stat says 0 for a block device) and reads equal the file."""
    need("losetup", "nbdcopy")
    if os.geteuid() != 0:
        pytest.skip("losetup needs root")
    image = make_image(tmp_path / "img.raw", 8 * MiB, seed=9)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only",
                           image], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        served = serve(device, "--export", "img")
        out = subprocess.run(["nbdcopy", served.uri("img"), "-"],
                             capture_output=True, timeout=60,
                             check=True).stdout
        with open(image, "rb") as f:
            assert hashlib.sha256(out).digest() == \
                hashlib.sha256(f.read()).digest()
        assert served.stop() == 0
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
