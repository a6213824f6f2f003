"""vmthunder.bench.topology with real network namespaces (needs root).

Traffic endpoints are small Python scripts run inside the namespaces with
this interpreter: SINK reads connections to EOF and answers with its name
and the byte count; SEND connects to each target, sends N bytes, and
prints how long until the answer came back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys

import pytest
from pyroute2 import IPRoute

from vmthunder import privileged
from vmthunder.bench import topology
from vmthunder.bench.topology import Topology, cleanup_stale


def _missing_ip():
    # `ip netns exec` runs the programs of a host; the rest is pyroute2.
    return shutil.which("ip") is None \
        and not any(os.access(os.path.join(d, "ip"), os.X_OK)
                    for d in ("/usr/sbin", "/sbin"))


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="network namespaces need root; run as root"),
    pytest.mark.skipif(_missing_ip(),
                       reason="iproute2 (ip) not installed: "
                              "apt-get install iproute2"),
]

SINK = r"""
import socket, sys
name, count = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(16)
print("ready", s.getsockname()[1], flush=True)
for _ in range(count):
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    c.sendall(f"{name} {n}".encode())
    c.close()
"""

SEND = r"""
import json, socket, sys, time
n = int(sys.argv[1])
buf = b"x" * (1 << 20)
out = []
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    t0 = time.monotonic()
    s = socket.create_connection((host, int(port)), timeout=10)
    left = n
    while left:
        k = min(left, len(buf))
        s.sendall(buf[:k])
        left -= k
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        reply += b
    out.append({"target": target, "elapsed": time.monotonic() - t0,
                "reply": reply.decode()})
print(json.dumps(out))
"""


def _prefix():
    # Unique per test run: parallel runs and cleanup_stale never meet.
    return "vmtt" + secrets.token_hex(3)


def _start_sink(host, count):
    proc = host.popen([sys.executable, "-c", SINK, host.name, str(count)],
                      stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", f"sink in {host.name} did not start"
    return proc, f"{host.address}:{line[1]}"


def _send(host, nbytes, *targets):
    proc = host.run([sys.executable, "-c", SEND, str(nbytes), *targets],
                    capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _finish(proc):
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _namespaces(prefix):
    return [ns for ns in privileged.netns_list() if ns.startswith(prefix)]


def _root_links():
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def test_every_host_reaches_every_other():
    prefix = _prefix()
    with Topology(2, prefix=prefix) as topo:
        hosts = topo.all_hosts
        assert [h.name for h in hosts] == ["origin", "host0", "host1"]
        assert len({h.address for h in hosts}) == 3
        assert len({h.netns for h in hosts}) == 3
        assert all(h.netns.startswith(prefix + "-") for h in hosts)
        sinks = {h.name: _start_sink(h, len(hosts) - 1) for h in hosts}
        for src in hosts:
            targets = [sinks[d.name][1] for d in hosts if d is not src]
            replies = _send(src, 1000, *targets)
            assert [r["reply"] for r in replies] == \
                [f"{d.name} 1000" for d in hosts if d is not src]
        for proc, _ in sinks.values():
            _finish(proc)
            assert proc.returncode == 0
        # lo is up everywhere (a local connection works in each host).
        for h in hosts:
            r = h.run([sys.executable, "-c",
                       "import socket; s = socket.socket(); "
                       "s.bind(('127.0.0.1', 0)); s.listen(); "
                       "socket.create_connection(s.getsockname())"],
                      capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr
    assert _namespaces(prefix) == []


def test_shaping_limits_tcp_throughput_both_ways():
    # 4 MB at 40 Mbit/s: 0.8 s at the nominal rate (tbf counts whole
    # frames, so TCP payload gets ~95 % of it: ~0.84 s measured).
    nbytes = 4_000_000
    expected = nbytes * 8 / 40e6
    with Topology(1, origin_rate="40mbit", host_rate="1gbit",
                  prefix=_prefix()) as topo:
        host = topo.hosts[0]
        for src, dst in ((topo.origin, host), (host, topo.origin)):
            sink, target = _start_sink(dst, 1)
            [result] = _send(src, nbytes, target)
            _finish(sink)
            assert result["reply"] == f"{dst.name} {nbytes}"
            # The bound below shows the shaping; above, a starved sender
            # or receiver on a loaded machine only adds time.
            assert 0.75 * expected <= result["elapsed"] <= 1.5 * expected, \
                (f"{src.name} -> {dst.name}: {result['elapsed']:.3f} s, "
                 f"expected {expected:.3f} s -25 % / +50 %")


def test_destroy_after_exception_removes_everything():
    prefix = _prefix()
    before = _root_links()
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(1, prefix=prefix) as topo:
            assert sorted(topo.namespaces()) == sorted(
                [topo.switch_netns, topo.origin.netns, topo.hosts[0].netns])
            # Nothing of ours appears in the root namespace.
            new = _root_links() - before
            assert not [n for n in new
                        if n.startswith("p-") or n in ("br0", "eth0")], new
            sleeper = topo.hosts[0].popen(["sleep", "60"])
            raise RuntimeError("boom")
    assert _namespaces(prefix) == []
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    topo.destroy()  # again: a no-op
    topo.destroy()


def test_failed_create_removes_what_it_built(monkeypatch):
    prefix = _prefix()
    real = privileged.addr_add
    calls = []

    def addr_add(netns, dev, cidr):
        calls.append(netns)
        if len(calls) == 2:
            raise privileged.PrivilegedError("injected failure")
        real(netns, dev, cidr)

    monkeypatch.setattr(privileged, "addr_add", addr_add)
    topo = Topology(2, prefix=prefix)
    with pytest.raises(privileged.PrivilegedError, match="injected"):
        topo.create()
    assert _namespaces(prefix) == []
    topo.destroy()


def test_create_refuses_name_in_use():
    prefix = _prefix()
    topo = Topology(1, prefix=prefix)
    privileged.netns_add(topo.hosts[0].netns)  # a "leftover"
    try:
        with pytest.raises(privileged.PrivilegedError,
                           match="exists already.*--cleanup"):
            topo.create()
        # Only the leftover is left: what create built is gone.
        assert _namespaces(prefix) == [topo.hosts[0].netns]
    finally:
        privileged.netns_delete(topo.hosts[0].netns)


CRASHING_RUN = r"""
import os, signal, subprocess, sys
from vmthunder.bench.topology import Topology
topo = Topology(1, prefix=sys.argv[1])
topo.create()
# A process that outlives its (SIGKILLed) creator, in the leftover.
p = topo.hosts[0].popen(["sleep", "60"], start_new_session=True)
print(p.pid, flush=True)
signal.pause()
"""


def test_cleanup_stale_removes_crashed_runs_only():
    prefix = _prefix()
    live = Topology(0, prefix=prefix)
    live.create()
    try:
        child = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, prefix],
                                 stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(
                                     os.path.dirname(__file__))))
        sleeper = int(child.stdout.readline())
        child.kill()  # crash: no destroy
        child.wait()
        child.stdout.close()
        crashed = [ns for ns in _namespaces(prefix)
                   if not ns.startswith(live.run_id)]
        assert len(crashed) == 3

        removed = cleanup_stale(prefix)
        assert sorted(removed) == sorted(crashed)
        assert sorted(_namespaces(prefix)) == sorted(live.namespaces())
        assert len(live.namespaces()) == 2  # the live run is kept
        assert not topology._pid_alive(sleeper)
        assert cleanup_stale(prefix) == []
    finally:
        live.destroy()
    assert _namespaces(prefix) == []


def test_link_bytes_counts_transfers():
    nbytes = 4 << 20
    with Topology(2, origin_rate=None, host_rate=None,
                  prefix=_prefix()) as topo:
        origin, host0, host1 = topo.all_hosts
        sink, target = _start_sink(host0, 1)
        before = topo.link_bytes()
        [result] = _send(origin, nbytes, target)
        _finish(sink)
        after = topo.link_bytes()
        assert result["reply"] == f"host0 {nbytes}"
        delta = {name: {k: after[name][k] - before[name][k]
                        for k in after[name]} for name in after}
        assert set(delta) == {"origin", "host0", "host1"}
        for value in (delta["origin"]["tx_bytes"],
                      delta["host0"]["rx_bytes"]):
            assert nbytes <= value <= nbytes * 1.06, delta
        # The other way: ACKs and the answer only.
        assert delta["host0"]["tx_bytes"] < nbytes * 0.05, delta
        # What host0 sent, origin received (give or take the last frames
        # of the connection's close, which may still be on their way).
        assert abs(delta["origin"]["rx_bytes"]
                   - delta["host0"]["tx_bytes"]) < 500, delta
        # host1 saw at most some flooding/ARP, not the transfer.
        assert delta["host1"]["rx_bytes"] < 20_000, delta
        # The switch-side reading matches the host's own eth0 counters
        # (read a moment apart: a late frame or two may differ).
        inside = privileged.link_stats(host0.netns)["eth0"]
        now = topo.link_bytes()["host0"]
        for key in ("tx_bytes", "rx_bytes"):
            assert abs(now[key] - inside[key]) < 500, (key, now, inside)
        for key in ("tx_packets", "rx_packets"):
            assert abs(now[key] - inside[key]) <= 5, (key, now, inside)


def _qdiscs(netns: str, dev: str) -> dict:
    """{kind: TCA_OPTIONS} of the qdiscs on ``dev`` in ``netns``."""
    with IPRoute(netns=netns, flags=0) as ipr:
        [index] = ipr.link_lookup(ifname=dev)
        return {q.get_attr("TCA_KIND"): q.get_attr("TCA_OPTIONS")
                for q in ipr.get_qdiscs() if q["index"] == index}


def test_uplinks_shaped_both_ways_and_quiet():
    """A shaped uplink has the tbf of tbf_params at both ends, an unshaped
    one none; no uplink has an IPv6 link-local address (no chatter in the
    byte counts)."""
    with Topology(1, origin_rate="40mbit", host_rate=None,
                  prefix=_prefix()) as topo:
        rate, burst, latency = topology.tbf_params(40_000_000)
        for netns, dev in ((topo.origin.netns, "eth0"),
                           (topo.switch_netns, "p-origin")):
            tbf = _qdiscs(netns, dev)["tbf"].get_attr("TCA_TBF_PARMS")
            assert tbf["rate"] == rate // 8, (dev, tbf)
            # The queue holds `latency` of traffic beyond the bucket.
            assert tbf["limit"] == int(rate // 8 * latency + burst), tbf
        for netns, dev in ((topo.hosts[0].netns, "eth0"),
                           (topo.switch_netns, "p-host0")):
            assert "tbf" not in _qdiscs(netns, dev), dev
        for host in topo.all_hosts:
            with IPRoute(netns=host.netns, flags=0) as ipr:
                [index] = ipr.link_lookup(ifname="eth0")
                addrs = [a.get_attr("IFA_ADDRESS")
                         for a in ipr.get_addr(index=index)]
            assert addrs == [host.address], (host.name, addrs)


HANDLER_RUN = r"""
import os, signal, sys
from vmthunder.bench.topology import Topology

def on_term(signum, frame):         # as the benchmark harness does
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()}\n")
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, on_term)
with Topology(1, prefix=sys.argv[1]) as topo:
    for _ in range(20):
        topo.link_bytes()
print("ok", os.getpid())
"""


def test_netlink_helpers_never_run_the_callers_handlers(tmp_path):
    """pyroute2 forks a helper per namespace it talks to and stops it with
    SIGTERM: a copy of a program whose SIGTERM handler raises must not run
    it (and wander off into the program's own clean-up)."""
    ran = tmp_path / "handler-ran"
    prefix = _prefix()
    proc = subprocess.run([sys.executable, "-c", HANDLER_RUN, prefix,
                           str(ran)], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "ok"
    assert not ran.exists(), ran.read_text()
    assert _namespaces(prefix) == []
