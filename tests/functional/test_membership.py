"""vmthunder.agent.membership against real coordination servers, Redis
and etcd (tooz's redis and etcd3gw drivers), and the embedded file
backend.

The tests taking ``backend`` run once per server: each starts its own
redis-server (no persistence) or etcd (its own data directory) on free
loopback ports and stops it at the end, pass or fail, the etcd data
directory removed. Leases are short (2 s) so that crashes are noticed
quickly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from vmthunder.agent import membership as ms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
LEASE = 2.0
BEAT = 0.2


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    proc: subprocess.Popen | None = None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def clean(self):
        self.kill()


class RedisServer(_Server):
    binary = "redis-server"
    package = "redis-server"

    def __init__(self, tmp_path):
        self.port = _free_port()
        self.log = tmp_path / "redis.log"
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return (f"redis://127.0.0.1:{self.port}?timeout=2"
                f"&membership_timeout={LEASE}")

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port),
                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.dir)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: "
                                   + self.log.read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port),
                                              timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")


class EtcdServer(_Server):
    """etcd (Debian's etcd-server), one member, on free loopback ports
    with a data directory of its own; kill() keeps the data (a restart
    finds the group), clean() removes it."""

    binary = "etcd"
    package = "etcd-server"

    def __init__(self, tmp_path):
        self.port = _free_port()
        # Two free ports in a row can be the same one (nothing holds the
        # first between the calls).
        self.peer_port = _free_port()
        while self.peer_port == self.port:
            self.peer_port = _free_port()
        self.log = tmp_path / "etcd.log"
        self.data_dir = tmp_path / "etcd-data"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        # tooz's etcd3gw driver: leases in whole seconds.
        return (f"etcd3+http://127.0.0.1:{self.port}?timeout=2"
                f"&membership_timeout={int(LEASE)}")

    def start(self):
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "test", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client,
                 "--advertise-client-urls", client,
                 "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}"],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("etcd exited: "
                                   + self.log.read_text()[-2000:])
            try:
                with urllib.request.urlopen(client + "/health",
                                            timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not report healthy: "
                           + self.log.read_text()[-2000:])

    def clean(self):
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


SERVERS = {"redis": RedisServer, "etcd": EtcdServer}


def make_server(kind: str, tmp_path):
    """A coordination server of ``kind``, not started; skips when its
    binary is not installed."""
    cls = SERVERS[kind]
    if shutil.which(cls.binary) is None:
        pytest.skip(f"{cls.binary} not installed (Debian: apt-get install "
                    f"{cls.package}; scripts/install.sh does)")
    return cls(tmp_path)


@pytest.fixture(params=sorted(SERVERS))
def backend(request, tmp_path):
    """A running Redis or etcd (each test runs with both)."""
    server = make_server(request.param, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.clean()


class Member:
    """A member in a subprocess (`python -m ... join`), SIGKILLable."""

    def __init__(self, url, member_id, endpoint, images, tmp_path):
        self.stderr = open(tmp_path / f"{member_id}-{time.monotonic_ns()}"
                                      ".log", "w+")
        cmd = [sys.executable, "-m", "vmthunder.agent.membership",
               "--backend", url, "join", "--member-id", member_id,
               "--endpoint", endpoint, "--heartbeat", str(BEAT)]
        for image in images:
            cmd += ["--image", image]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        line = self.proc.stdout.readline()
        if "joined" not in line:
            self.kill()
            self.stderr.seek(0)
            raise RuntimeError(f"member {member_id} did not join: {line!r} "
                               + self.stderr.read()[-2000:])

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.stderr.close()


@pytest.fixture
def members(tmp_path):
    started = []

    def spawn(url, member_id, endpoint, images):
        m = Member(url, member_id, endpoint, images, tmp_path)
        started.append(m)
        return m

    yield spawn
    for m in started:
        m.kill()


async def wait_for(predicate, timeout, what):
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def member(url, member_id, endpoint, **kw):
    kw.setdefault("heartbeat_s", BEAT)
    kw.setdefault("refresh_s", BEAT)
    kw.setdefault("max_backoff_s", 0.5)
    return ms.Membership(url, member_id, endpoint, **kw)


EP_A = "nbd://10.201.0.1:10810"
EP_B = "nbd://10.201.0.2:10810"
EP_C = "nbd://10.201.0.3:10810"


def test_two_members_see_each_other_and_leave(backend):
    async def main():
        a = member(backend.url, "host-a", EP_A)
        b = member(backend.url, "host-b", EP_B)
        await a.announce(["cirros", "ubuntu"])  # before start: kept
        await a.start()
        await b.start()
        assert a.healthy and b.healthy, (a.last_error, b.last_error)
        assert a.lease_s == LEASE
        await b.announce(["ubuntu", "debian"])
        await wait_for(lambda: b.peers_for("cirros") == [EP_A]
                       and a.peers_for("debian") == [EP_B], 5,
                       "both members to see each other")
        # each sees the other's endpoint, never its own
        assert a.peers_for("ubuntu") == [EP_B]
        assert b.peers_for("ubuntu") == [EP_A]
        assert a.peers_for("cirros") == []
        assert b.peers_for("debian") == []
        assert a.peers_for("fedora") == b.peers_for("fedora") == []
        assert a.members() == {
            "host-a": {"endpoint": EP_A, "images": ["cirros", "ubuntu"]},
            "host-b": {"endpoint": EP_B, "images": ["debian", "ubuntu"]}}
        # the CLI sees both
        listed = await asyncio.to_thread(ms.list_members, backend.url)
        assert sorted(listed) == ["host-a", "host-b"]

        # announce a change
        await b.announce(["debian"])
        await wait_for(lambda: a.peers_for("ubuntu") == [], 5,
                       "a to see b drop ubuntu")
        assert a.peers_for("debian") == [EP_B]

        # (2) leave: gone at the next refresh, not after the lease
        await b.stop()
        await b.stop()  # idempotent
        # Well before the lease (a loaded machine can delay a refresh).
        took = await wait_for(lambda: a.peers_for("debian") == [],
                              LEASE - 0.2, "a to see b leave")
        assert "host-b" not in a.members()
        assert b.peers_for("cirros") == [] and b.members() == {}
        logging.getLogger(__name__).info("leave noticed in %.2fs", took)
        await a.stop()
        listed = await asyncio.to_thread(ms.list_members, backend.url)
        assert listed == {}

    run(main())


def test_crash_expires_and_rejoin_same_id(backend, members, capsys):
    async def main():
        a = member(backend.url, "host-a", EP_A, images=["cirros"])
        await a.start()
        try:
            c = members(backend.url, "host-c", EP_C, ["cirros", "win"])
            await wait_for(lambda: a.peers_for("win") == [EP_C], 5,
                           "a to see the subprocess member")
            # (3) crash: SIGKILL, no leave; gone once its lease expires
            c.kill(signal.SIGKILL)
            t0 = time.monotonic()
            await wait_for(lambda: a.peers_for("win") == [], LEASE + 2.0,
                           "the crashed member to disappear")
            crash_s = time.monotonic() - t0
            # The lease runs from its last heartbeat, which a starved
            # subprocess may have sent a while before the kill.
            assert crash_s >= LEASE / 2, (
                f"dropped after {crash_s:.2f}s, before its lease expired")

            # (4) rejoin with the same id, with a stale entry still there:
            # crash again and restart at once, with other images
            c = members(backend.url, "host-c", EP_C, ["cirros"])
            await wait_for(lambda: a.peers_for("cirros") == [EP_C], 5,
                           "a to see host-c back")
            c.kill(signal.SIGKILL)
            c = members(backend.url, "host-c", EP_C, ["arch"])
            await wait_for(lambda: a.peers_for("arch") == [EP_C], 5,
                           "a to see host-c rejoined with new images")
            assert a.peers_for("cirros") == []
            # it stays (heartbeats of the new incarnation) past the lease
            await asyncio.sleep(LEASE + 0.5)
            assert a.peers_for("arch") == [EP_C]
            # a clean SIGTERM leaves at once
            c.kill(signal.SIGTERM)
            await wait_for(lambda: a.peers_for("arch") == [], LEASE - 0.2,
                           "a SIGTERMed member to leave")
            # and the same id rejoins in-process after a clean stop too
            a2 = member(backend.url, "host-a", EP_A, images=["x"])
            await a.stop()
            await a2.start()
            assert a2.healthy
            assert a2.members()["host-a"]["images"] == ["x"]
            await a2.stop()
            return crash_s
        finally:
            await a.stop()

    crash_s = run(main())
    with capsys.disabled():
        print(f"\n[membership] crash noticed after {crash_s:.2f}s "
              f"(lease {LEASE}s, refresh {BEAT}s)")


def test_backend_restart_recovers(backend, members, capsys):
    async def main():
        # default back-off (cap 5 s), like the subprocess member b
        a = member(backend.url, "host-a", EP_A, images=["cirros"],
                   max_backoff_s=5.0)
        await a.start()
        b = members(backend.url, "host-b", EP_B, ["cirros"])
        try:
            await wait_for(lambda: a.peers_for("cirros") == [EP_B], 5,
                           "a to see b")
            backend.kill()
            await wait_for(lambda: not a.healthy, 5,
                           "a to notice that the backend is gone")
            assert a.last_error
            # the last snapshot keeps serving the data path
            assert a.peers_for("cirros") == [EP_B]
            await asyncio.sleep(1.0)
            assert a.peers_for("cirros") == [EP_B]
            assert not a.healthy
            await a.announce(["cirros", "new-while-down"])  # no exception
            # Redis comes back empty (the group is gone), etcd with its
            # data (the leases of the members may have expired)
            backend.start()
            t0 = time.monotonic()
            await wait_for(lambda: a.healthy, 10, "a to recover")
            listed = {}

            def both_back():
                return (sorted(listed) == ["host-a", "host-b"]
                        and a.peers_for("cirros") == [EP_B])

            deadline = time.monotonic() + 10
            while not both_back():
                assert time.monotonic() < deadline, (listed, a.members())
                listed = await asyncio.to_thread(ms.list_members,
                                                 backend.url)
                await asyncio.sleep(0.1)
            recover_s = time.monotonic() - t0
            # a's announce made while the backend was down got published
            assert listed["host-a"]["images"] == ["cirros", "new-while-down"]
            assert b.proc.poll() is None, "b must not have been restarted"
            return recover_s
        finally:
            await a.stop()

    recover_s = run(main())
    with capsys.disabled():
        print(f"\n[membership] both members back {recover_s:.2f}s after "
              f"{type(backend).__name__} restarted (down ~1.5s, back-off "
              "cap 5s)")


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_start_while_backend_down(kind, tmp_path):
    server = make_server(kind, tmp_path)

    async def main():
        a = member(server.url, "host-a", EP_A, images=["cirros"])
        t0 = time.monotonic()
        await a.start()  # nothing listens yet: not fatal
        assert time.monotonic() - t0 < 3
        assert not a.healthy and a.last_error
        try:
            server.start()
            await wait_for(lambda: a.healthy, 5,
                           "a to join once the backend is up")
            assert a.members() == {"host-a": {"endpoint": EP_A,
                                              "images": ["cirros"]}}
        finally:
            await a.stop()

    try:
        run(main())
    finally:
        server.clean()


def test_unknown_backend_raises():
    async def main():
        m = ms.Membership("nosuchdriver://x", "host-a", EP_A)
        with pytest.raises(Exception):
            await m.start()
        await m.stop()  # never started: no-op

    run(main())


def test_embedded_file_backend(tmp_path):
    """(6) The default kind of backend: no server, one host."""
    url = f"file://{tmp_path}/coordination"

    async def main():
        a = member(url, "host-a", EP_A)
        await a.start()
        assert a.healthy, a.last_error
        await a.announce(["cirros"])
        assert a.members() == {"host-a": {"endpoint": EP_A,
                                          "images": ["cirros"]}}
        assert a.peers_for("cirros") == []
        # a second agent process on the same host (same directory) is seen
        b = member(url, "host-b", EP_B, images=["cirros"])
        await b.start()
        await wait_for(lambda: a.peers_for("cirros") == [EP_B], 3,
                       "a to see b through the file backend")
        assert b.peers_for("cirros") == [EP_A]
        # the file driver cannot update capabilities: leave + join
        await b.announce(["debian"])
        await wait_for(lambda: a.peers_for("debian") == [EP_B], 3,
                       "a to see b's new images")
        assert a.peers_for("cirros") == []
        await b.stop()
        await wait_for(lambda: a.peers_for("debian") == [], 3,
                       "a to see b leave")
        # restart under the same id
        a2 = member(url, "host-b", EP_B, images=["x"])
        await a2.start()
        assert a2.healthy
        await a2.stop()
        await a.stop()
        await a.stop()

    run(main())


def test_cli_list(backend):
    async def main():
        a = member(backend.url, "host-a", EP_A, images=["cirros", "u"])
        await a.start()
        try:
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "vmthunder.agent.membership",
                 "--backend", backend.url, "list"],
                cwd=REPO, capture_output=True, text=True, timeout=20)
        finally:
            await a.stop()
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["host-a", EP_A, "cirros,u"]

    run(main())
