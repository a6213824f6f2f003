"""vmthunder://IMAGE: copies through a real vmthunder-agent.

Single agent (no root needed): the image attached from a file origin,
precached, read through a temporary VM disk (deleted afterwards) or,
with peers on, the image's peer export. The swarm (root): two agents in
network namespaces (test_peer_faults.py's topology: tgtd and Redis on
the origin host, the origin link shaped to 200 Mbit/s), the image
exported with its manifest; a copy on the first host takes its bytes
from the origin, the same copy on the second from the first host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.functional import test_peer_faults as _pf
from tests.functional.conftest import REPO, make_image
from tests.functional.test_agent import start_agent
from vmthunder import transfer

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)
# The namespaces, origin and agents of the peer-fault tests.
net = _pf.net
agents = _pf.agents


@pytest.fixture
def local_agent(tmp_path):
    started = []

    def start(*extra):
        agent = start_agent(str(tmp_path / f"agent{len(started)}"), *extra)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
        agent.proc.stdout.close()


def test_agent_copy_through_a_temporary_vm_disk(local_agent, tmp_path):
    image = make_image(tmp_path / "base.raw", 6 * MiB, seed=21,
                       hole_at=4 * MiB)
    agent = local_agent()
    out = tmp_path / "out.raw"
    uri = f"vmthunder://base?socket={agent.api_socket}"
    with pytest.raises(transfer.SourceError, match="is not attached"):
        transfer.copy(uri, str(out)).wait(60)
    task = transfer.copy(uri, str(out), origin=image)
    result = task.wait(120)
    assert out.read_bytes() == open(image, "rb").read()
    # Fetched from the origin by the agent's precache, then read.
    assert result.by_source["origin"] == 6 * MiB, result.by_source
    assert result.by_source["peers"] == 0
    assert [v["name"] for v in agent.client.vms()] == []
    # Again: the agent holds it all; nothing is fetched.
    again = transfer.copy(uri, str(tmp_path / "again.raw")).wait(120)
    assert again.by_source == {"peers": 0, "origin": 0,
                               "held": again.bytes_copied}
    # The hole past 4 MiB is one in the agent's cache too: not read.
    assert again.bytes_copied == 4 * MiB
    assert again.digest == result.digest
    assert agent.client.images()[0]["name"] == "base"


def test_agent_copy_reads_the_peer_export(local_agent, tmp_path):
    image = make_image(tmp_path / "base.raw", 4 * MiB, seed=22)
    agent = local_agent("--peer-listen", f"unix:{tmp_path}/peer.sock")
    agent.client.attach_image("base", image)
    out = tmp_path / "out.raw"
    res = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "copy", "vmthunder://base",
         str(out), "--agent-socket", agent.api_socket, "--json",
         "--progress"], capture_output=True, text=True, cwd=REPO,
        timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == open(image, "rb").read()
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["by_source"]["origin"] == 4 * MiB
    st = agent.client.status()["images"]["base"]
    assert st["bytes_served_to_peers"] == 4 * MiB, st
    assert agent.client.vms() == []


def test_agent_down_is_a_source_error(tmp_path):
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy(f"vmthunder://base?socket={tmp_path}/none.sock",
                      str(tmp_path / "out.raw")).wait(30)
    assert "cannot reach the vmthunder agent" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_swarm_second_copy_comes_from_the_peer(net, agents, tmp_path):
    """Two agents in namespaces: host0 copies the image (its agent
    fetches it from the origin), then host1 does (its agent fetches it
    from host0); both copies equal the image."""
    first_agent, second_agent = agents(net.hosts[0], net.hosts[1])
    size = os.path.getsize(net.image)

    def copy_on(agent, out) -> dict:
        proc = agent.host.run(
            [sys.executable, "-m", "vmthunder.cli", "copy",
             f"vmthunder://{_pf.IMAGE}?socket={agent.api}", str(out),
             "--json"], capture_output=True, text=True, timeout=240,
            cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    first = copy_on(first_agent, tmp_path / "first.raw")
    assert first["size"] == size
    # Nobody held anything: host0's agent fetched each chunk once, from
    # the origin or (the regions host1 owns) through host1.
    src = first["by_source"]
    assert src["origin"] + src["peers"] >= 0.99 * size, first
    assert src["origin"] >= 0.2 * size, first
    second = copy_on(second_agent, tmp_path / "second.raw")
    # host1 holds what it fetched for host0; the rest comes from host0.
    src = second["by_source"]
    assert src["peers"] >= 0.4 * size, second
    assert src["origin"] <= 0.05 * size, second
    assert second["digest"] == first["digest"]
    # The origin sent the image about once for both copies.
    sent = sum(a.status()["bytes_from_origin"]
               for a in (first_agent, second_agent))
    assert sent <= 1.05 * size, sent
    for out in ("first.raw", "second.raw"):
        proc = subprocess.run(["cmp", net.image, str(tmp_path / out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
