"""The agent's Prometheus metrics, scraped from real agent processes
([agent] metrics_listen) with urllib and parsed with prometheus_client's
own text parser.

Every agent and QEMU started here is stopped when its test ends, pass or
fail.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import make_image, need
from tests.functional.test_agent import agents, nbd  # noqa: F401
from vmthunder.agent import metrics as metrics_mod
from vmthunder.agent.client import _UnixConnection

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
METRICS = ("--metrics-listen", "tcp:127.0.0.1:0")


def fetch(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return (resp.status, resp.headers["Content-Type"],
                    resp.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(agent) -> dict:
    """{(sample name, ((label, value)...)): value} of GET /metrics."""
    status, ctype, text = fetch(agent.metrics_url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def start_qemu(guest, uri: str, console_path) -> subprocess.Popen:
    """QEMU (TCG) booting ``guest`` from NBD ``uri``, its console written
    to ``console_path``; the caller kills it."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m",
            str(guest.memory_mb or 512), "-smp", "1", "-nographic",
            "-nodefaults", "-serial", f"file:{console_path}", "-no-reboot",
            "-kernel", guest.kernel, "-initrd", guest.initrd,
            "-append", guest.append,
            "-drive", f"file={uri},format=raw,if=virtio,cache=none"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def test_metrics_move_during_a_boot(agents, guest_dir, tmp_path):  # noqa
    need("qemu-system-x86_64")
    from vmthunder.boot import load_guest
    guest = load_guest(guest_dir, build=False)
    agent = agents(None, *METRICS)
    agent.client.attach_image("guest", guest.root)
    vm = agent.client.create_vm("vm1", "guest")
    before = scrape(agent)
    assert value(before, "vmthunder_vm_read_bytes_total", vm="vm1",
                 image="guest") == 0
    assert value(before, "vmthunder_guest_read_latency_seconds_count",
                 image="guest") == 0
    console_path = tmp_path / "console.log"
    qemu = start_qemu(guest, vm["nbd"], console_path)
    scrapes = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            scrapes.append(scrape(agent))
            console = console_path.read_text(errors="replace") \
                if console_path.exists() else ""
            if guest.marker in console or qemu.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
    console = console_path.read_text(errors="replace")
    assert guest.marker in console, console[-3000:] + agent.stderr()[-3000:]
    after = scrape(agent)
    scrapes.append(after)

    def series(name, **labels):
        return [value(s, name, **labels) for s in scrapes]

    vm_reads = series("vmthunder_vm_read_bytes_total", vm="vm1",
                      image="guest")
    origin = series("vmthunder_origin_read_bytes_total", image="guest")
    latency = series("vmthunder_guest_read_latency_seconds_count",
                     image="guest")
    # Counters only go up, and they moved while the guest booted: several
    # scrapes saw different values, not just the first and the last.
    for s in (vm_reads, origin, latency):
        assert s == sorted(s), s
    assert len(set(vm_reads)) >= 3, vm_reads
    assert len(set(latency)) >= 3, latency
    assert origin[-1] > 0
    # The guest's reads: every one is in the histogram, as a hit or a miss.
    hits = value(after, "vmthunder_guest_read_hits_total", image="guest")
    misses = value(after, "vmthunder_guest_read_misses_total",
                   image="guest")
    assert misses > 0
    assert hits + misses == latency[-1]
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in after.items()
        if k[0] == "vmthunder_guest_read_latency_seconds_bucket")
    assert buckets[-1] == (float("inf"), latency[-1])
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # The same figures as `vmthunder status`.
    status = agent.client.status()
    img = status["images"]["guest"]
    assert value(after, "vmthunder_origin_read_bytes_total",
                 image="guest") == img["bytes_from_origin"]
    assert value(after, "vmthunder_vm_read_bytes_total", vm="vm1",
                 image="guest") == status["vms"]["vm1"]["bytes_read"]
    assert value(after, "vmthunder_vm_written_bytes_total", vm="vm1",
                 image="guest") == status["vms"]["vm1"]["bytes_written"] > 0
    assert agent.stop() == 0


def _numbers(prefix: tuple, tree) -> dict:
    """{key path: number} of the numbers in a status tree."""
    out = {}
    if isinstance(tree, dict):
        for key, sub in tree.items():
            out.update(_numbers(prefix + (key,), sub))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = tree
    return out


# The process figures of `vmthunder status`, as prometheus_client's own
# ProcessCollector names them.
PROCESS_METRICS = {"cpu_s": "process_cpu_seconds_total",
                   "rss_bytes": "process_resident_memory_bytes",
                   "open_fds": "process_open_fds"}


def _metric_of(path: tuple) -> tuple[str, dict]:
    """The sample (name, labels) holding status number ``path``."""
    m = metrics_mod
    if len(path) == 1:
        return "vmthunder_" + m.AGENT_GAUGES[path[0]][0], {}
    if path == ("coordination", "members"):
        return "vmthunder_coordination_members", {}
    if path[0] == "process":
        return PROCESS_METRICS[path[1]], {}
    if path[0] == "background_fetch":
        metric, _, counter = m.BACKGROUND_FETCH[path[1]]
        return "vmthunder_" + metric + ("_total" if counter else ""), {}
    if path[0] == "peer_upload":
        metric, _, counter = m.PEER_UPLOAD[path[1]]
        return "vmthunder_" + metric + ("_total" if counter else ""), {}
    if path[0] == "cache_capacity":
        metric, _, counter = m.CACHE_CAPACITY[path[1]]
        return "vmthunder_" + metric + ("_total" if counter else ""), {}
    kind, name, key, *rest = path
    if kind == "vms":
        metric, _, counter = m.VM_METRICS[key]
        return ("vmthunder_" + metric + ("_total" if counter else ""),
                {"vm": name})
    labels = {"image": name}
    if key in m.IMAGE_COUNTERS:
        return "vmthunder_" + m.IMAGE_COUNTERS[key][0] + "_total", labels
    if key in m.IMAGE_GAUGES:
        return "vmthunder_" + m.IMAGE_GAUGES[key][0], labels
    if key in m.IMAGE_LABELLED_COUNTERS:
        metric, _, label = m.IMAGE_LABELLED_COUNTERS[key]
        return "vmthunder_" + metric + "_total", {**labels,
                                                   label: rest[0]}
    if key == "origin_io":
        if rest[0] in m.ORIGIN_GAUGES:
            return f"vmthunder_origin_{rest[0]}", labels
        return f"vmthunder_origin_io_{rest[0]}_total", labels
    if key == "precache":
        assert rest[0] in m.PRECACHE_GAUGES, path
        return f"vmthunder_precache_{rest[0]}", labels
    if key == "boot_trace":
        return "vmthunder_boot_trace_" + "_".join(rest), labels
    raise AssertionError(f"status number {path} has no metric")


def test_every_status_number_is_a_metric(agents, tmp_path):  # noqa: F811
    size = 4 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=11)
    peer_socket = str(tmp_path / "peer.sock")
    agent = agents(None, *METRICS, "--peer-listen", f"unix:{peer_socket}")
    agent.client.attach_image("base", image)
    vm = agent.client.create_vm("vm1", "base")
    agent.client.create_vm("vm2", "base", 8 * MiB)
    nbd(vm["nbd"], ("read", 0, MiB), ("write", 0, b"\x01" * 4096),
        ("flush",), ("read", 0, 8192))
    agent.client.precache("base")
    deadline = time.monotonic() + 30
    while agent.client.precache_progress("base")["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [served] = nbd(f"nbd+unix:///base?socket={peer_socket}",
                   ("read", 0, 65536))
    assert len(served) == 65536
    time.sleep(0.3)                       # chunks synced and marked
    status = agent.client.status()
    samples = scrape(agent)
    numbers = _numbers((), status)
    assert len(numbers) > 40, numbers
    for path, number in numbers.items():
        name, labels = _metric_of(path)
        if path[0] == "vms":
            labels["image"] = status["vms"][path[1]]["image"]
        key = (name, tuple(sorted(labels.items())))
        assert key in samples, (path, key)
        if path[-1] not in ("uptime_s", "elapsed_s") \
                and path[0] != "process":          # they move
            assert samples[key] == number, (path, samples[key], number)
    # A few figures that say the workload happened.
    assert value(samples, "vmthunder_peer_served_bytes_total",
                 image="base") == 65536
    assert value(samples, "vmthunder_vm_written_bytes_total", vm="vm1",
                 image="base") == 4096
    assert value(samples, "vmthunder_cache_bytes", image="base") == size
    assert value(samples, "vmthunder_image_vms", image="base") == 2
    assert value(samples, "vmthunder_vm_size_bytes", vm="vm2",
                 image="base") == 8 * MiB
    assert any(k[0] == "process_resident_memory_bytes" for k in samples)
    # OpenMetrics when the scraper asks for it.
    req = urllib.request.Request(
        agent.metrics_url + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith(
            "application/openmetrics-text")
        assert resp.read().decode().rstrip().endswith("# EOF")
    status_code, _, text = fetch(agent.metrics_url + "/nope")
    assert status_code == 404
    assert agent.stop() == 0


def test_metrics_off_by_default_and_on_a_unix_socket(agents, tmp_path):  # noqa
    agent = agents(tmp_path / "a")
    assert "metrics=" not in agent.ready_line
    assert agent.stop() == 0
    path = str(tmp_path / "metrics.sock")
    agent = agents(tmp_path / "b", "--metrics-listen", f"unix:{path}")
    assert f"metrics=unix:{path}" in agent.ready_line
    conn = _UnixConnection(path, 10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "vmthunder_agent_uptime_seconds" in names
    assert agent.stop() == 0
    assert not os.path.exists(path)
