"""A roll-out as the README's operator section describes it, on one
machine: three agents ("hosts") started from the example config,
etc/vmthunder/vmthunder.conf.example (addresses made loopback, a member
id each), on a real Redis and on a real etcd, watched as systemd would
(READY=1 and STOPPING=1 on $NOTIFY_SOCKET). They
find each other through the backend, report healthy, count the members
in their metrics, go unhealthy (503 naming the backend) while it is down
and healthy again once it is back.

Every agent and server started here is stopped at the end, pass or fail
(etcd's data directory removed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.functional.test_agent import REPO, agents  # noqa: F401
from tests.functional.test_agent_health import wait_health
from tests.functional.test_agent_metrics import scrape, value
from tests.functional.test_membership import backend  # noqa: F401

pytestmark = pytest.mark.timeout(180)

EXAMPLE = os.path.join(REPO, "etc", "vmthunder", "vmthunder.conf.example")
HOSTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_config(path, backend_url: str, member: str, port: int) -> str:
    """The example config as host ``member`` would have it here."""
    with open(EXAMPLE) as f:
        text = f.read()
    text = text.replace("peer_listen = tcp:10.0.0.11:10810",
                        f"peer_listen = tcp:127.0.0.1:{port}")
    lines = []
    for line in text.splitlines():
        if line.startswith("backend_url ="):
            line = f"backend_url = {backend_url}"
        elif line.startswith("heartbeat_interval ="):
            line = f"heartbeat_interval = 0.2\nmember_id = {member}"
        lines.append(line)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def members(url: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "vmthunder.agent.membership", "--backend",
         url, "list", "--json"], capture_output=True, text=True, cwd=REPO,
        timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_agents_from_the_example_config_find_each_other(
        agents, backend, tmp_path, monkeypatch):  # noqa: F811
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    hosts = []
    endpoints = {}
    try:
        for i in range(HOSTS):
            member, port = f"host-{i}", free_port()
            conf = host_config(tmp_path / f"{member}.conf", backend.url,
                               member, port)
            agent = agents(tmp_path / member, "--config-file", conf,
                           "--metrics-listen", "tcp:127.0.0.1:0")
            assert notify.recv(64) == b"READY=1"
            hosts.append(agent)
            endpoints[member] = f"tcp:127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            listed = members(backend.url)
            if {m: i["endpoint"] for m, i in listed.items()} == endpoints:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        for agent in hosts:
            body = wait_health(agent, 200)
            assert body["checks"]["coordination"]["ok"] is True
            samples = scrape(agent)
            assert value(samples, "vmthunder_coordination_healthy") == 1
            deadline = time.monotonic() + 10
            while value(samples, "vmthunder_coordination_members") != HOSTS:
                assert time.monotonic() < deadline
                time.sleep(0.2)
                samples = scrape(agent)

        # The backend goes away: every agent says so; it comes back: they
        # recover without a restart.
        backend.kill()
        for agent in hosts:
            body = wait_health(agent, 503)
            assert body["problems"][0].startswith("coordination backend "), \
                body["problems"]
        # (etcd would tell our socket it is ready too)
        monkeypatch.delenv("NOTIFY_SOCKET")
        backend.start()
        for agent in hosts:
            wait_health(agent, 200, timeout=30)
        for agent in hosts:
            agent.stop()
            assert notify.recv(64) == b"STOPPING=1"
    finally:
        notify.close()
