"""Images as Cinder volumes, against real services started by the test.

The test guest's root file system goes to Glance, `vmthunder export
glance://ID --cinder` makes it a read-only multiattach Cinder volume (on
vmthunder's file driver, exported by Cinder's tgtadm target helper) with
its manifest volume, and `vmthunder serve cinder://ID` attaches both with
the attachments API and CHAP, serves the guest's disk over NBD and QEMU
boots it. The origin volume is never written, no attachment is left
after serve stops, wrong CHAP credentials and each export failure give a
clear error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import glob
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import REPO, need
from tests.functional.test_boot import qemu_boot, sha256
from tests.openstack import services
from tests.openstack.conftest import (config_file, settings_of,
                                      upload_image, volume_file)

pytestmark = pytest.mark.timeout(600)


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


def test_second_agent_reads_the_cinder_origin_from_the_first(
        openstack, exported, tmp_path):
    """Two agents (peers on loopback TCP, membership through tooz's file
    backend) attach the same cinder://ID: once the first holds the image,
    the second's chunks come from it, not from the volume; both detach
    and no attachment is left."""
    need("qemu-img")
    from tests.functional.test_agent import start_agent
    vol, manifest_id, path, before = origin_volumes(openstack, exported)
    with open(exported["conf"]) as f:
        section = f.read()
    coordination = f"file://{tmp_path / 'coordination'}"
    agents = []
    try:
        for name in ("host-a", "host-b"):
            port = services.free_port()
            agents.append(start_agent(
                str(tmp_path / name), "--peer-listen",
                f"tcp:127.0.0.1:{port}", "--peer-mode", "mesh",
                config=section + "[coordination]\n"
                f"backend_url = {coordination}\nmember_id = {name}\n"
                "heartbeat_interval = 0.25\n"))
        a, b = agents
        a.client.attach_image("guest", f"cinder://{vol}")
        vm_a = a.client.create_vm("vm-a", "guest")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        vm_a["nbd"], str(tmp_path / "a.raw")], check=True,
                       timeout=120)
        sa = a.client.status()["images"]["guest"]
        # All but the holes the origin reports (qemu-img skips them).
        assert sa["chunks_held"] >= sa["chunks_total"] * 3 // 4, sa

        b.client.attach_image("guest", f"cinder://{vol}")
        vm_b = b.client.create_vm("vm-b", "guest")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        vm_b["nbd"], str(tmp_path / "b.raw")], check=True,
                       timeout=120)
        assert head_sha256(str(tmp_path / "b.raw"), exported["size"]) == \
            exported["digest"]
        sb = b.client.status()["images"]["guest"]
        # Most from the first host (seen here: ~63%; the rest are regions
        # the second one owns, fetched from the origin).
        assert sb["bytes_from_peers"] > sb["bytes_from_origin"], sb
        assert sb["fetch_errors"] == 0, sb
        # The first host detaches: the volume stays exported for the
        # second (the driver reports the shared export to Cinder).
        a.client.delete_vm("vm-a")
        a.client.detach_image("guest")
        assert [x.volume_id for x in attachments_of(openstack, vol)] == [vol]
        assert any(vol in iqn for iqn in openstack.targets().values())
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        vm_b["nbd"], str(tmp_path / "b2.raw")], check=True,
                       timeout=120)
        assert "connection lost" not in b.stderr(), b.stderr()[-3000:]
        b.client.delete_vm("vm-b")
        b.client.detach_image("guest")
        assert attachments_of(openstack, vol, manifest_id) == []
        assert not any(vol in iqn for iqn in openstack.targets().values())
    finally:
        for agent in agents:
            agent.stop()
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
