"""/healthz and stalled-read detection of real agent processes.

An origin made unreachable (its file moved away; its tgtd killed), a
coordination backend that does not answer, a cache disk below the free
space threshold: /healthz answers 503 naming each, on the API socket and
on the metrics listener, and 200 again once it is back. A guest read that
waits for an origin stopped mid-read (and a real guest's boot whose
origin is stopped mid-boot) is logged once with what it waits for,
counted in the metrics and the status, and its end is logged when the
origin is back.

Every agent and tgtd started here is stopped when its test ends, pass or
fail.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from tests.functional.conftest import make_image, need
from tests.functional.iscsi_fixtures import free_port, tgtd  # noqa: F401
from tests.functional.test_agent import agents, nbd  # noqa: F401
from tests.functional.test_agent_metrics import (
    fetch, scrape, start_qemu, value)
from vmthunder.agent.client import _UnixConnection
from vmthunder.volume import manifest as mf

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
METRICS = ("--metrics-listen", "tcp:127.0.0.1:0")


def health(agent, where: str = "metrics") -> tuple[int, dict]:
    """(HTTP status, body) of GET /healthz on the metrics listener or
    the API socket."""
    if where == "metrics":
        status, ctype, text = fetch(agent.metrics_url + "/healthz")
        assert ctype.startswith("application/json"), ctype
        return status, json.loads(text)
    conn = _UnixConnection(agent.api_socket, 10)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_health(agent, status: int, timeout: float = 15) -> dict:
    """Poll /healthz (both places) until both answer ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        got = [health(agent, where) for where in ("metrics", "api")]
        if all(code == status for code, _ in got):
            return got[0][1]
        assert time.monotonic() < deadline, (status, got)
        time.sleep(0.2)


def test_healthz_names_what_is_wrong(agents, tmp_path):  # noqa: F811
    image = make_image(tmp_path / "base.raw", 1 * MiB, seed=12)
    agent = agents(tmp_path / "a", *METRICS)
    agent.client.attach_image("base", image)
    body = wait_health(agent, 200, timeout=5)
    assert body["status"] == "ok" and body["problems"] == []
    assert body["checks"]["origins"]["base"]["ok"] is True
    assert body["checks"]["agent"]["images"] == 1
    [disk] = body["checks"]["disk"].values()
    assert disk["ok"] and disk["free_bytes"] > disk["min_free_bytes"]
    res = agent.cli("health")
    assert (res.returncode, res.stdout) == (0, "healthy\n"), res.stderr

    # The origin file is gone (the agent still reads its open file; a
    # restart would not find it).
    moved = str(tmp_path / "moved.raw")
    os.rename(image, moved)
    body = wait_health(agent, 503)
    assert body["status"] == "unhealthy"
    [problem] = body["problems"]
    assert problem == (f"image base: origin {image} unreachable: {image}: "
                       "No such file or directory"), problem
    assert body["checks"]["origins"]["base"]["ok"] is False
    assert health(agent, "api") == (503, body) or \
        health(agent, "api")[1]["problems"] == [problem]
    res = agent.cli("health")
    assert (res.returncode, res.stdout) == (1, f"unhealthy:\n  {problem}\n")
    res = agent.cli("health", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["problems"] == [problem]
    status_text = agent.cli("status").stdout
    assert "STALLED" in status_text, status_text
    os.rename(moved, image)
    wait_health(agent, 200)
    assert "health: unhealthy: image base: origin" in agent.stderr()
    assert "health: healthy again" in agent.stderr()
    assert agent.stop() == 0

    # A cache disk below the threshold; a coordination backend that does
    # not answer (mesh peers on a Redis nobody runs).
    dead = free_port()
    agent = agents(tmp_path / "b", *METRICS, "--peer-listen",
                   f"unix:{tmp_path}/peer.sock", config=(
                       "[agent]\nhealth_min_free_mib = 1000000000\n"
                       "[coordination]\n"
                       f"backend_url = redis://127.0.0.1:{dead}\n"))
    body = wait_health(agent, 503, timeout=5)
    problems = body["problems"]
    assert len(problems) == 2, problems
    assert re.fullmatch(rf"coordination backend redis://127.0.0.1:{dead}"
                        r" unreachable: .+", problems[0]), problems
    cache_dir = str(tmp_path / "b" / "cache")
    assert re.fullmatch(rf"cache disk {cache_dir}: \d+ MiB free, below "
                        r"1000000000 MiB \(\[agent\] health_min_free_mib\)",
                        problems[1]), problems
    assert body["checks"]["coordination"]["ok"] is False
    assert agent.stop() == 0


CS = 8192                         # the manifest's chunk size
IQN = "iqn.2024-01.org.vmthunder.test"


def test_stalled_read_when_the_origin_stops(agents, tgtd, tmp_path):  # noqa
    size = 4 * MiB
    image = make_image(tmp_path / "volume.raw", size, seed=13)
    manifest = mf.build_manifest(image, "img", CS)
    raw = manifest.to_bytes()
    lun2 = tmp_path / "manifest.lun"
    lun2.write_bytes(raw + bytes(-len(raw) % 512))
    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:stall")
    daemon.add_lun(target, 1, image)
    daemon.add_lun(target, 2, str(lun2))
    agent = agents(None, *METRICS, config=(
        "[agent]\nstalled_read_seconds = 1\n"
        "[iscsi]\nreconnect_timeout = 60\n"))
    url = daemon.url(target, 1)
    agent.client.attach_image("img", url)
    vm = agent.client.create_vm("vm1", "img")
    [head] = nbd(vm["nbd"], ("read", 0, 65536))
    with open(image, "rb") as f:
        data = f.read()
    assert head == data[:65536]
    wait_health(agent, 200, timeout=5)

    # The origin stops; the guest reads what the cache does not hold.
    daemon.kill()
    offset = 2 * MiB + 4096
    result = []
    reader = threading.Thread(target=lambda: result.append(
        nbd(vm["nbd"], ("read", offset, 4096))[0]), daemon=True)
    reader.start()
    deadline = time.monotonic() + 15
    pattern = re.compile(
        r"WARNING vmthunder\.agent\.health: stalled read: VM vm1 \(image "
        r"img\) has waited (\d+\.\d) s for 4096 bytes at offset "
        rf"{offset}: chunk {offset // CS} from the origin \((.+)\)")
    while not pattern.search(agent.stderr()):
        assert time.monotonic() < deadline, agent.stderr()[-3000:]
        assert reader.is_alive(), "the read did not wait for the origin"
        time.sleep(0.1)
    found = pattern.search(agent.stderr())
    assert 1.0 <= float(found.group(1)) < 5, found.group(0)
    assert daemon.portal in found.group(2), found.group(0)
    assert len(pattern.findall(agent.stderr())) == 1       # logged once
    samples = scrape(agent)
    assert value(samples, "vmthunder_stalled_reads_total", image="img") == 1
    assert value(samples, "vmthunder_guest_reads_stalled") == 1
    assert value(samples, "vmthunder_guest_reads_in_progress",
                 image="img") == 1
    status = agent.client.status()
    assert status["images"]["img"]["stalled_reads"] == 1
    assert status["stalled_reads_now"] == 1
    body = wait_health(agent, 503)
    [problem] = body["problems"]
    assert problem.startswith(f"image img: origin {url} unreachable: iSCSI "
                              f"portal {daemon.portal}: "), problem
    assert body["checks"]["stalled_reads_now"] == 1
    time.sleep(1.5)
    assert len(pattern.findall(agent.stderr())) == 1       # still once

    # The origin is back: the read ends with the right bytes.
    daemon.start()
    reader.join(60)
    assert not reader.is_alive()
    assert result == [data[offset:offset + 4096]]
    assert re.search(rf"VM vm1: the stalled read of 4096 bytes at offset "
                     rf"{offset} ended after \d+\.\d s", agent.stderr())
    wait_health(agent, 200)
    samples = scrape(agent)
    assert value(samples, "vmthunder_guest_reads_stalled") == 0
    assert value(samples, "vmthunder_stalled_reads_total", image="img") == 1
    assert agent.stop() == 0


def test_stalled_read_when_the_origin_stops_mid_boot(agents, tgtd,  # noqa
                                                     guest_dir, tmp_path):
    """The issue's case: a guest booting from an iSCSI origin whose tgtd
    dies once the boot has started reading; its stalled reads are logged
    and counted, and the boot completes once tgtd is back."""
    need("qemu-system-x86_64")
    from vmthunder.boot import load_guest
    guest = load_guest(guest_dir, build=False)
    manifest = mf.build_manifest(guest.root, "guest", CS)
    raw = manifest.to_bytes()
    lun2 = tmp_path / "manifest.lun"
    lun2.write_bytes(raw + bytes(-len(raw) % 512))
    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:boot")
    daemon.add_lun(target, 1, guest.root)
    daemon.add_lun(target, 2, str(lun2))
    agent = agents(None, *METRICS, config=(
        "[agent]\nstalled_read_seconds = 1\n"
        "[iscsi]\nreconnect_timeout = 60\n"))
    agent.client.attach_image("guest", daemon.url(target, 1))
    vm = agent.client.create_vm("vm1", "guest")
    console_path = tmp_path / "console.log"
    qemu = start_qemu(guest, vm["nbd"], console_path)
    try:
        # Stop the origin as soon as the guest reads its disk.
        deadline = time.monotonic() + 60
        while value(scrape(agent), "vmthunder_vm_read_bytes_total",
                    vm="vm1", image="guest") == 0:
            assert time.monotonic() < deadline and qemu.poll() is None
            time.sleep(0.02)
        daemon.kill()
        stalled = re.compile(r"stalled read: VM vm1 \(image guest\) has "
                             r"waited \d+\.\d s for \d+ bytes at offset "
                             r"\d+: chunks? \d+(-\d+)? from the origin")
        deadline = time.monotonic() + 20
        while not stalled.search(agent.stderr()):
            assert time.monotonic() < deadline, agent.stderr()[-3000:]
            time.sleep(0.1)
        assert value(scrape(agent), "vmthunder_stalled_reads_total",
                     image="guest") >= 1
        daemon.start()
        deadline = time.monotonic() + 90
        while guest.marker not in console_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and qemu.poll() is None, \
                console_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
    console = console_path.read_text(errors="replace")
    assert "I/O error" not in console, console[-3000:]
    assert re.search(r"the stalled read of \d+ bytes at offset \d+ ended "
                     r"after", agent.stderr())
    samples = scrape(agent)
    assert value(samples, "vmthunder_guest_reads_stalled") == 0
    assert agent.client.status()["images"]["guest"]["stalled_reads"] >= 1
    assert agent.stop() == 0
