"""vmthunder-agent as a real process: its API, NBD exports, restarts, boot.

Every agent and QEMU started here is stopped when its test ends, pass or
fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import REPO, DaemonProc, make_image, need
from vmthunder.agent.client import AgentClient, AgentError

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
READY = "vmthunder-agent: ready"


@dataclasses.dataclass
class AgentProc(DaemonProc):
    proc: subprocess.Popen
    workdir: str
    api_socket: str
    nbd_socket: str
    state_file: str
    stderr_path: str
    # What it printed when ready (its addresses).
    ready_line: str = ""

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT of its --metrics-listen tcp:... address."""
        word = next(w for w in self.ready_line.split()
                    if w.startswith("metrics=tcp:"))
        return "http://" + word.removeprefix("metrics=tcp:")

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.api_socket, timeout=30)

    def state_bytes(self) -> bytes:
        with open(self.state_file, "rb") as f:
            return f.read()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`vmthunder ARGS --api-socket <this agent's>`."""
        return subprocess.run(
            [sys.executable, "-m", "vmthunder.cli", *args,
             "--api-socket", self.api_socket],
            capture_output=True, text=True, cwd=REPO, timeout=30)


def start_agent(workdir: str, *extra: str, timeout: float = 30,
                config: str = "") -> AgentProc:
    """Start `python -m vmthunder.agent` on WORKDIR's state, caches and
    sockets (the same each time: a restart finds its state); ``config``:
    more of its config file."""
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(workdir, "agent.conf")
    with open(conf, "w") as f:
        # Mark fetched chunks at once, so "chunks held" is exact in tests.
        f.write("[cache]\nsync_interval = 0\n" + config)
    api = os.path.join(workdir, "api.sock")
    nbd = os.path.join(workdir, "nbd.sock")
    state_dir = os.path.join(workdir, "state")
    stderr_path = os.path.join(workdir, f"agent-{time.monotonic_ns()}.log")
    argv = [sys.executable, "-m", "vmthunder.agent", "--config-file", conf,
            "--state-dir", state_dir, "--api-socket", api,
            "--hypervisor-listen", f"unix:{nbd}",
            "--cache-dir", os.path.join(workdir, "cache"), *extra]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, text=True,
                                cwd=REPO)
    agent = AgentProc(proc, workdir, api, nbd,
                      os.path.join(state_dir, "state.json"), stderr_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("vmthunder-agent did not get ready")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vmthunder-agent exited ({proc.wait()}):"
                                   f" {agent.stderr()[-3000:]}")
            if line.startswith(READY):
                agent.ready_line = line.strip()
                return agent
    except BaseException:
        agent.stop(signal.SIGKILL)
        raise


@pytest.fixture
def agents(tmp_path):
    """Factory: agents(workdir=None, *flags) -> AgentProc; all stopped at
    the end."""
    started: list[AgentProc] = []

    def factory(workdir=None, *extra, config=""):
        agent = start_agent(str(workdir or tmp_path / "agent"), *extra,
                            config=config)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        with contextlib.suppress(Exception):
            agent.stop()
        with contextlib.suppress(Exception):
            agent.proc.stdout.close()


# -- NBD helpers ---------------------------------------------------------

async def _nbd(uri: str, ops):
    from vmthunder.nbd.client import open_nbd
    client = await open_nbd(uri)
    try:
        results = []
        for op, *args in ops:
            results.append(await getattr(client, op)(*args))
        return results
    finally:
        await client.close()


def nbd(uri: str, *ops):
    """Run ("read", off, len) / ("write", off, data) / ("flush",) on URI."""
    return asyncio.run(_nbd(uri, ops))


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def wait_status(client: AgentClient, check, timeout: float = 10) -> dict:
    """Poll GET /status until check(status) holds; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if check(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


# -- (1) two VMs on one image ---------------------------------------------

def test_two_vms_share_one_cache(agents, tmp_path):
    need("qemu-img")
    size = 4 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=1)
    before = sha256(image)
    peer_socket = str(tmp_path / "peer.sock")
    agent = agents(None, "--peer-listen", f"unix:{peer_socket}")

    # The CLI client: a relative path is made absolute for the agent.
    res = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "image", "attach", "base",
         "base.raw", "--api-socket", agent.api_socket],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert res.returncode == 0, res.stderr
    assert "attached" in res.stdout

    vm1 = agent.client.create_vm("vm1", "base")
    vm2 = agent.client.create_vm("vm2", "base")
    assert vm1["nbd"] == f"nbd+unix:///vm1?socket={agent.nbd_socket}"
    assert vm2["image"] == "base" and vm2["state"] == "ready"

    # Both disks are the image, byte for byte (QEMU's own NBD client).
    for vm in (vm1, vm2):
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F",
                              "raw", image, vm["nbd"]],
                             capture_output=True, text=True, timeout=30)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    # A write to vm1 is vm1's only.
    pattern = b"\x5a" * 65536
    nbd(vm1["nbd"], ("write", 1 * MiB, pattern), ("flush",))
    [got1] = nbd(vm1["nbd"], ("read", 1 * MiB, 65536))
    [got2] = nbd(vm2["nbd"], ("read", 1 * MiB, 65536))
    assert got1 == pattern
    assert got2 == read_file(image, 1 * MiB, 65536)
    assert sha256(image) == before

    res = agent.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    status = wait_status(
        agent.client, lambda s: s["images"]["base"]["chunks_held"]
        == s["images"]["base"]["chunks_total"])
    img = status["images"]["base"]
    assert img["chunks_total"] == size // (256 * 1024)
    assert img["chunks_held"] == img["chunks_total"], img
    # One cache for both VMs: every byte came from the origin once.
    assert img["bytes_from_origin"] == size, img
    assert img["bytes_from_peers"] == 0
    assert img["bytes_served_to_peers"] == 0
    assert sorted(img["vms"]) == ["vm1", "vm2"]
    assert status["vms"]["vm1"]["bytes_written"] == 65536
    assert status["vms"]["vm1"]["bytes_read"] >= size
    assert status["vms"]["vm2"]["bytes_written"] == 0
    assert status["vms"]["vm2"]["bytes_read"] >= size
    assert json.loads(res.stdout)["vms"].keys() == {"vm1", "vm2"}

    # Peers see the image's cache, read-only, under the image's name.
    assert img["peer_nbd"] == f"nbd+unix:///base?socket={peer_socket}"
    [whole] = nbd(img["peer_nbd"], ("read", 0, size))
    assert whole == read_file(image, 0, size)
    with pytest.raises(Exception, match="read-only"):
        nbd(img["peer_nbd"], ("write", 0, b"x" * 512))

    text = agent.cli("status")
    assert text.returncode == 0 and "base" in text.stdout \
        and "vm1" in text.stdout, text.stdout + text.stderr

    # Deleting vm2 removes its files; vm1 is untouched.
    snap_dir = os.path.join(img["cache_dir"], "snapshots")
    assert os.path.exists(os.path.join(snap_dir, "vm2.overlay"))
    res = agent.cli("vm", "delete", "vm2")
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(os.path.join(snap_dir, "vm2.overlay"))
    assert not os.path.exists(os.path.join(snap_dir, "vm2.map"))
    assert [v["name"] for v in agent.client.vms()] == ["vm1"]
    [got1] = nbd(vm1["nbd"], ("read", 1 * MiB, 65536))
    assert got1 == pattern
    assert agent.stop() == 0


# -- (2) bad input ---------------------------------------------------------

def test_bad_input_is_refused_and_changes_nothing(agents, tmp_path):
    image = make_image(tmp_path / "base.raw", 1 * MiB, seed=2)
    other = make_image(tmp_path / "other.raw", 1 * MiB, seed=3)
    agent = agents()
    client = agent.client
    assert client.attach_image("base", image)["created"] is True
    client.create_vm("vm1", "base")
    state = agent.state_bytes()

    def post(path, body):
        return client.request("POST", path, body if isinstance(body, bytes)
                              else json.dumps(body).encode())

    cases = [
        # (what, call, status, words the message must contain)
        ("malformed JSON", lambda: post("/images", b"{not json"), 400,
         "not valid JSON"),
        ("not an object", lambda: post("/vms", b"[1, 2]"), 400,
         "JSON object"),
        ("missing origin", lambda: post("/images", {"name": "x"}), 400,
         "missing field 'origin'"),
        ("unknown field", lambda: post(
            "/vms", {"name": "vm2", "image": "base", "disk": 1}), 400,
         "unknown field"),
        ("name not a string", lambda: post(
            "/vms", {"name": 5, "image": "base"}), 400, "must be a string"),
        ("bad image name", lambda: post(
            "/images", {"name": "a/b", "origin": image}), 400,
         "image name 'a/b' is not valid"),
        ("bad VM name", lambda: post(
            "/vms", {"name": "-x", "image": "base"}), 400,
         "VM name '-x' is not valid"),
        ("relative origin", lambda: post(
            "/images", {"name": "x", "origin": "base.raw"}), 400,
         "absolute path"),
        ("missing file", lambda: post(
            "/images", {"name": "x", "origin": "/nonexistent.raw"}), 400,
         "does not exist"),
        ("unknown scheme", lambda: post(
            "/images", {"name": "x", "origin": "ftp://h/x"}), 400,
         "unknown scheme"),
        ("other origin, same name", lambda: client.attach_image(
            "base", other), 409, "already attached from"),
        ("same origin, other name", lambda: client.attach_image(
            "base2", image), 409, "already attached as image 'base'"),
        ("duplicate VM", lambda: client.create_vm("vm1", "base"), 409,
         "exists already"),
        ("VM of an image not attached", lambda: client.create_vm(
            "vm2", "nope"), 404, "not attached"),
        ("delete unknown VM", lambda: client.delete_vm("nope"), 404,
         "no VM 'nope'"),
        ("detach unknown image", lambda: client.detach_image("nope"), 404,
         "no image 'nope'"),
        ("detach an image in use", lambda: client.detach_image("base"), 409,
         "in use by VM(s) vm1"),
        ("unknown path", lambda: client.request("GET", "/volumes"), 404,
         "no such API path"),
        ("wrong method", lambda: client.request("PUT", "/vms"), 405,
         "not allowed"),
    ]
    for what, call, status, words in cases:
        with pytest.raises(AgentError) as info:
            call()
        assert info.value.status == status, (what, str(info.value))
        assert words in str(info.value), (what, str(info.value))
        assert agent.state_bytes() == state, f"{what} changed the state"

    # Attaching the same name and origin again is a no-op.
    again = client.attach_image("base", image)
    assert again["created"] is False and again["vms"] == ["vm1"]
    assert agent.state_bytes() == state
    assert [i["name"] for i in client.images()] == ["base"]
    assert [v["name"] for v in client.vms()] == ["vm1"]

    # The CLI prints the agent's message.
    res = agent.cli("vm", "create", "vm1", "--image", "base")
    assert res.returncode == 1
    assert res.stderr.startswith("vmthunder: error: VM 'vm1' exists "
                                 "already"), res.stderr
    missing = str(tmp_path / "none.sock")
    res = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "status", "--api-socket",
         missing], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert res.returncode == 1
    assert f"cannot reach the vmthunder agent at {missing}" in res.stderr
    assert "is vmthunder-agent running" in res.stderr

    # A second agent on the same state directory is refused.
    second = subprocess.run(
        [sys.executable, "-m", "vmthunder.agent", "--state-dir",
         os.path.dirname(agent.state_file), "--api-socket",
         str(tmp_path / "api2.sock"), "--hypervisor-listen",
         f"unix:{tmp_path}/nbd2.sock", "--cache-dir", str(tmp_path / "c2")],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert second.returncode == 1
    assert "in use by another vmthunder-agent" in second.stderr

    helptext = subprocess.run(
        [sys.executable, "-m", "vmthunder.agent", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=30).stdout
    for flag in ("--config-file", "--state-dir", "--api-socket",
                 "--hypervisor-listen", "--peer-listen", "--cache-dir"):
        assert flag in helptext
    assert agent.stop() == 0
    assert agent.state_bytes() == state


# -- (3) restarts ----------------------------------------------------------

def test_restart_restores_images_vms_and_data(agents, tmp_path):
    size = 2 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=4)
    workdir = tmp_path / "agent"
    agent = agents(workdir)
    agent.client.attach_image("base", image)
    vm1 = agent.client.create_vm("vm1", "base")
    vm2 = agent.client.create_vm("vm2", "base")
    one = b"\xa1" * 8192
    nbd(vm1["nbd"], ("write", 12288, one), ("flush",),
        ("read", 0, size))                    # and the whole image cached
    wait_status(agent.client, lambda s: s["images"]["base"]["chunks_held"]
                == s["images"]["base"]["chunks_total"])
    state = agent.state_bytes()

    # Clean stop: SIGTERM, exit 0.
    assert agent.stop(signal.SIGTERM) == 0, agent.stderr()[-2000:]
    assert "stopped" in agent.stderr()
    assert agent.state_bytes() == state

    agent = agents(workdir)
    log = agent.stderr()
    assert "restore: image base attached" in log, log
    assert "restore: VM vm1 on image base" in log, log
    assert [i["name"] for i in agent.client.images()] == ["base"]
    vms = {v["name"]: v for v in agent.client.vms()}
    assert vms.keys() == {"vm1", "vm2"}
    assert vms["vm1"]["nbd"] == vm1["nbd"]
    status = agent.client.status()
    assert status["images"]["base"]["chunks_held"] == \
        status["images"]["base"]["chunks_total"]
    [data1, data2] = nbd(vm1["nbd"], ("read", 0, size), ("flush",))[:1] + \
        nbd(vm2["nbd"], ("read", 0, size))
    expected = bytearray(read_file(image, 0, size))
    assert data2 == expected
    expected[12288:12288 + len(one)] = one
    assert data1 == expected
    # Everything re-read was held: nothing fetched from the origin.
    status = agent.client.status()
    assert status["images"]["base"]["bytes_from_origin"] == 0, status
    assert status["images"]["base"]["bytes_fetched"] == 0, status
    assert status["vms"]["vm1"]["bytes_read"] == size

    # Crash: SIGKILL after a flushed write; the restart has it all.
    two = b"\xb2" * 4096
    nbd(vm2["nbd"], ("write", 1 * MiB, two), ("flush",))
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent = agents(workdir)
    assert {v["name"] for v in agent.client.vms()} == {"vm1", "vm2"}
    [got2, got1] = nbd(vm2["nbd"], ("read", 1 * MiB, 4096)) + \
        nbd(vm1["nbd"], ("read", 12288, 8192))
    assert got2 == two
    assert got1 == one
    assert agent.stop() == 0


def test_restart_with_origin_gone_keeps_records_until_it_is_back(
        agents, tmp_path):
    image = make_image(tmp_path / "base.raw", 1 * MiB, seed=5)
    workdir = tmp_path / "agent"
    agent = agents(workdir)
    agent.client.attach_image("base", image)
    vm = agent.client.create_vm("vm1", "base")
    nbd(vm["nbd"], ("write", 0, b"\xc3" * 4096), ("flush",))
    assert agent.stop() == 0
    state = agent.state_bytes()

    hidden = str(tmp_path / "hidden.raw")
    os.rename(image, hidden)
    agent = agents(workdir)
    [img] = agent.client.images()
    assert img["state"] == "error" and "does not exist" in img["error"]
    [vm_info] = agent.client.vms()
    assert vm_info["state"] == "error" and "not attached" in \
        vm_info["error"]
    with pytest.raises(AgentError) as info:
        agent.client.create_vm("vm2", "base")
    assert info.value.status == 409
    assert agent.state_bytes() == state        # nothing was forgotten

    # The origin is back (same file): attaching again retries, VMs return.
    os.rename(hidden, image)
    again = agent.client.attach_image("base", image)
    assert again["state"] == "attached" and again["created"] is True
    [vm_info] = agent.client.vms()
    assert vm_info["state"] == "ready", vm_info
    [got] = nbd(vm_info["nbd"], ("read", 0, 8192))
    assert got == b"\xc3" * 4096 + read_file(image, 4096, 4096)
    assert agent.state_bytes() == state
    assert agent.stop() == 0


# -- (3b) a VM disk larger than its image (a flavor's root disk) -----------

def nbd_size(uri: str) -> int:
    async def main():
        from vmthunder.nbd.client import open_nbd
        client = await open_nbd(uri)
        try:
            return client.size
        finally:
            await client.close()
    return asyncio.run(main())


def test_vm_disk_larger_than_its_image_survives_restarts(agents, tmp_path):
    size = 1 * MiB + 1000                     # an unaligned image end
    disk = 8 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=6)
    base = read_file(image, 0, size)
    workdir = tmp_path / "agent"
    agent = agents(workdir)
    agent.client.attach_image("base", image)

    # The CLI takes a size with a suffix; the agent answers the size.
    res = agent.cli("vm", "create", "big", "--image", "base", "--size", "8M",
                    "--json")
    assert res.returncode == 0, res.stderr
    big = json.loads(res.stdout)
    assert big["size"] == disk and big["state"] == "ready"
    small = agent.client.create_vm("small", "base")
    assert small["size"] == size              # no size: the image's
    assert nbd_size(big["nbd"]) == disk
    assert nbd_size(small["nbd"]) == size
    records = {v["name"]: v for v in json.loads(agent.state_bytes())["vms"]}
    assert records["big"]["size"] == disk
    assert "size" not in records["small"]

    # Past the image: zeros; straddling its end: its bytes, then zeros.
    [past, straddle] = nbd(big["nbd"], ("read", 4 * MiB, 65536),
                           ("read", size - 100, 4096))
    assert past == bytes(65536)
    assert straddle == base[-100:] + bytes(4096 - 100)

    # Writes past the image, straddling its end, up to the disk's end.
    expected = bytearray(base + bytes(disk - size))
    writes = [(6 * MiB, b"\x6b" * 65536), (size - 10, b"\x5c" * 8192),
              (disk - 4096, b"\x7d" * 4096), (3 * MiB + 7, b"\x11" * 100)]
    ops = [("write", off, data) for off, data in writes] + [("flush",)]
    nbd(big["nbd"], *ops)
    for off, data in writes:
        expected[off:off + len(data)] = data
    [whole] = nbd(big["nbd"], ("read", 0, disk))
    assert whole == expected
    # The image and the other VM are untouched.
    assert read_file(image, 0, size + 1) == base
    [other] = nbd(small["nbd"], ("read", 0, size))
    assert other == base
    if shutil.which("qemu-img"):
        info = subprocess.run(["qemu-img", "info", "--output=json",
                               big["nbd"]], capture_output=True, text=True,
                              timeout=30)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == disk

    # A clean restart reopens the VM with its size and data.
    assert agent.stop() == 0
    agent = agents(workdir)
    vms = {v["name"]: v for v in agent.client.vms()}
    assert vms["big"]["size"] == disk and vms["big"]["state"] == "ready"
    assert vms["small"]["size"] == size
    assert agent.client.status()["vms"]["big"]["size"] == disk
    assert nbd_size(big["nbd"]) == disk
    [whole] = nbd(big["nbd"], ("read", 0, disk))
    assert whole == expected
    listing = agent.cli("vm", "list")
    assert "8.0 MiB" in listing.stdout, listing.stdout + listing.stderr

    # A crash after a flushed write past the image: it is kept.
    nbd(big["nbd"], ("write", 7 * MiB, b"\x42" * 4096), ("flush",))
    expected[7 * MiB:7 * MiB + 4096] = b"\x42" * 4096
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent = agents(workdir)
    [whole] = nbd(big["nbd"], ("read", 0, disk))
    assert whole == expected
    assert agent.stop() == 0


def test_bad_vm_sizes_are_refused_and_change_nothing(agents, tmp_path):
    size = 1 * MiB
    image = make_image(tmp_path / "base.raw", size, seed=7)
    agent = agents()
    client = agent.client
    info = client.attach_image("base", image)
    snap_dir = os.path.join(info["cache_dir"], "snapshots")
    state = agent.state_bytes()

    def post(body):
        return client.request("POST", "/vms", json.dumps(body).encode())

    cases = [
        # (size, words the message must contain)
        (size - 1, f"VM size {size - 1} bytes is smaller than image 'base' "
                   f"({size} bytes)"),
        (0, "not positive"),
        (-4096, "not positive"),
        ("8M", "must be an integer number of bytes, not str"),
        (8.0 * MiB, "must be an integer number of bytes, not float"),
        (True, "must be an integer number of bytes, not bool"),
        ([8], "must be an integer number of bytes, not list"),
        (1 << 60, "above this agent's limit"),
    ]
    for bad, words in cases:
        with pytest.raises(AgentError) as err:
            post({"name": "vm1", "image": "base", "size": bad})
        assert err.value.status == 400, (bad, str(err.value))
        assert words in str(err.value), (bad, str(err.value))
        assert agent.state_bytes() == state, f"size {bad!r} changed state"
        assert client.vms() == []
        assert not os.path.exists(snap_dir) or os.listdir(snap_dir) == []

    # The CLI refuses a size it cannot parse before asking the agent.
    res = agent.cli("vm", "create", "vm1", "--image", "base", "--size",
                    "10X")
    assert res.returncode == 2
    assert "'10X' is not a size" in res.stderr
    assert agent.state_bytes() == state

    # null is no size: the image's.
    vm = post({"name": "vm1", "image": "base", "size": None})
    assert vm["size"] == size
    exact = client.create_vm("vm2", "base", size)
    assert exact["size"] == size
    assert agent.stop() == 0


# -- (4) a real boot -------------------------------------------------------

def test_boot_a_vm_from_the_agent(agents, guest_dir, tmp_path):
    need("qemu-system-x86_64")
    from vmthunder.boot import load_guest
    guest = load_guest(guest_dir, build=False)
    agent = agents()
    agent.client.attach_image("guest", guest.root)
    vm = agent.client.create_vm("guest-vm", "guest")
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m",
            str(guest.memory_mb or 512), "-smp", "1", "-nographic",
            "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", guest.kernel, "-initrd", guest.initrd,
            "-append", guest.append,
            "-drive", f"file={vm['nbd']},format=raw,if=virtio,cache=none"]
    before = sha256(guest.root)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)
        console = proc.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as exc:    # run() killed QEMU
        console = (exc.stdout or b"").decode("utf-8", "replace")
    why = console[-3000:] + "\nagent:\n" + agent.stderr()[-3000:]
    assert guest.marker in console, why
    assert guest.failure_marker not in console, why
    assert "I/O error" not in console, why
    status = agent.client.status()
    assert status["vms"]["guest-vm"]["bytes_read"] > 0
    assert status["vms"]["guest-vm"]["bytes_written"] > 0   # guest wrote
    assert status["images"]["guest"]["bytes_from_origin"] > 0
    # A fraction of the image, not all of it.
    assert status["images"]["guest"]["chunks_held"] < \
        status["images"]["guest"]["chunks_total"]
    assert sha256(guest.root) == before
    assert agent.stop() == 0
