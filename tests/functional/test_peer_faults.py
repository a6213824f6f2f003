"""Peer faults with real agents: hosts in network namespaces, the small
guest's root image exported by tgtd on the origin, Redis on the origin for
membership, one `vmthunder-agent` per host in mesh mode.

A "VM" is the small guest's boot trace replayed against the VM's NBD
export (vmthunder.bench.replay: the reads, writes and flushes of a real
boot, with its think times). Data is checked by reading the VM's disk
where the image has data (and where the VM wrote) and comparing it with
the image file plus what was written: an unwritten area of a VM's disk
equals the image.

The DESIGN promise under test: "a dead or slow peer costs a retry
elsewhere, never an I/O error in the guest"; chunks from peers are checked
against the manifest; per-VM snapshots never leave their host.

Every agent a test starts is stopped when the test ends, pass or fail; the
topology, tgtd and Redis are torn down at the end of the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.functional.conftest import REPO, need

# Also the mark of the modules that use this one's mesh (mesh_net).
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0,
                                reason="network namespaces, tgtd and "
                                       "agents listening in them need root")
pytestmark = NEEDS_ROOT

CHUNK = 256 * 1024
IMAGE = "image"
PEER_PORT = 10810
TRACE_PATH = os.path.join(REPO, "vmthunder", "bench", "traces",
                          "busybox-small.trace.gz")


def _trace():
    from vmthunder import trace as trace_mod
    from vmthunder.bench import vmhost
    return vmhost.until_boot(trace_mod.load(TRACE_PATH))


# -- what a VM's disk must hold -------------------------------------------

def data_extents(path: str) -> list[tuple[int, int]]:
    """(offset, length) of the data (not holes) of ``path``."""
    out, pos = [], 0
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    return out


def data_chunks(path: str) -> set[int]:
    """The chunks of ``path`` holding some data."""
    return {i for off, n in data_extents(path)
            for i in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


def trace_writes(trace) -> list[tuple[int, bytes]]:
    """What a successful replay of ``trace`` wrote, in issue order."""
    from vmthunder.bench.replay import _payload
    return [(r.offset, bytes(_payload(r.length))) for r in trace.requests
            if r.op == "W"]


class Expected:
    """The bytes a VM's disk must hold: the image, then its writes."""

    def __init__(self, image: str, writes=()):
        self.image = image
        self.writes = list(writes)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            buf = bytearray(os.pread(f.fileno(), length, offset))
        buf += bytes(length - len(buf))
        for w_off, data in self.writes:
            lo, hi = max(offset, w_off), min(offset + length,
                                             w_off + len(data))
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - w_off:hi - w_off]
        return bytes(buf)

    def ranges(self) -> list[tuple[int, int]]:
        """Where to look: the image's data, what was written, and a few
        holes (which must read as zeros)."""
        ranges = list(data_extents(self.image))
        ranges += [(off, len(data)) for off, data in self.writes]
        size = os.path.getsize(self.image)
        ranges += [(size // 2, 65536), (size - 65536, 65536)]
        return ranges


async def check_disk(uri: str, expected: Expected, piece: int = 1 << 20,
                     parallel: int = 8) -> int:
    """Read ``expected.ranges()`` of the NBD export ``uri`` (one
    connection, ``parallel`` requests in flight) and compare; bytes
    checked. Raises AssertionError naming the first differing offset."""
    from vmthunder.nbd.client import open_nbd
    pieces = [(off + p, min(piece, length - p))
              for off, length in expected.ranges()
              for p in range(0, length, piece)]
    client = await open_nbd(uri)
    sem = asyncio.Semaphore(parallel)
    bad: list[str] = []

    async def one(off: int, length: int) -> None:
        async with sem:
            got = await client.read(off, length)
        want = expected.read(off, length)
        if got != want:
            first = next(i for i in range(length) if got[i] != want[i])
            bad.append(f"{uri}: {length} bytes at {off} differ from the "
                       f"expected data from byte {off + first} on")
    try:
        await asyncio.gather(*(one(o, n) for o, n in pieces))
    finally:
        await client.close()
    assert not bad, bad[:3]
    return sum(n for _, n in pieces)


async def boot(uri: str, trace, speed: float = 1.0) -> dict:
    from vmthunder.bench.replay import replay_nbd
    return await replay_nbd(trace, uri, speed=speed)


def run(coro, timeout: float = 60):
    """Run ``coro`` to completion in a fresh loop, bounded."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def assert_booted(results: dict) -> None:
    for vm, r in results.items():
        assert not r["failed"] and r["errors"] == 0 \
            and r["boot_s"] is not None, (vm, r)


def wait_for(check, what: str, timeout: float = 15, poll: float = 0.1):
    """Poll ``check()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:            # noqa: BLE001 - retried
            last = exc
        else:
            if last:
                return last
        time.sleep(poll)
    raise AssertionError(f"{what}: not after {timeout} s (last: {last!r})")


# -- the network: origin (tgtd, Redis) + hosts ----------------------------

@dataclasses.dataclass
class Net:
    topo: object
    origin: object              # harness.OriginHost
    image: str
    coordination: str
    config_file: str
    workdir: str

    @property
    def hosts(self):
        return self.topo.hosts

    def restart_redis(self) -> None:
        """Kill Redis (no persistence: the group is gone) and start a new
        one on the same address and port."""
        old = self.origin.redis
        old.kill()
        old.wait(10)
        self.origin.redis = None
        self.origin.start_redis(self.workdir)

    def members(self, host) -> dict:
        """The peer group as a host sees it (`membership list --json`)."""
        proc = host.run([sys.executable, "-m", "vmthunder.agent.membership",
                         "--backend", self.coordination, "list", "--json"],
                        capture_output=True, text=True, timeout=20, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip())
        return json.loads(proc.stdout)

    def stop_tgtd(self) -> None:
        self.origin.cfg.tgt().stop()

    def restore_tgtd(self) -> None:
        from vmthunder.volume import export as export_mod
        # Idempotent: starts tgtd and re-creates the target.
        export_mod.export_image(self.origin.cfg, self.image, IMAGE,
                                chunk_size=CHUNK, out=lambda text: None)


@contextlib.contextmanager
def mesh_net(image: str | None, hosts: int, prefix: str, *,
             make=None, origin_rate: str = "200mbit"):
    """A shaped mesh of ``hosts`` namespaces: the image exported by an
    origin host (tgtd, manifest LUN 2) and Redis for membership, all
    torn down after. ``make(workdir)`` writes the image when ``image``
    is None. By default the origin's link is the bottleneck (200 Mbit/s,
    hosts 1 Gbit/s), as in the benchmark."""
    from vmthunder.bench import harness
    from vmthunder.bench import topology as topo_mod
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")
    if image is None:
        image = make(workdir)
    conf = os.path.join(workdir, "vmthunder.conf")
    with open(conf, "w") as f:
        f.write(f"[cache]\nchunk_size = {CHUNK}\n[iscsi]\nmanifest_lun = 2\n")
    topo = topo_mod.Topology(hosts, origin_rate=origin_rate,
                             host_rate="1gbit", prefix=prefix.replace("-", ""))
    origin = None
    try:
        topo.create()
        origin = harness.OriginHost(topo, workdir, image, CHUNK)
        coordination = origin.start_redis(workdir)
        yield Net(topo, origin, image, coordination, conf, workdir)
    finally:
        try:
            if origin is not None:
                origin.stop()
        finally:
            topo.destroy()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def net(guest_dir):
    need("tgtd", "tgtadm", "redis-server", "nbdkit", "nbdinfo")
    with mesh_net(os.path.join(guest_dir, "root.img"), 4, "vmt-pf") as net:
        yield net


# -- agents ---------------------------------------------------------------

class Agent:
    """One vmthunder-agent in a host namespace (mesh mode, peers on
    tcp:ADDRESS:10810), its state and cache kept across restarts."""

    def __init__(self, net: Net, host, root: str):
        self.net = net
        self.host = host
        self.dir = os.path.join(root, host.name)
        os.makedirs(self.dir, exist_ok=True)
        # sun_path holds 107 bytes: sockets go to a short directory.
        self.sockdir = tempfile.mkdtemp(prefix=f"vmtpf-{host.name}-",
                                        dir="/tmp")
        self.api = os.path.join(self.sockdir, "api.sock")
        self.cache_dir = os.path.join(self.dir, "cache")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.conf = os.path.join(self.dir, "agent.conf")
        with open(net.config_file) as f:
            base = f.read()
        with open(self.conf, "w") as f:
            f.write(base + "\n[coordination]\n"
                    f"backend_url = {net.coordination}\n"
                    f"member_id = {host.name}\nheartbeat_interval = 0.25\n"
                    "[agent]\npeer_timeout = 2.0\n")
        self.proc: subprocess.Popen | None = None
        self.peer_uri = f"nbd://{host.address}:{PEER_PORT}"

    def start(self, timeout: float = 45) -> Agent:
        from vmthunder.agent import main as agent_main
        from vmthunder.bench import strategies as strat_mod
        argv = [sys.executable, "-m", "vmthunder.agent", "-v",
                "--config-file", self.conf,
                "--state-dir", os.path.join(self.dir, "state"),
                "--api-socket", self.api,
                "--hypervisor-listen",
                f"unix:{os.path.join(self.sockdir, 'nbd.sock')}",
                "--peer-listen", f"tcp:{self.host.address}:{PEER_PORT}",
                "--cache-dir", self.cache_dir, "--peer-mode", "mesh"]
        with open(self.log_path, "a") as log:
            log.write(f"==== start {time.strftime('%H:%M:%S')}\n")
            log.flush()
            self.proc = self.host.popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True,
                                        stderr=log, cwd=REPO)
        try:
            strat_mod._read_lines(self.proc, 1, agent_main.READY_PREFIX,
                                  f"vmthunder-agent on {self.host.name}",
                                  self.log_path, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    @property
    def client(self):
        from vmthunder.agent.client import AgentClient
        return AgentClient(self.api, timeout=60)

    def attach(self) -> dict:
        return self.client.attach_image(IMAGE, self.net.origin.iscsi_url)

    def create_vm(self, name: str) -> str:
        return self.client.create_vm(name, IMAGE)["nbd"]

    def status(self) -> dict:
        return self.client.status()["images"][IMAGE]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@contextlib.contextmanager
def configured_agents(net, root: str):
    """Factory: start(host, extra [agent] lines) -> an Agent started
    with those lines, the image attached; all stopped after, and then
    their logs must hold no internal error."""
    started: list[Agent] = []

    def start(host, agent_lines: str = "") -> Agent:
        agent = Agent(net, host, root)
        started.append(agent)
        # The agent's config ends in its [agent] section.
        with open(agent.conf, "a") as f:
            f.write(agent_lines)
        agent.start()
        agent.attach()
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.cleanup()
    problems = [f"{agent.host.name}: {line}" for agent in started
                if os.path.exists(agent.log_path)
                for line in agent.log().splitlines()
                if " ERROR " in line or line.startswith("Traceback")]
    assert not problems, problems[:10]


@pytest.fixture
def agents(net, tmp_path):
    """Factory: agents(host0, host1, ...) -> [Agent] started in parallel,
    the image attached; all stopped at the end of the test."""
    started: list[Agent] = []

    def factory(*hosts, attach: bool = True) -> list[Agent]:
        made = [Agent(net, h, str(tmp_path)) for h in hosts]
        started.extend(made)
        errors: list[BaseException] = []

        def one(agent):
            try:
                agent.start()
                if attach:
                    agent.attach()
            except BaseException as exc:    # noqa: BLE001 - re-raised
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(a,)) for a in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        if errors:
            raise errors[0]
        return made

    yield factory
    for agent in started:
        agent.cleanup()
    # A SIGKILLed agent leaves its member entry until its lease expires
    # (membership_timeout=3): let it go before the next test's agents
    # look for peers.
    crashed = {a.host.name for a in started
               if a.proc is not None and a.proc.returncode == -signal.SIGKILL}
    if crashed:
        wait_for(lambda: not crashed & set(net.members(net.hosts[0])),
                 f"the member entries of {sorted(crashed)} to expire",
                 timeout=15, poll=0.25)
    # Faults are the peers' business, never an internal error of an agent
    # (a request handler's exception is logged as ERROR with a traceback).
    problems = [f"{agent.host.name}: {line}" for agent in started
                if os.path.exists(agent.log_path)
                for line in agent.log().splitlines()
                if " ERROR " in line or line.startswith("Traceback")]
    if problems:
        pytest.fail("agents logged internal errors (their agent.log is "
                    f"under {tmp_path}):\n" + "\n".join(problems[:10]),
                    pytrace=False)


def wait_for_held(agent: Agent, chunks: int, timeout: float = 15) -> dict:
    """Wait until ``agent`` has marked ``chunks`` chunks held (marks
    follow the data's fdatasync, in the background)."""
    return wait_for(lambda: (s := agent.status())["chunks_held"] >= chunks
                    and s, f"{agent.host.name} holding {chunks} chunks",
                    timeout)


def peer_failures(agent: Agent, peer: Agent) -> list[str]:
    """Warnings ``agent`` logged about ``peer`` (ImageVolume's
    _peer_failed: "... peer URI: why; avoiding it for N s")."""
    uri = f"{peer.peer_uri}/{IMAGE}"
    return [line for line in agent.log().splitlines()
            if f"peer {uri}:" in line and "avoiding it" in line]


# -- the tests ------------------------------------------------------------

def test_peer_killed_mid_read_every_vm_still_boots(net, agents):
    """Host A reads its whole disk (its cache holds every chunk with
    data); B and C boot two VMs each, reading from A, and in the middle of
    the boot's burst of reads A is frozen, then SIGKILLed, with requests
    of B and C in flight to it. Every VM boots, no guest request fails,
    and then every byte of their disks (read from the survivors and the
    origin) is right."""
    trace = _trace()
    a, b, c = agents(*net.hosts[:3])
    image = Expected(net.image)
    booted = Expected(net.image, trace_writes(trace))
    a_vm = a.create_vm("a-vm0")
    run(check_disk(a_vm, image))
    wait_for_held(a, len(data_chunks(net.image)))
    vms = {f"{h.host.name}-vm{i}": h.create_vm(f"{h.host.name}-vm{i}")
           for h in (b, c) for i in range(2)}
    killed = {}

    def kill_a():
        # Freeze A first: the reads B and C send it now stay in flight
        # (their status of A says it holds every chunk), then SIGKILL it.
        a.signal(signal.SIGSTOP)
        killed["at"] = time.monotonic()
        time.sleep(0.3)
        a.signal(signal.SIGKILL)
    killer = threading.Thread(target=kill_a)
    # The boot's burst of reads starts after the bootloader's two reads
    # and the kernel's decompression (~2.7 s): A is frozen when host1-vm0
    # issues the burst's 3rd read, killed 0.3 s later.
    trigger = [i for i, r in enumerate(trace.requests, 1)
               if r.op == "R"][4]

    def hook(n):
        if n == trigger:
            killer.start()

    async def vm(name, uri):
        from vmthunder.bench.replay import replay
        disk = await ReconnectingDisk(uri, reconnect_s=0).open()
        if name == "host1-vm0":
            disk.on_request = hook
        try:
            result = await replay(trace, disk)
        finally:
            await disk.close()
        result["reconnects"] = disk.reconnects
        if not result["failed"]:
            result["checked"] = await check_disk(uri, booted)
        return result

    async def scenario():
        results = await asyncio.gather(*(vm(n, u) for n, u in vms.items()))
        if killer.ident is not None:
            await asyncio.to_thread(killer.join, 10)
        return dict(zip(vms, results))

    results = run(scenario(), timeout=90)
    assert_booted(results)
    assert "at" in killed, "A was never killed"
    a.proc.wait(10)
    assert a.proc.returncode == -signal.SIGKILL
    assert b.alive() and c.alive()
    sb, sc = b.status(), c.status()
    # A served some before it died (the bootloader's reads at least)...
    assert sb["bytes_from_peers"] + sc["bytes_from_peers"] > 0, (sb, sc)
    assert sb["fetch_errors"] == sc["fetch_errors"] == 0, (sb, sc)
    assert all(r["reconnects"] == 0 for r in results.values()), results
    # ...and its death was a retry elsewhere for reads in flight to it.
    failures = peer_failures(b, a) + peer_failures(c, a)
    in_flight = [f for f in failures if "cannot connect" not in f]
    assert in_flight, failures


def test_corrupting_peer_is_detected(net, agents):
    """A's cache file is damaged behind its back (the cache trusts its
    own file, so A serves wrong bytes to peers). B's VMs still read the
    right data: B checks every chunk against the manifest, counts the
    mismatches and avoids A."""
    trace = _trace()
    a, b = agents(*net.hosts[:2])
    a_vm = a.create_vm("a-vm0")
    run(check_disk(a_vm, Expected(net.image)))
    chunks = len(data_chunks(net.image))
    wait_for_held(a, chunks)
    # Corrupt every chunk A holds once its marks are on disk (then its
    # data is in the data file, read from there).
    # (The image's cache, not its digest table's.)
    key_dir = a.status()["cache_dir"]
    map_path = os.path.join(key_dir, "map")

    def marks():
        with open(map_path, "rb") as f:
            return f.read()
    wait_for(lambda: marks().count(1) >= chunks, "A's chunk map on disk",
             timeout=15)
    held = [i for i, v in enumerate(marks()) if v == 1]
    fd = os.open(os.path.join(key_dir, "data"), os.O_RDWR)
    try:
        for i in held:
            for off in range(0, CHUNK, 4096):
                pos = i * CHUNK + off
                old = os.pread(fd, 16, pos)
                os.pwrite(fd, bytes(x ^ 0x5A for x in old), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    served_before = a.status()["bytes_served_to_peers"]
    # (B may hold a few chunks already: fetched for A, as their owner.)
    sb0 = b.status()
    vms = {f"b-vm{i}": b.create_vm(f"b-vm{i}") for i in range(2)}
    booted = Expected(net.image, trace_writes(trace))

    async def scenario():
        results = await asyncio.gather(*(boot(u, trace) for u in
                                         vms.values()))
        for u in vms.values():
            await check_disk(u, booted)
        return dict(zip(vms, results))

    results = run(scenario(), timeout=90)
    assert_booted(results)
    sa, sb = a.status(), b.status()
    # A did serve B (wrong bytes)...
    assert sa["bytes_served_to_peers"] > served_before, sa
    # ...none of which B took: what it fetched since came from the origin.
    assert sb["bytes_from_peers"] == sb0["bytes_from_peers"], (sb0, sb)
    assert sb["bytes_from_origin"] > sb0["bytes_from_origin"], (sb0, sb)
    assert sb["verify_errors"] == 0 and sb["fetch_errors"] == 0, sb
    failures = peer_failures(b, a)
    assert failures and all("do not match the manifest" in line
                            for line in failures), failures
    # Avoided: after the first mismatch B stops asking A (avoid_s=30),
    # so it logged a failure per read already in flight to A then (a
    # few: two VMs read at once), not one per chunk read.
    assert len(failures) <= 8, failures
    peer_stats = sb.get("peer_errors")
    if peer_stats is not None:          # when the status reports them
        assert peer_stats.get("mismatch", 0) > 0, sb


def test_origin_gone_after_working_set_is_on_peers(net, agents):
    """A and B boot (A also reads its whole disk); then tgtd on the origin
    stops. C, attached before, boots two VMs and reads a whole disk from
    the peers alone."""
    trace = _trace()
    a, b, c = agents(*net.hosts[:3])
    a_vms = [a.create_vm("a-vm0"), a.create_vm("a-vm1")]
    b_vm = b.create_vm("b-vm0")
    booted = Expected(net.image, trace_writes(trace))

    async def first():
        results = await asyncio.gather(boot(a_vms[0], trace, speed=4),
                                       boot(b_vm, trace, speed=4))
        await check_disk(a_vms[1], Expected(net.image))
        return results
    assert_booted(dict(enumerate(run(first()))))
    c_vms = {f"c-vm{i}": c.create_vm(f"c-vm{i}") for i in range(2)}
    origin_before = c.status()["bytes_from_origin"]
    net.stop_tgtd()
    try:
        assert not net.origin.cfg.tgt().running()
        async def second():
            results = await asyncio.gather(*(boot(u, trace) for u in
                                             c_vms.values()))
            for u in c_vms.values():
                await check_disk(u, booted)
            return dict(zip(c_vms, results))
        results = run(second(), timeout=90)
        sc = c.status()
    finally:
        net.restore_tgtd()
    assert_booted(results)
    assert sc["bytes_from_origin"] == origin_before, sc
    assert sc["bytes_from_peers"] > 0 and sc["fetch_errors"] == 0, sc


class ReconnectingDisk:
    """What QEMU's NBD client does with ``reconnect-delay=N``: a request
    that fails because the connection is gone is held while it reconnects
    (every 0.1 s, up to ``reconnect_s``) and then sent again. Error
    replies of a live server are not retried."""

    def __init__(self, uri: str, reconnect_s: float = 30.0):
        self.uri = uri
        self.reconnect_s = reconnect_s
        self.client = None
        self.size = 0
        self.reconnects = 0
        self.requests = 0
        self.on_request = None
        self._lock = asyncio.Lock()

    async def open(self):
        from vmthunder.nbd.client import open_nbd
        self.client = await open_nbd(self.uri)
        self.size = self.client.size
        return self

    async def _reconnect(self, broken) -> None:
        from vmthunder.nbd.client import open_nbd
        async with self._lock:
            if self.client is not broken:
                return              # another request reconnected already
            deadline = time.monotonic() + self.reconnect_s
            while True:
                try:
                    self.client = await open_nbd(self.uri, timeout=2)
                except Exception:               # noqa: BLE001 - retried
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
                    continue
                self.reconnects += 1
                with contextlib.suppress(Exception):
                    await broken.close(timeout=0.5)
                return

    async def _call(self, op: str, *args):
        from vmthunder.nbd.client import NbdConnectionError
        self.requests += 1
        if self.on_request is not None:
            self.on_request(self.requests)
        while True:
            client = self.client
            try:
                return await getattr(client, op)(*args)
            except NbdConnectionError:
                await self._reconnect(client)

    async def read(self, offset, length):
        return await self._call("read", offset, length)

    async def write(self, offset, data):
        return await self._call("write", offset, data)

    async def flush(self):
        return await self._call("flush")

    async def close(self):
        if self.client is not None:
            await self.client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL],
                         ids=["sigterm", "sigkill"])
def test_agent_restart_mid_boot(net, agents, sig):
    """A VM writes known data and flushes; its boot replay starts; in the
    middle of the boot's burst of reads its agent is stopped (SIGTERM:
    clean stop; SIGKILL: crash) and started again on the same state and
    cache directories. The VM's disk comes back under the same NBD URI,
    the requests made meanwhile are served once it is back, the boot
    completes, and the flushed data is intact.

    What a hypervisor sees: the NBD connection drops; QEMU's NBD client
    with ``reconnect-delay=N`` (the agent's Nova driver sets it) holds the
    guest's requests and reconnects to the same unix socket, so the guest
    sees a stall of the agent's restart time, not an I/O error. Without
    reconnect-delay, requests during the outage fail with EIO in the
    guest. After SIGKILL, writes acknowledged but not yet flushed may be
    lost (the same contract as a disk's volatile write cache); flushed
    ones are not."""
    from vmthunder.bench.replay import replay
    trace = _trace()
    [a] = agents(net.hosts[3])
    uri = a.create_vm("vm0")
    secret = os.urandom(256 * 1024)
    mine = [(50 << 20, secret), (10 << 20, secret[:65536])]  # hole, data
    restarted = {}

    def restart():
        try:
            t0 = time.monotonic()
            a.signal(sig)
            a.proc.wait(20)
            restarted["code"] = a.proc.returncode
            a.start()
            restarted["s"] = time.monotonic() - t0
        except BaseException as exc:        # noqa: BLE001 - reported
            restarted["error"] = exc

    async def scenario():
        disk = await ReconnectingDisk(uri).open()
        try:
            for off, data in mine:
                await disk.write(off, data)
            await disk.flush()
            reads = [i for i, r in enumerate(trace.requests, 1)
                     if r.op == "R"]
            # The 6th read: the boot's burst has begun (the first reads
            # are the bootloader's, then the kernel decompresses).
            trigger = reads[5]
            thread = []

            def hook(n):
                if n == trigger and not thread:
                    thread.append(threading.Thread(target=restart))
                    thread[0].start()
            disk.on_request = hook
            result = await replay(trace, disk)
            await asyncio.to_thread(lambda: [t.join(60) for t in thread])
            result["reconnects"] = disk.reconnects
            return result
        finally:
            await disk.close()

    result = run(scenario(), timeout=120)
    assert "error" not in restarted, restarted
    assert restarted["code"] == (0 if sig == signal.SIGTERM else -sig)
    assert not result["failed"] and result["errors"] == 0, result
    assert result["reconnects"] >= 1, result
    assert a.client.vms()[0]["nbd"] == uri
    if sig == signal.SIGTERM:
        # A clean stop flushed everything: the boot's writes are there too.
        expected = Expected(net.image, mine + trace_writes(trace))
    else:
        # After a crash only flushed data is promised: check the image
        # and our flushed data, not the boot's last (unflushed) writes.
        expected = Expected(net.image, mine)
        written = trace_writes(trace)
        expected.ranges = lambda: [
            (o, n) for o, n in Expected.ranges(expected)
            if not any(o < wo + len(d) and wo < o + n for wo, d in written)]
    run(check_disk(uri, expected))


def test_redis_restart_membership_recovers(net, agents):
    """Redis (no persistence) is killed and started again: the agents
    re-create the group and re-join on their own; a host started after
    that finds A through membership and reads chunks from it."""
    a, b = agents(*net.hosts[:2])
    run(check_disk(a.create_vm("a-vm0"), Expected(net.image)))

    def both_listed():
        members = net.members(net.hosts[2])
        return all(m in members and IMAGE in members[m]["images"]
                   for m in ("host0", "host1")) and members
    wait_for(both_listed, "host0 and host1 in the group", timeout=10)
    t0 = time.monotonic()
    net.restart_redis()
    members = wait_for(both_listed, "host0 and host1 back in the group "
                       "after the Redis restart", timeout=20, poll=0.25)
    recovered_s = time.monotonic() - t0
    assert f"{net.hosts[0].address}:{PEER_PORT}" in \
        members["host0"]["endpoint"], members
    [c] = agents(net.hosts[2])
    trace = _trace()
    uri = c.create_vm("c-vm0")

    async def scenario():
        result = await boot(uri, trace, speed=4)
        await check_disk(uri, Expected(net.image, trace_writes(trace)))
        return result
    assert_booted({"c-vm0": run(scenario())})
    sc = c.status()
    assert sc["bytes_from_peers"] > 0, sc
    assert recovered_s < 20


_PEEK = r"""
import asyncio, json, sys
from vmthunder.nbd.client import open_nbd, list_exports
address, names, offset, length = sys.argv[1], json.loads(sys.argv[2]), \
    int(sys.argv[3]), int(sys.argv[4])

async def main():
    out = {"listed": [e.name for e in await list_exports(address,
                                                          timeout=5)]}
    for name in out["listed"] + names:
        try:
            client = await open_nbd(address, name, timeout=5)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        try:
            data = await client.read(offset, length)
            out[name] = {"size": client.size, "data": data.hex()}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            await client.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_vm_snapshot_is_not_readable_through_peer_endpoints(net, agents):
    """A VM on A writes a secret where the image has data. From B's
    namespace, A's peer endpoint lists only the image (and its manifest's
    digest table); the VM's name (and
    other guesses) open nothing; the image export at the secret's offset
    returns the image's bytes, never the secret."""
    a, = agents(net.hosts[0])
    uri = a.create_vm("tenant-vm")
    offset = 10 << 20                   # inside the image's data
    assert any(o <= offset < o + n for o, n in data_extents(net.image))
    secret = b"TENANT-SECRET!" * (65536 // 14) + b"\0" * (65536 % 14)

    async def write_secret():
        from vmthunder.nbd.client import open_nbd
        client = await open_nbd(uri)
        try:
            await client.write(offset, secret)
            await client.flush()
            assert await client.read(offset, len(secret)) == secret
            # Make A's cache hold the chunks around it too.
            await client.read(offset - CHUNK, 3 * CHUNK)
        finally:
            await client.close()
    run(write_secret())
    run(check_disk(a.create_vm("other-vm"), Expected(net.image)))
    b = net.hosts[1]
    address = f"tcp:{net.hosts[0].address}:{PEER_PORT}"
    guesses = ["tenant-vm", "", "other-vm", "snapshots/tenant-vm",
               "image/tenant-vm", "../tenant-vm", "tenant-vm.overlay"]
    proc = b.run([sys.executable, "-c", _PEEK, address, json.dumps(guesses),
                  str(offset), str(len(secret))], capture_output=True,
                 text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    # (and the image's recorded boot trace, chunk numbers of the image,
    # once a recording of A's has ended: agent/trace_recording.py)
    shared = [IMAGE, f"{IMAGE}@digests"]
    recorded = f"{IMAGE}@boot-trace"
    assert [n for n in out["listed"] if n != recorded] == shared, \
        out["listed"]
    image_bytes = Expected(net.image).read(offset, len(secret))
    assert out[IMAGE].get("data") == image_bytes.hex(), out[IMAGE]
    for name in guesses:
        # Refused at the handshake: no such export.
        assert set(out[name]) == {"error"}, (name, out[name].get("size"))
    # The same with libnbd's tools, as an operator would look.
    nbd = f"nbd://{net.hosts[0].address}:{PEER_PORT}"
    listing = b.run(["nbdinfo", "--list", "--json", nbd],
                    capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    names = [e["export-name"] for e in json.loads(listing.stdout)["exports"]]
    assert [n for n in names if n != recorded] == shared, names
    direct = b.run(["nbdinfo", f"{nbd}/tenant-vm"], capture_output=True,
                   text=True, timeout=30)
    assert direct.returncode != 0, direct.stdout


def test_one_content_under_two_export_names_is_one_image(net, agents):
    """The origin exports the same image again under another name: an
    agent holding it as IMAGE refuses the other name with an error that
    names the image to use (one cache per content and host), and keeps
    serving IMAGE."""
    from vmthunder.agent.client import AgentError
    from vmthunder.volume import export as export_mod
    alias = export_mod.export_image(net.origin.cfg, net.image, "image-alias",
                                    chunk_size=CHUNK, out=lambda text: None)
    a, = agents(net.hosts[0])
    with pytest.raises(AgentError) as info:
        a.client.attach_image("alias", alias.record.url(1))
    assert info.value.status == 409, info.value
    message = str(info.value)
    assert "holds the same content as image 'image'" in message, message
    assert "use that name" in message, message
    assert "another vmthunder process" not in message, message
    assert sorted(i["name"] for i in a.client.images()) == [IMAGE]
    run(check_disk(a.create_vm("vm-after"), Expected(net.image)))
