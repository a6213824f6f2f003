"""Images as Cinder volumes, against real services started by the test.

The test guest's root file system goes to Glance, `vmthunder export
glance://ID --cinder` makes it a read-only multiattach Cinder volume (on
vmthunder's file driver, exported by Cinder's tgtadm target helper) with
its manifest volume, and `vmthunder serve cinder://ID` attaches both with
the attachments API and CHAP, serves the guest's disk over NBD and QEMU
boots it. The origin volume is never written, no attachment is left
after serve stops, wrong CHAP credentials and each export failure give a
clear error.

The services listen on the root namespace's address on a bridge
(``storage_net``) that two compute hosts in network namespaces reach: an
agent in each attaches the volume with CHAP and boots a VM, the second
from the first. The Nova driver's resolution of an image to its Cinder
volume (one volume for several hosts at once) is tested here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest

from tests.functional import test_peer_faults as _pf
from tests.functional.conftest import REPO, need
from tests.functional.test_boot import qemu_boot, sha256
from tests.openstack import services
from tests.openstack.conftest import (config_file, running_services,
                                      settings_of, upload_image,
                                      volume_file)

pytestmark = pytest.mark.timeout(600)
INITIATOR = "iqn.2024-01.org.vmthunder.test"


@dataclasses.dataclass
class StorageNet:
    topo: object            # vmthunder.bench.topology.Topology
    address: str            # the root namespace's address on its bridge
    interface: str          # the root namespace's end of the veth

    @property
    def hosts(self):
        return self.topo.hosts


def _free_subnet() -> str:
    """A /24 of 10.0.0.0/8 that no address or route of the root
    namespace overlaps."""
    import ipaddress
    import random
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        used = [ipaddress.ip_network(
            f"{r.get_attr('RTA_DST')}/{r['dst_len']}", strict=False)
            for r in ipr.get_routes(family=socket.AF_INET)
            if r.get_attr("RTA_DST")]
        used += [ipaddress.ip_network(
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            for a in ipr.get_addr(family=socket.AF_INET)]
    for _ in range(100):
        net = ipaddress.ip_network(
            f"10.{random.randint(100, 199)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used
                   if not u.is_loopback and u.prefixlen > 0):
            return str(net)
    raise RuntimeError("no free /24 in 10.100-199.x for the storage net")


@pytest.fixture(scope="module")
def storage_net():
    """Two compute hosts, each a network namespace on a bridge (the
    benchmark's topology, unshaped), and a veth from the root namespace
    into that bridge: the OpenStack services listen on its address, so
    the hosts reach Cinder's API and target as compute hosts reach a
    storage network. All removed at the end (deleting the switch
    namespace removes the veth too)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    import ipaddress
    from pyroute2 import IPRoute
    from vmthunder import privileged
    from vmthunder.bench import topology as topo_mod
    subnet = _free_subnet()
    topo = topo_mod.Topology(2, origin_rate=None, host_rate=None,
                             prefix="vmtcin", subnet=subnet)
    interface = "vmtcin" + topo.run_id.rsplit("-", 1)[1]
    address = str(ipaddress.ip_network(subnet)[-2])
    try:
        topo.create()
        with IPRoute() as ipr:
            ipr.link("add", ifname=interface, kind="veth",
                     peer={"ifname": "p-root",
                           "net_ns_fd": topo.switch_netns})
            index = ipr.link_lookup(ifname=interface)[0]
            ipr.addr("add", index=index, address=address, prefixlen=24)
            ipr.link("set", index=index, state="up")
        privileged.link_set(topo.switch_netns, "p-root",
                            master=topo_mod.BRIDGE, no_ipv6_ll=True, up=True)
        yield StorageNet(topo, address, interface)
    finally:
        with contextlib.suppress(Exception), IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=interface):
                ipr.link("del", index=index)
        topo.destroy()


@pytest.fixture(scope="module")
def openstack(storage_net, tmp_path_factory):
    """The services of tests/openstack/conftest.py, on the storage net's
    address (the root namespace reaches it too)."""
    with running_services(tmp_path_factory, storage_net.address) as s:
        yield s


def vmthunder(*args: str, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "vmthunder.cli", "-v", *args]
    try:
        return subprocess.run(argv, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{' '.join(argv)} still running after {timeout} s; its "
            f"output:\n{exc.stdout}\n{exc.stderr}") from None


def head_sha256(path: str, size: int) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(1 << 20, left))
            assert block, f"{path} is shorter than {size}"
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def chap_secrets(s: services.Services) -> list[str]:
    """The CHAP secrets in the target configs Cinder wrote."""
    found = []
    for path in glob.glob(os.path.join(s.base, "cinder", "volumes", "*")):
        with open(path) as f:
            found += re.findall(r"incominguser \S+ (\S+)", f.read())
    return found


def attachments_of(s: services.Services, *volume_ids: str) -> list:
    from vmthunder.cinder import client as cc
    client = cc.volume_client(settings_of(s))
    return [a for a in client.attachments.list()
            if a.volume_id in volume_ids]


def origin_volumes(s: services.Services, exported: dict):
    """(image volume, manifest volume, the image volume's file, its
    sha256 now)."""
    from vmthunder.cinder import client as cc
    from vmthunder.cinder import export as cinder_export
    vol = exported["volume_id"]
    manifest_id = cc.volume_client(settings_of(s)).volumes.get(
        vol).metadata[cinder_export.META_MANIFEST_VOLUME]
    path = volume_file(s, vol)
    return vol, manifest_id, path, sha256(path)


@pytest.fixture(scope="module")
def exported(openstack, guest_dir, tmp_path_factory):
    """The guest's root in Glance, exported with the CLI."""
    work = tmp_path_factory.mktemp("cinder-export")
    image = str(work / "root.img")
    shutil.copyfile(os.path.join(guest_dir, "root.img"), image)
    image_id = upload_image(openstack, image, name="guest-root")
    conf = config_file(openstack, str(work / "vmthunder.conf"))
    proc = vmthunder("--config-file", conf, "export",
                     f"glance://{image_id}", "--cinder")
    assert proc.returncode == 0, proc.stdout + proc.stderr + \
        openstack.logs()
    m = re.search(r"origin cinder://(\S+)", proc.stdout)
    assert m, proc.stdout
    return dict(image_id=image_id, volume_id=m.group(1), conf=conf,
                image=image, size=os.path.getsize(image),
                digest=sha256(image), output=proc.stdout)


def test_export_through_cinder_is_recorded_and_idempotent(openstack,
                                                          exported):
    from vmthunder.cinder import client as cc
    from vmthunder.cinder import export as cinder_export
    out = exported["output"]
    assert "creating volume" in out and "manifest:" in out, out
    settings = settings_of(openstack)
    client = cc.volume_client(settings)
    volume = client.volumes.get(exported["volume_id"])
    assert volume.status == "available" and volume.multiattach
    assert volume.metadata[cinder_export.META_IMAGE] == \
        exported["image_id"]
    identity = volume.metadata[cinder_export.META_IDENTITY]
    manifest_id = volume.metadata[cinder_export.META_MANIFEST_VOLUME]
    manifest_volume = client.volumes.get(manifest_id)
    assert manifest_volume.status == "available"
    image = cc.image_api(settings).get(
        f"/v2/images/{exported['image_id']}").json()
    assert image[cinder_export.PROP_VOLUME] == exported["volume_id"]
    assert image[cinder_export.PROP_IDENTITY] == identity
    assert image["vmthunder_origin"] == f"cinder://{exported['volume_id']}"
    # Cinder filled the volume with the image (the driver's
    # copy_image_to_volume), the rest of its GiB is zeros.
    assert head_sha256(volume_file(openstack, exported["volume_id"]),
                       exported["size"]) == exported["digest"]

    again = vmthunder("--config-file", exported["conf"], "export",
                      f"glance://{exported['image_id']}", "--cinder")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(unchanged)" in again.stdout, again.stdout
    assert f"cinder://{exported['volume_id']}" in again.stdout
    assert client.volumes.get(exported["volume_id"]).metadata[
        cinder_export.META_IDENTITY] == identity


def test_copy_from_cinder_origin(openstack, exported, tmp_path):
    """The transfer library reads cinder://ID: attached, every chunk
    checked against the manifest volume, detached after."""
    vol, manifest_id, path, before = origin_volumes(openstack, exported)
    out = str(tmp_path / "copy.raw")
    proc = vmthunder("--config-file", exported["conf"], "copy",
                     f"cinder://{vol}", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.path.getsize(out) == exported["size"]
    assert sha256(out) == exported["digest"]
    assert attachments_of(openstack, vol, manifest_id) == []
    assert sha256(path) == before


def test_serve_cinder_origin_boots_and_detaches(openstack, exported, serve,
                                                guest_dir, tmp_path):
    """serve cinder://ID: both volumes attached read-only with CHAP, the
    guest boots through the cache, the origin volume is never written,
    and no attachment (nor target) is left once serve stops."""
    need("qemu-system-x86_64")
    vol, manifest_id, path, before = origin_volumes(openstack, exported)
    srv = serve(f"cinder://{vol}", "--snapshot", "vm1",
                listen=f"unix:{tmp_path}/nbd.sock",
                config_file=exported["conf"])
    held = attachments_of(openstack, vol, manifest_id)
    assert sorted(a.volume_id for a in held) == sorted([vol, manifest_id])
    assert all(a.status == "attached" for a in held), held
    console = qemu_boot(guest_dir, srv.uri("vm1"))
    why = console[-3000:] + "\nserver:\n" + srv.stderr()[-3000:]
    assert "VMTHUNDER-BOOT-OK" in console, why
    assert "VMTHUNDER-WRITE-OK" in console, why
    assert "I/O error" not in console, why
    assert srv.stop() == 0, srv.stderr()[-3000:]
    stats = srv.stats()
    assert stats["cache"]["bytes_fetched"] > 0 if "bytes_fetched" in \
        stats["cache"] else True
    log = srv.stderr()
    assert "attachment" in log and "deleted" in log, log[-3000:]
    secrets = chap_secrets(openstack)
    assert not any(secret in log for secret in secrets)
    assert attachments_of(openstack, vol, manifest_id) == []
    assert not any(vol in iqn or manifest_id in iqn
                   for iqn in openstack.targets().values())
    assert sha256(path) == before, "the origin volume was written"


def test_agent_attaches_cinder_origin_boots_and_detaches(
        openstack, exported, guest_dir, tmp_path):
    """vmthunder-agent with the origin cinder://ID: the image attached
    (both volumes, read-only, CHAP), a VM disk on it boots, the agent's
    health checks Cinder's endpoint, and detaching the image deletes both
    attachments; the origin volume is never written."""
    need("qemu-system-x86_64")
    from tests.functional.test_agent import start_agent
    vol, manifest_id, path, before = origin_volumes(openstack, exported)
    with open(exported["conf"]) as f:
        section = f.read()
    agent = start_agent(str(tmp_path / "agent"), config=section)
    try:
        agent.client.attach_image("guest", f"cinder://{vol}")
        assert len(attachments_of(openstack, vol, manifest_id)) == 2
        vm = agent.client.create_vm("guest-vm", "guest")
        console = qemu_boot(guest_dir, vm["nbd"])
        why = console[-3000:] + "\nagent:\n" + agent.stderr()[-3000:]
        assert "VMTHUNDER-BOOT-OK" in console, why
        assert "I/O error" not in console, why
        healthy, report = agent.client.health()
        assert healthy, report
        status = agent.client.status()["images"]["guest"]
        assert 0 < status["chunks_held"] < status["chunks_total"]
        agent.client.delete_vm("guest-vm")
        agent.client.detach_image("guest")
        assert attachments_of(openstack, vol, manifest_id) == []
        log = agent.stderr()
        assert not any(secret in log for secret in chap_secrets(openstack))
    finally:
        agent.stop()
    assert sha256(path) == before, "the origin volume was written"


class NsAgent(_pf.Agent):
    """A vmthunder-agent in a host's network namespace (test_peer_faults'
    Agent: mesh mode, peers on tcp:ADDRESS:10810, tooz membership) with
    the [cinder] section of ``conf`` and the host's own iSCSI initiator
    name."""

    def __init__(self, host, root: str, conf: str, coordination: str):
        base = os.path.join(root, f"{host.name}.conf")
        with open(conf) as f, open(base, "w") as out:
            # conf ends with its [cinder] section.
            out.write(f.read() + f"initiator_name = {INITIATOR}:"
                      f"{host.name}\n")
        super().__init__(types.SimpleNamespace(
            config_file=base, coordination=coordination), host, root)


def nexuses(s: services.Services, volume_id: str) -> list[dict]:
    """The sessions (initiator, IP address) on the volume's target, and
    whether the target asks for CHAP (an account is bound to it)."""
    out = s.tgtadm("--lld", "iscsi", "--mode", "target", "--op",
                   "show").stdout
    found = []
    for block in re.split(r"^Target \d+: ", out, flags=re.M)[1:]:
        if volume_id not in block.splitlines()[0]:
            continue
        account = re.search(r"Account information:\n((?:\s+\S+\n)*)",
                            block + "\n")
        chap = bool(account and account.group(1).strip())
        for m in re.finditer(r"Initiator: (\S+).*?IP Address: (\S+)",
                             block, re.S):
            found.append(dict(initiator=m.group(1), ip=m.group(2),
                              chap=chap))
    return found


def test_two_hosts_in_namespaces_boot_through_cinder_second_from_first(
        openstack, storage_net, exported, guest_dir, tmp_path):
    """Issue 15's must-show: two compute hosts, each a network namespace
    with its own vmthunder-agent (mesh mode, tooz membership) and its own
    initiator name, attach the same cinder://ID (both volumes read-only,
    logging in to Cinder's target with CHAP from their own addresses)
    and boot a real VM (QEMU TCG, in the host's namespace) each. The
    second host's chunks come from the first, not from the volume; the
    first detaches while the second keeps its VM (the export stays for
    it); once both detach no attachment (nor target) is left in Cinder,
    and the origin volume was never written."""
    need("qemu-system-x86_64")
    vol, manifest_id, path, before = origin_volumes(openstack, exported)
    coordination = f"file://{tmp_path / 'coordination'}"
    hosts = storage_net.hosts
    agents = [NsAgent(h, str(tmp_path), exported["conf"], coordination)
              for h in hosts]
    try:
        for agent in agents:
            agent.start()
        a, b = agents

        def boot(agent, vm: str) -> dict:
            agent.client.attach_image(_pf.IMAGE, f"cinder://{vol}")
            nbd = agent.client.create_vm(vm, _pf.IMAGE)["nbd"]
            t0 = time.monotonic()
            console = qemu_boot(guest_dir, nbd, wrap=agent.host.argv)
            why = (f"{agent.host.name}: {console[-3000:]}\nagent:\n"
                   + agent.log()[-3000:])
            assert "VMTHUNDER-BOOT-OK" in console, why
            assert "VMTHUNDER-WRITE-OK" in console, why
            assert "I/O error" not in console, why
            status = agent.status()
            status["boot_s"] = round(time.monotonic() - t0, 1)
            return status

        sa = boot(a, "vm-a")
        assert sa["bytes_from_origin"] > 0 and sa["fetch_errors"] == 0, sa
        # Both hosts' agents see each other before the second boots.
        _pf.wait_for(lambda: b.client.status()["coordination"]["members"]
                     >= 2, "the second host to see the first", timeout=15)
        sb = boot(b, "vm-b")
        print(f"host0: {sa['bytes_from_origin']} bytes from the origin, "
              f"boot {sa['boot_s']} s; host1: {sb['bytes_from_peers']} "
              f"bytes from peers, {sb['bytes_from_origin']} from the "
              f"origin, boot {sb['boot_s']} s")
        # The second boot reads what the first read: from the first host.
        assert sb["bytes_from_peers"] > 0 and sb["fetch_errors"] == 0, sb
        assert sb["bytes_from_origin"] <= sb["bytes_from_peers"] // 10, sb
        assert a.status()["bytes_served_to_peers"] >= \
            sb["bytes_from_peers"]

        # Each host logged in to Cinder's target of each volume with CHAP,
        # from its own address, as its own initiator.
        for volume_id in (vol, manifest_id):
            seen = nexuses(openstack, volume_id)
            assert {(n["initiator"], n["ip"]) for n in seen} == {
                (f"{INITIATOR}:{h.name}", h.address) for h in hosts}, seen
            assert all(n["chap"] for n in seen), seen
        held = attachments_of(openstack, vol, manifest_id)
        assert len(held) == 4 and all(x.status == "attached"
                                      for x in held), held

        # The first host leaves: the volume stays exported for the second,
        # whose VM keeps reading (a whole read of its disk).
        a.client.delete_vm("vm-a")
        a.client.detach_image(_pf.IMAGE)
        assert sorted(x.volume_id for x in attachments_of(
            openstack, vol, manifest_id)) == sorted([vol, manifest_id])
        assert nexuses(openstack, vol) and all(
            n["ip"] == hosts[1].address for n in nexuses(openstack, vol))
        vm_b = b.client.vms()[0]["nbd"]
        copy = b.host.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                           vm_b, str(tmp_path / "b.raw")],
                          capture_output=True, text=True, timeout=180)
        assert copy.returncode == 0, copy.stderr + b.log()[-3000:]
        b.client.delete_vm("vm-b")
        b.client.detach_image(_pf.IMAGE)
        assert attachments_of(openstack, vol, manifest_id) == []
        assert not any(vol in iqn or manifest_id in iqn
                       for iqn in openstack.targets().values())
        secrets = chap_secrets(openstack)
        for agent in agents:
            log = agent.log()
            assert not any(secret in log for secret in secrets)
            assert " ERROR " not in log and "Traceback" not in log, \
                log[-3000:]
    finally:
        for agent in agents:
            agent.cleanup()
    assert sha256(path) == before, "the origin volume was written"


def test_storage_restart_while_reading_stalls_then_completes(
        openstack, exported, serve, tmp_path):
    """tgtd dies (every target gone) while a host reads the whole image
    through serve: reads stall; once tgtd and cinder-volume are back
    (cinder-volume re-exports in-use volumes at start, same CHAP) they
    complete, with the right bytes."""
    vol = exported["volume_id"]
    srv = serve(f"cinder://{vol}", listen=f"unix:{tmp_path}/nbd.sock",
                config_file=exported["conf"])
    out = str(tmp_path / "copy.raw")
    openstack.crash_tgtd()
    assert openstack.targets() == {}
    reader = subprocess.Popen(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(vol), out],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)
        assert reader.poll() is None, reader.stdout.read()
        openstack.restart("cinder-volume")
        deadline = time.monotonic() + 120
        while not any(vol in iqn for iqn in openstack.targets().values()):
            assert time.monotonic() < deadline, openstack.logs()
            assert reader.poll() is None, reader.stdout.read()
            time.sleep(0.5)
        assert reader.wait(120) == 0, reader.stdout.read()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert head_sha256(out, exported["size"]) == exported["digest"]
    assert srv.stop() == 0
    assert srv.stats()["source"]["reconnects"] >= 1, srv.stats()
    assert "stalled" in srv.stderr() or "reconnect" in srv.stderr().lower()
    assert attachments_of(openstack, vol) == []


def test_volume_no_longer_matching_its_manifest_is_never_served(
        openstack, serve, tmp_path):
    """A chunk changed in the image volume after the export (behind
    Cinder's back): reading it is an I/O error, its neighbours read
    right, and nothing of it is cached."""
    from vmthunder.cinder import export as cinder_export
    image = tmp_path / "small.raw"
    image.write_bytes(os.urandom(4 << 20))
    image_id = upload_image(openstack, str(image), name="small")
    result = cinder_export.export_glance_image(settings_of(openstack),
                                               image_id, out=print)
    chunk = result.chunk_size
    with open(volume_file(openstack, result.volume_id), "r+b") as f:
        f.seek(5 * chunk)
        f.write(b"forged by whoever can write the storage node")
    conf = config_file(openstack, str(tmp_path / "vmthunder.conf"))
    srv = serve(f"cinder://{result.volume_id}",
                listen=f"unix:{tmp_path}/nbd.sock", config_file=conf,
                cache_dir=str(tmp_path / "cache"))
    uri = srv.uri(result.volume_id)

    def read(offset: int) -> subprocess.CompletedProcess:
        return subprocess.run(["qemu-io", "-r", "-f", "raw", "-c",
                               f"read -v {offset} {chunk}", uri],
                              capture_output=True, text=True, timeout=60)

    bad = read(5 * chunk)
    assert "Input/output error" in bad.stdout + bad.stderr, bad
    good = read(4 * chunk)
    assert "error" not in (good.stdout + good.stderr).lower(), good
    again = read(5 * chunk)         # not cached: checked (and refused) again
    assert "Input/output error" in again.stdout + again.stderr, again
    assert srv.stop() == 0
    assert "does not match its manifest" in srv.stderr()
    stats = srv.stats()["cache"]
    assert stats["verify_errors"] >= 2 and stats["chunks_present"] >= 1
    assert attachments_of(openstack, result.volume_id) == []


def test_wrong_chap_credentials_are_a_clear_error(openstack, exported):
    from vmthunder.blockdev import BlockError
    from vmthunder.cinder import client as cc
    from vmthunder.volume.cinder_source import open_manifest
    settings = settings_of(openstack)
    client = cc.volume_client(settings)
    att = cc.attach(client, exported["volume_id"], cc.connector(settings))
    try:
        bad = dataclasses.replace(att, password="not-the-secret-4711")
        with pytest.raises(BlockError) as info:
            asyncio.run(open_manifest(bad, None, timeout=10,
                                      reconnect_timeout=1))
        assert info.value.errno == errno.EACCES, info.value
        text = str(info.value)
        assert "authentication refused" in text, text
        assert att.username in text
        assert "not-the-secret-4711" not in text
        assert att.password not in text and att.password not in repr(att)
    finally:
        cc.detach(client, att.id, att.volume_id)
    assert attachments_of(openstack, exported["volume_id"]) == []


def test_export_errors_say_what_is_wrong(openstack, tmp_path):
    from vmthunder.cinder import export as cinder_export
    from vmthunder.cinder.client import CinderError
    settings = settings_of(openstack, create_timeout=120)

    queued = upload_image(openstack, None, name="never-uploaded")
    with pytest.raises(CinderError, match="'queued', not 'active'"):
        cinder_export.export_glance_image(settings, queued, out=print)

    with pytest.raises(CinderError, match="does not exist"):
        cinder_export.export_glance_image(
            settings, "00000000-0000-0000-0000-000000000000", out=print)

    port = services.free_port()
    down = dataclasses.replace(
        settings, endpoint=f"http://127.0.0.1:{port}/v3",
        glance_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(CinderError, match="unreachable"):
        cinder_export.export_glance_image(down, queued, out=print)

    # A volume of the image that Cinder could not make (as when its
    # backend failed): the export says so and what to do.
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(1 << 20))
    broken = upload_image(openstack, str(small), name="broken")
    from vmthunder.cinder import client as cc
    client = cc.volume_client(settings)
    failed = client.volumes.create(
        1, name=cinder_export.IMAGE_VOLUME.format(broken),
        metadata={cinder_export.META_IMAGE: broken})
    for _ in range(300):
        if client.volumes.get(failed.id).status != "creating":
            break
        time.sleep(0.2)
    client.volumes.reset_state(failed, "error")
    with pytest.raises(CinderError, match="is in error"):
        cinder_export.export_glance_image(settings, broken, out=print)
    # The CLI says the same, on stderr, with exit status 1.
    proc = vmthunder("--config-file",
                     config_file(openstack, str(tmp_path / "v.conf")),
                     "export", f"glance://{broken}", "--cinder")
    assert proc.returncode == 1
    assert "is in error" in proc.stderr and "cinder delete" in proc.stderr


RESOLVE = """
import json, sys, time
from nova_driver import cinder_origin
image_id, conf, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
resolver = cinder_origin.Resolver.from_files(conf, lock_timeout=240)
while time.time() < start:          # all hosts at once
    time.sleep(0.01)
result = resolver.resolve(image_id)
print(json.dumps(dict(origin=result.origin, changed=result.changed)))
"""


def test_nova_resolves_an_image_to_one_cinder_volume_under_a_lock(
        openstack, tmp_path):
    """[vmthunder] cinder_origin of the Nova driver: three processes, each
    like the nova-compute of one host in a mass boot, resolve the same
    Glance image at the same moment (nova_driver/cinder_origin.py: the
    export under a tooz lock, here tooz's file backend shared by the
    processes): Cinder makes one image volume and one manifest volume,
    every host gets the same cinder:// origin, exactly one made it; a
    later resolution finds it and changes nothing."""
    from nova_driver import cinder_origin
    from vmthunder.cinder import client as cc
    from vmthunder.cinder import export as cinder_export
    image = tmp_path / "mass.raw"
    image.write_bytes(os.urandom(2 << 20))
    image_id = upload_image(openstack, str(image), name="mass-boot")
    conf = config_file(openstack, str(tmp_path / "vmthunder.conf"))
    with open(conf, "a") as f:
        f.write(f"[coordination]\nbackend_url = "
                f"file://{tmp_path / 'locks'}\n")
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, image_id,
                               conf, str(start)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-3000:] + openstack.logs()
        results.append(json.loads(out.splitlines()[-1]))
    client = cc.volume_client(settings_of(openstack))

    def named(name: str) -> list:
        return [v for v in client.volumes.list(search_opts={"name": name})
                if v.name == name]
    [volume] = named(cinder_export.IMAGE_VOLUME.format(image_id))
    assert len(named(cinder_export.MANIFEST_VOLUME.format(image_id))) == 1
    assert {r["origin"] for r in results} == {f"cinder://{volume.id}"}
    assert sorted(r["changed"] for r in results) == [False, False, True]
    assert client.volumes.get(volume.id).status == "available"

    again = cinder_origin.Resolver.from_files(conf).resolve(image_id)
    assert again.origin == f"cinder://{volume.id}" and not again.changed
    assert len(named(cinder_export.IMAGE_VOLUME.format(image_id))) == 1


def test_export_quota_and_volume_type_errors_say_what_to_do(openstack,
                                                            tmp_path):
    """A volume type without multiattach, and a project out of volume
    quota: the export fails with what was wrong (the type's name; the
    project, the quota and its value) and what to do, and makes
    nothing."""
    from vmthunder.cinder import client as cc
    from vmthunder.cinder import export as cinder_export
    from vmthunder.cinder.client import CinderError
    settings = settings_of(openstack, create_timeout=120)
    client = cc.volume_client(settings)
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(1 << 20))
    image_id = upload_image(openstack, str(small), name="errors")

    def image_volumes() -> list:
        name = cinder_export.IMAGE_VOLUME.format(image_id)
        return [v for v in client.volumes.list(search_opts={"name": name})
                if v.name == name]

    plain = client.volume_types.create("vmthunder-test-plain")
    try:
        with pytest.raises(CinderError) as info:
            cinder_export.export_glance_image(
                dataclasses.replace(settings,
                                    volume_type="vmthunder-test-plain"),
                image_id, out=print)
        text = str(info.value)
        assert "volume type vmthunder-test-plain exists without the extra " \
            "spec multiattach='<is> True'" in text, text
        assert "cinder type-key vmthunder-test-plain set" in text, text
        assert image_volumes() == []
    finally:
        client.volume_types.delete(plain)

    project = services.PROJECT
    usage = client.quotas.get(project, usage=True).volumes
    old = client.quotas.get(project).volumes
    client.quotas.update(project, volumes=usage["in_use"]
                         + usage.get("reserved", 0))
    try:
        with pytest.raises(CinderError) as info:
            cinder_export.export_glance_image(settings, image_id, out=print)
        text = str(info.value)
        assert f"quota of project {project} exceeded" in text, text
        assert f"({usage['in_use'] + usage.get('reserved', 0)})" in text, \
            text
        assert "cinder quota-update" in text, text
        assert image_volumes() == []
    finally:
        client.quotas.update(project, volumes=old)
