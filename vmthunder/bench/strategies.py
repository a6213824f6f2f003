"""Boot strategies for the benchmark harness, one small class each.

A strategy decides where a host's VMs read their image from. The harness
calls, per host:

- ``precache(host)`` before the clock starts (work an operator does ahead
  of a boot storm; its time is reported apart), then
- ``attach(host, vms)`` once the clock runs: whatever must happen before
  the host's VMs can start (a copy, starting a server); it returns each
  VM's disk as an NBD URI. The VMs start when it returns.
- ``detach(host)`` at the end: stops what attach started, returns stats.

Every VM disk is copy-on-write: the guest writes, the image never changes.
Adding a strategy (the peer-to-peer ones) is one more class in
STRATEGIES.

The origin host serves the image two ways: as a read-only iSCSI LUN
(tgtd, `vmthunder export`) for the strategies that read blocks, and as an
NBD export of the image file (nbdkit, standing in for an image store such
as Glance) for the ones that copy it whole; copies skip holes through NBD
block status, as a download of a sparse or compressed image would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from vmthunder import serve as serve_mod


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class StrategyError(RuntimeError):
    pass


@dataclasses.dataclass
class Origin:
    """Where a strategy finds the image."""
    iscsi_url: str          # the image LUN (with its manifest LUN beside)
    store_uri: str          # nbd://ADDR:PORT: the whole image, for copies
    image_size: int
    config_file: str        # vmthunder config for `vmthunder serve`
    # tooz backend the agents of the peer strategies share (redis://...)
    coordination_url: str | None = None
    # host name -> address, in host order (tree parents, peer endpoints)
    addresses: dict = dataclasses.field(default_factory=dict)
    tree_degree: int = 2


@dataclasses.dataclass
class HostState:
    workdir: str
    # Unix sockets live here: a short path, since sun_path holds only
    # 107 bytes and workdirs (pytest's tmp_path...) can be long.
    sockdir: str = ""
    procs: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)


def wait_listening(proc: subprocess.Popen, ready, where: str, what: str,
                   timeout: float = 30.0, poll_s: float = 0.02) -> None:
    """Wait until ``ready()`` says the server ``proc`` listens at
    ``where``; fail if it exits first or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StrategyError(f"{what} exited with code {proc.returncode}"
                                f" before listening on {where}")
        if time.monotonic() > deadline:
            raise StrategyError(f"{what} not listening on {where} after "
                                f"{timeout:g} s")
        time.sleep(poll_s)


def _wait_for_socket(proc: subprocess.Popen, path: str, what: str) -> None:
    wait_listening(proc, lambda: os.path.exists(path), path, what)


class Strategy:
    name = ""
    summary = ""

    def __init__(self, origin: Origin):
        self.origin = origin
        self.hosts: dict[str, HostState] = {}

    def state(self, host, workdir: str | None = None) -> HostState:
        if host.name not in self.hosts:
            os.makedirs(workdir, exist_ok=True)
            self.hosts[host.name] = HostState(
                workdir, tempfile.mkdtemp(prefix=f"vmt-{host.name}-"))
        return self.hosts[host.name]

    def prepare(self, host, workdir: str) -> None:
        """Before the clock: start what runs on a compute host anyway
        (a host agent), not timed and not counted as precache."""
        self.state(host, workdir)

    def precache(self, host, workdir: str) -> float | None:
        """Work before the clock; its seconds, or None when there is none."""
        self.state(host, workdir)
        return None

    def attach(self, host, workdir: str, vms: list[str]) -> dict[str, str]:
        raise NotImplementedError

    def detach(self, host) -> dict:
        st = self.hosts.get(host.name)
        if st is None:
            return {}
        for proc in reversed(st.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in st.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        st.procs.clear()
        return st.stats

    def cleanup(self) -> None:
        """Remove what the strategy left on disk (the harness's workdir
        goes too; this frees space between strategies)."""
        for st in self.hosts.values():
            shutil.rmtree(st.workdir, ignore_errors=True)
            shutil.rmtree(st.sockdir, ignore_errors=True)
        self.hosts.clear()

    # -- helpers shared by strategies --------------------------------------

    def _servers_per_vm(self, host, st: HostState, vms: list[str],
                        what: str, argv_of, **popen) -> dict[str, str]:
        """Start one NBD server per VM, ``argv_of(sock)``, listening on a
        unix socket; the VMs' disk URIs once all listen."""
        socks = {}
        for vm in vms:
            sock = os.path.join(st.sockdir, f"{vm}.sock")
            proc = host.popen(
                argv_of(sock), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(st.workdir, f"{vm}.log"), "w"),
                **popen)
            st.procs.append(proc)
            socks[vm] = (proc, sock)
        for vm, (proc, sock) in socks.items():
            _wait_for_socket(proc, sock, f"{what} for {vm}")
        return {vm: f"nbd+unix:///?socket={sock}"
                for vm, (_, sock) in socks.items()}

    def _cow_exports_of_file(self, host, st: HostState, path: str,
                             vms: list[str]) -> dict[str, str]:
        """The local image file under a copy-on-write overlay per VM
        (nbdkit's cow filter; the overlay is thrown away)."""
        return self._servers_per_vm(
            host, st, vms, "nbdkit", lambda sock: [
                "nbdkit", "--foreground", "--exit-with-parent", "-U", sock,
                "--filter=cow", "file", path])

    def _copy(self, host, st: HostState) -> float:
        """Copy the image from the origin's store into the host; seconds."""
        path = os.path.join(st.workdir, "image.raw")
        t0 = time.monotonic()
        proc = host.run(["nbdcopy", "--flush", self.origin.store_uri, path],
                        capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise StrategyError(f"{host.name}: copying the image failed: "
                                f"{proc.stderr.strip()}")
        seconds = time.monotonic() - t0
        st.stats["copy_s"] = round(seconds, 3)
        st.stats["image_path"] = path
        return seconds


class CopyStrategy(Strategy):
    name = "copy"
    summary = ("every host copies the whole image from the origin first, "
               "then boots from the local copy (Nova's image cache)")

    def attach(self, host, workdir, vms):
        st = self.state(host, workdir)
        self._copy(host, st)
        return self._cow_exports_of_file(host, st, st.stats["image_path"],
                                         vms)


class PrecacheStrategy(Strategy):
    name = "precache"
    summary = ("the copy happens before the clock starts (Nova's image "
               "pre-caching); boots are local")

    def precache(self, host, workdir):
        st = self.state(host, workdir)
        return self._copy(host, st)

    def attach(self, host, workdir, vms):
        st = self.state(host, workdir)
        return self._cow_exports_of_file(host, st, st.stats["image_path"],
                                         vms)


class DirectStrategy(Strategy):
    name = "direct"
    summary = ("every VM reads straight from the origin's LUN, no local "
               "cache (a plain network volume; QEMU's libiscsi)")

    def attach(self, host, workdir, vms):
        st = self.state(host, workdir)
        # qemu-nbd --snapshot: writes go to a throw-away local overlay.
        return self._servers_per_vm(
            host, st, vms, "qemu-nbd", lambda sock: [
                "qemu-nbd", "--snapshot", "--cache=none", "-f", "raw",
                "-k", sock, self.origin.iscsi_url],
            env=dict(os.environ, TMPDIR=st.workdir))


class LazyStrategy(Strategy):
    name = "lazy"
    summary = ("vmthunder's chain: origin LUN -> one copy-on-read cache per "
               "host -> a snapshot per VM; no sharing between hosts")

    def attach(self, host, workdir, vms):
        st = self.state(host, workdir)
        sock = os.path.join(st.sockdir, "serve.sock")
        st.stats_file = os.path.join(st.workdir, "serve-stats.json")
        argv = [sys.executable, "-m", "vmthunder.cli", "--config-file",
                self.origin.config_file, "serve", self.origin.iscsi_url,
                "--listen", f"unix:{sock}", "--cache-dir",
                os.path.join(st.workdir, "cache"), "--stats-file",
                st.stats_file]
        for vm in vms:
            argv += ["--snapshot", vm]
        proc = host.popen(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, text=True,
                          stderr=open(os.path.join(st.workdir, "serve.log"),
                                      "w"), cwd=_REPO)
        st.procs.append(proc)
        log_path = os.path.join(st.workdir, "serve.log")
        uris = _read_ready(proc, len(vms) + 1, f"vmthunder serve on "
                           f"{host.name}", log_path)
        return {vm: uris[vm] for vm in vms}

    def detach(self, host):
        stats = super().detach(host)
        st = self.hosts.get(host.name)
        path = getattr(st, "stats_file", None)
        if path and os.path.exists(path):
            with open(path) as f:
                served = json.load(f)
            cache = served.get("cache", {})
            stats["bytes_fetched"] = cache.get("bytes_fetched")
            stats["chunks_fetched"] = cache.get("chunks_fetched")
        return stats


def _read_ready(proc: subprocess.Popen, count: int, what: str,
                log_path: str, timeout: float = 60.0) -> dict[str, str]:
    """The export URIs `vmthunder serve` prints when it is ready."""
    uris: dict[str, str] = {}
    for line in _read_lines(proc, count, serve_mod.READY_PREFIX, what,
                            log_path, timeout):
        fields = dict(f.split("=", 1) for f in line.split()[2:])
        uris[fields["export"]] = fields["uri"]
    return uris


def _read_lines(proc: subprocess.Popen, count: int, prefix: str, what: str,
                log_path: str, timeout: float = 60.0) -> list[str]:
    """The first ``count`` lines starting with ``prefix`` that ``proc``
    prints (its ready lines).

    A thread reads the pipe (to its end, so serve never blocks on a full
    pipe): a buffered reader may hold several lines, which select() on
    the pipe would not see."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise StrategyError(f"{what} not ready after {timeout:g} s") \
                from None
        if line is None:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-1500:]
            raise StrategyError(f"{what} exited with code {proc.wait()}; "
                                f"its log ends with:\n{tail}")
        if line.startswith(prefix):
            found.append(line)
    return found


PEER_PORT = 10810


class _AgentStrategy(Strategy):
    """One `vmthunder-agent` per host, serving its image cache to peers;
    the VMs are created through its API."""
    peer_mode = ""
    # [agent] prefetch: read the trace published with the export ahead of
    # the guests (vmthunder/agent/prefetch.py).
    prefetch = False

    def agent_args(self, host) -> list[str]:
        return []

    def prepare(self, host, workdir):
        """The agent is a daemon already running on the host."""
        from vmthunder.agent import main as agent_main
        st = self.state(host, workdir)
        conf = os.path.join(st.workdir, "agent.conf")
        with open(self.origin.config_file) as f:
            base = f.read()
        with open(conf, "w") as f:
            f.write(base + "\n[coordination]\n"
                    f"backend_url = {self.origin.coordination_url}\n"
                    f"member_id = {host.name}\nheartbeat_interval = 0.25\n"
                    "[agent]\npeer_timeout = 2.0\n"
                    f"prefetch = {str(self.prefetch).lower()}\n"
                    # Membership rounds every 0.25 s here (above).
                    "prefetch_settle_seconds = 0.6\n")
        api = os.path.join(st.sockdir, "api.sock")
        argv = [sys.executable, "-m", "vmthunder.agent", "--config-file",
                conf, "--state-dir", os.path.join(st.workdir, "state"),
                "--api-socket", api, "--hypervisor-listen",
                f"unix:{os.path.join(st.sockdir, 'nbd.sock')}",
                "--peer-listen", f"tcp:{host.address}:{PEER_PORT}",
                "--cache-dir", os.path.join(st.workdir, "cache"),
                "--peer-mode", self.peer_mode, *self.agent_args(host)]
        log_path = os.path.join(st.workdir, "agent.log")
        proc = host.popen(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, text=True,
                          stderr=open(log_path, "w"), cwd=_REPO)
        st.procs.append(proc)
        _read_lines(proc, 1, agent_main.READY_PREFIX,
                    f"vmthunder-agent on {host.name}", log_path)
        st.api = api

    def attach(self, host, workdir, vms):
        from vmthunder.agent import client as client_mod
        st = self.state(host, workdir)
        agent = client_mod.AgentClient(st.api, timeout=120)
        agent.attach_image("image", self.origin.iscsi_url)
        return {vm: agent.create_vm(vm, "image")["nbd"] for vm in vms}

    def detach(self, host):
        st = self.hosts.get(host.name)
        stats = {}
        api = getattr(st, "api", None)
        if api:
            from vmthunder.agent import client as client_mod
            with contextlib.suppress(Exception):
                image = client_mod.AgentClient(api).status()["images"]
                stats = image[0] if isinstance(image, list) else \
                    image.get("image", {})
        return dict(super().detach(host), **stats)


class VmthunderStrategy(_AgentStrategy):
    name = "vmthunder"
    summary = ("lazy + peers: a missing chunk comes from a host holding it "
               "(found through tooz/Redis), else the origin; every chunk "
               "checked against the manifest")
    peer_mode = "mesh"


class VmthunderPrefetchStrategy(VmthunderStrategy):
    name = "vmthunder-prefetch"
    summary = ("vmthunder + trace prefetch: at VM create each agent reads "
               "the boot trace published with the export ahead of its "
               "guests, through the same owners and peers, always behind "
               "their reads")
    prefetch = True


class TreeStrategy(_AgentStrategy):
    name = "tree"
    summary = ("the original VMThunder topology: each host reads only from "
               "a fixed parent in a tree (--tree-degree), the root from the "
               "origin")
    peer_mode = "tree"

    def agent_args(self, host) -> list[str]:
        names = list(self.origin.addresses)
        i = names.index(host.name)
        if i == 0:
            return []
        parent = names[(i - 1) // self.origin.tree_degree]
        return ["--peer-parent",
                f"tcp:{self.origin.addresses[parent]}:{PEER_PORT}"]


STRATEGIES = {cls.name: cls for cls in (
    CopyStrategy, PrecacheStrategy, DirectStrategy, LazyStrategy,
    VmthunderStrategy, VmthunderPrefetchStrategy, TreeStrategy)}
