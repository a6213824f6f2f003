"""OsBrickSource: an iSCSI LUN attached by the kernel initiator (os-brick).

The real attach needs open-iscsi (``iscsiadm``) and a kernel iSCSI
initiator; machines like the CI one have neither (no kernel SCSI at
all), so :func:`test_osbrick_attach_real` skips there with the reason
:func:`kernel_initiator_available` gives. Everything around the attach
(connection properties, reading the device, the manifest check,
identity, disconnects, selection) is tested with a stand-in connector
whose "device" is a regular file holding the LUN's bytes, and compared
with a real IscsiSource on a real tgtd export of the same files.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import types

import pytest
from oslo_config import cfg

from tests.functional.iscsi_fixtures import tgtd  # noqa: F401
from vmthunder import opts, stack
from vmthunder.blockdev import BlockError
from vmthunder.volume import osbrick_source
from vmthunder.volume.iscsi_source import IscsiSource
from vmthunder.volume.manifest import build_manifest
from vmthunder.volume.osbrick_source import (OsBrickSource, choose_attach,
                                             kernel_initiator_available)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
IQN = "iqn.2024-01.org.vmthunder.test:osbrick"
PORTAL = "192.0.2.7:3261"


def run(coro):
    return asyncio.run(coro)


def pad512(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def export_files(tmp_path, size: int, manifest_size: int | None = None,
                 seed: int = 7):
    """Files as `vmthunder export` lays them out: LUN 1 the image padded
    to 512, LUN 2 the manifest JSON NUL-padded to 512."""
    data = random.Random(seed).randbytes(size)
    volume = tmp_path / "volume.raw"
    volume.write_bytes(pad512(data))
    manifest_size = size if manifest_size is None else manifest_size
    other = tmp_path / "manifest-of.raw"
    other.write_bytes(data[:manifest_size] if manifest_size <= size
                      else data + bytes(manifest_size - size))
    manifest = build_manifest(str(other), "img", 256 * 1024)
    mlun = tmp_path / "manifest.lun"
    mlun.write_bytes(pad512(manifest.to_bytes()))
    return data, str(volume), str(mlun), manifest


class FakeConnector:
    """Stands in for os-brick's ISCSIConnector, which cannot attach on a
    machine without a kernel initiator: connect_volume returns a regular
    file holding the LUN's bytes as the "device" path."""

    def __init__(self, luns: dict[int, str], fail_luns=()):
        self.luns = luns
        self.fail_luns = set(fail_luns)
        self.connected: list[dict] = []
        self.disconnected: list[tuple[dict, dict]] = []
        self.threads: set[int] = set()

    def connect_volume(self, props):
        self.threads.add(threading.get_ident())
        self.connected.append(dict(props))
        lun = props["target_lun"]
        if lun in self.fail_luns:
            raise RuntimeError(f"iscsiadm: Could not log into all portals "
                               f"(LUN {lun} did not show up)")
        return {"type": "block", "path": self.luns[lun],
                "scsi_wwn": f"wwn-{lun}"}

    def disconnect_volume(self, props, device_info, force=False,
                          ignore_errors=False):
        self.threads.add(threading.get_ident())
        self.disconnected.append((dict(props), dict(device_info)))


def iscsi_identity(manifest, target, lun, lun_size) -> str:
    """IscsiSource.identity() for this export, without a live session."""
    return IscsiSource.identity(types.SimpleNamespace(
        manifest=manifest, target=target, lun=lun, lun_size=lun_size))


# -- (b) the source, with a stand-in connector ------------------------

def test_osbrick_source_with_mock_connector_reads_the_attached_device(
        tmp_path):
    """A mock connector stands in for os-brick's: the real one needs
    iscsiadm and a kernel initiator, which this machine lacks, so it
    cannot attach here. The "device" it returns is a regular file with
    the LUN's bytes; everything else is the real OsBrickSource."""
    size = 3 * MiB + 1000                      # LUN rounds up to 512
    data, volume, mlun, manifest = export_files(tmp_path, size)
    conn = FakeConnector({1: volume, 2: mlun})
    url = f"iscsi://alice@{PORTAL}/{IQN}/1"

    async def main():
        src = await OsBrickSource.open(url, password="s3cret",
                                       connector=conn)
        assert threading.get_ident() not in conn.threads  # worker threads
        # Connection properties: portal, IQN, LUN, CHAP; image LUN first.
        assert [p["target_lun"] for p in conn.connected] == [1, 2]
        for props, lun in zip(conn.connected, (1, 2)):
            assert props["target_portal"] == PORTAL
            assert props["target_iqn"] == IQN
            assert props["target_lun"] == lun
            assert props["auth_method"] == "CHAP"
            assert props["auth_username"] == "alice"
            assert props["auth_password"] == "s3cret"
            assert props["target_discovered"] is False
            assert props["encrypted"] is False
            assert props["volume_id"]
        try:
            assert src.manifest == manifest
            assert src.lun_size == size + 24 and src.size == size
            assert src.path == volume
            assert src.identity() == manifest.identity()
            assert src.identity() == iscsi_identity(manifest, IQN, 1,
                                                    size + 24)
            assert await src.read(0, size) == data
            assert await src.read(size - 7, 7) == data[-7:]
            buf = bytearray(4097)
            await src.read_into(12345, buf)
            assert bytes(buf) == data[12345:12345 + 4097]
            got = await asyncio.gather(*(src.read(o, 65536 + 3)
                                         for o in range(0, MiB, 65536)))
            assert got == [data[o:o + 65539] for o in range(0, MiB, 65536)]
            for i in range(manifest.chunks):
                start, n = manifest.chunk_range(i)
                manifest.verify(i, await src.read(start, n))
            with pytest.raises(BlockError):
                await src.read(size - 7, 8)        # past the image end
            assert src.stats()["bytes_read"] > size
            assert not conn.disconnected
        finally:
            await src.close()
        # Both volumes disconnected, with the props and device info
        # connect_volume gave (manifest first, then the image).
        assert sorted(p["target_lun"] for p, _ in conn.disconnected) \
            == [1, 2]
        for props, info in conn.disconnected:
            assert info["path"] == {1: volume, 2: mlun}[props["target_lun"]]
            assert props["auth_password"] == "s3cret"
        await src.close()                           # idempotent
        assert len(conn.disconnected) == 2
        with pytest.raises(BlockError) as info:
            await src.read(0, 1)
        assert info.value.errno == errno.EIO
    run(main())


def test_without_manifest_identity_matches_iscsi_source(tmp_path):
    data, volume, _, _ = export_files(tmp_path, 2 * MiB + 100)
    conn = FakeConnector({1: volume})

    async def main():
        src = await OsBrickSource.open(f"iscsi://{PORTAL}/{IQN}/1",
                                       manifest_lun=None, connector=conn)
        try:
            assert "auth_method" not in conn.connected[0]
            assert len(conn.connected) == 1
            assert src.manifest is None
            assert src.size == src.lun_size == os.path.getsize(volume)
            assert src.identity() == f"iscsi:{IQN}/1:{src.lun_size}"
            assert src.identity() == iscsi_identity(None, IQN, 1,
                                                    src.lun_size)
            assert await src.read(0, len(data)) == data
        finally:
            await src.close()
        assert len(conn.disconnected) == 1
    run(main())


@pytest.mark.parametrize("manifest_size", [3 * MiB - 4096, 3 * MiB + 512])
def test_size_mismatch_refused_and_both_disconnected(tmp_path,
                                                     manifest_size):
    _, volume, mlun, _ = export_files(tmp_path, 3 * MiB, manifest_size)
    conn = FakeConnector({1: volume, 2: mlun})

    async def main():
        with pytest.raises(BlockError) as info:
            await OsBrickSource.open(f"iscsi://{PORTAL}/{IQN}/1",
                                     connector=conn)
        assert info.value.errno == errno.EINVAL
        assert (f"LUN size {3 * MiB} disagrees with its manifest "
                f"({manifest_size}") in str(info.value)
        assert sorted(p["target_lun"] for p, _ in conn.disconnected) \
            == [1, 2]
    run(main())


def test_not_a_manifest_and_attach_failures_name_portal_and_iqn(tmp_path):
    _, volume, _, _ = export_files(tmp_path, MiB)
    garbage = tmp_path / "garbage.lun"
    garbage.write_bytes(pad512(b"\x01garbage" * 100))
    url = f"iscsi://{PORTAL}/{IQN}/1"

    async def main():
        conn = FakeConnector({1: volume, 2: str(garbage)})
        with pytest.raises(BlockError) as info:
            await OsBrickSource.open(url, connector=conn)
        assert info.value.errno == errno.EINVAL
        assert f"{IQN}/2" in str(info.value)
        assert len(conn.disconnected) == 2

        conn = FakeConnector({1: volume}, fail_luns={1})
        with pytest.raises(BlockError) as info:
            await OsBrickSource.open(url, connector=conn)
        text = str(info.value)
        assert f"cannot attach iSCSI LUN {IQN}/1 at portal {PORTAL}" in text
        assert "Could not log into all portals" in text
        assert not conn.disconnected

        # The manifest LUN fails: the image LUN is disconnected again.
        conn = FakeConnector({1: volume}, fail_luns={2})
        with pytest.raises(BlockError) as info:
            await OsBrickSource.open(url, connector=conn)
        assert f"manifest iSCSI LUN {IQN}/2 at portal {PORTAL}" \
            in str(info.value)
        assert [p["target_lun"] for p, _ in conn.disconnected] == [1]

        with pytest.raises(ValueError):
            await OsBrickSource.open(url, manifest_lun=1, connector=conn)
    run(main())


def test_identity_equals_real_iscsi_source_on_the_same_export(
        tgtd, tmp_path):  # noqa: F811
    """The cache key must not depend on the attach path: a real
    IscsiSource on a tgtd export of the same files names the same
    identity as OsBrickSource over them, with and without a manifest."""
    size = 2 * MiB + 300
    _, volume, mlun, manifest = export_files(tmp_path, size)
    daemon = tgtd()
    target = daemon.add_target(IQN)
    daemon.add_lun(target, 1, volume)
    daemon.add_lun(target, 2, mlun)
    url = daemon.url(target, 1)

    async def main():
        for manifest_lun in (2, None):
            real = await IscsiSource.open(url, manifest_lun=manifest_lun)
            brick = await OsBrickSource.open(
                url, manifest_lun=manifest_lun,
                connector=FakeConnector({1: volume, 2: mlun}))
            try:
                assert brick.identity() == real.identity()
                assert brick.size == real.size
                assert await brick.read(0, 4096) == await real.read(0, 4096)
            finally:
                await real.close()
                await brick.close()
        assert brick.identity() != manifest.identity()   # the no-manifest
    run(main())


# -- (a) the real attach ------------------------------------------------

def test_osbrick_attach_real(tgtd, tmp_path):  # noqa: F811
    ok, why = kernel_initiator_available()
    if not ok:
        pytest.skip(f"no kernel iSCSI initiator here: {why}")
    brick_ok, brick_why = osbrick_source.os_brick_available()
    if not brick_ok:
        pytest.skip(brick_why)
    size = 4 * MiB + 512
    data, volume, mlun, manifest = export_files(tmp_path, size)
    daemon = tgtd(host="127.0.0.1")
    target = daemon.add_target(IQN)
    daemon.add_lun(target, 1, volume)
    daemon.add_lun(target, 2, mlun)
    daemon.add_chap(target, "alice", "correct-horse-1")

    async def main():
        src = await OsBrickSource.open(
            daemon.url(target, 1, user="alice"),
            password="correct-horse-1", manifest_lun=2,
            root_helper=os.environ.get("VMTHUNDER_ROOT_HELPER"))
        try:
            assert src.path.startswith("/dev/")
            assert src.identity() == manifest.identity()
            assert await src.read(0, size) == data
        finally:
            await src.close()
    run(main())


# -- (c) selection ----------------------------------------------------

def test_kernel_initiator_detection(tmp_path):
    which = {"iscsiadm": "/usr/sbin/iscsiadm"}.get
    ok, why = kernel_initiator_available(sys_root=str(tmp_path),
                                         which=lambda n: None, release="x")
    assert not ok and "iscsiadm is not on PATH" in why
    ok, why = kernel_initiator_available(sys_root=str(tmp_path),
                                         which=which, release="6.1.0-9")
    assert not ok and "kernel 6.1.0-9 has no iSCSI initiator" in why
    moddir = tmp_path / "lib" / "modules" / "6.1.0-9"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/drivers/scsi/iscsi_tcp.ko.xz: kernel/drivers/scsi/"
        "libiscsi_tcp.ko.xz\n")
    ok, why = kernel_initiator_available(sys_root=str(tmp_path),
                                         which=which, release="6.1.0-9")
    assert ok and "iscsi_tcp module" in why
    (tmp_path / "sys" / "module" / "iscsi_tcp").mkdir(parents=True)
    ok, why = kernel_initiator_available(sys_root=str(tmp_path),
                                         which=which, release="other")
    assert ok and "/sys/module/iscsi_tcp exists" in why


def test_choose_attach_modes():
    yes = lambda: (True, "has it")                   # noqa: E731
    no = lambda: (False, "iscsiadm is not on PATH")  # noqa: E731
    brick = lambda: (True, "os-brick 7")             # noqa: E731
    nobrick = lambda: (False, "os-brick cannot be imported")  # noqa: E731
    assert choose_attach("auto", kernel_check=yes, brick_check=brick)[0] \
        == "kernel"
    assert choose_attach("auto", kernel_check=no, brick_check=brick)[0] \
        == "userspace"
    assert choose_attach("auto", kernel_check=yes,
                         brick_check=nobrick)[0] == "userspace"
    assert choose_attach("userspace", kernel_check=yes,
                         brick_check=brick)[0] == "userspace"
    assert choose_attach("kernel", kernel_check=yes,
                         brick_check=brick)[0] == "kernel"
    with pytest.raises(BlockError) as info:
        choose_attach("kernel", kernel_check=no, brick_check=brick)
    assert info.value.errno == errno.ENODEV
    assert "iscsiadm is not on PATH" in str(info.value)
    with pytest.raises(ValueError):
        choose_attach("magic")


def iscsi_conf(attach: str):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[], default_config_dirs=[])
    conf.set_override("attach", attach, "iscsi")
    return conf.iscsi


def test_serve_selects_by_attach_option(monkeypatch, caplog):
    chosen = []

    async def fake_userspace(url, **kwargs):
        chosen.append(("userspace", url, kwargs))
        return "userspace-source"

    async def fake_kernel(url, **kwargs):
        chosen.append(("kernel", url, kwargs))
        return "kernel-source"

    monkeypatch.setattr(IscsiSource, "open", fake_userspace)
    monkeypatch.setattr(OsBrickSource, "open", fake_kernel)
    url = f"iscsi://{PORTAL}/{IQN}/1"
    origin = stack.Origin.parse(url)
    available, why = kernel_initiator_available()
    brick, _ = osbrick_source.os_brick_available()

    caplog.set_level("INFO", logger="vmthunder.stack")
    got = run(stack.open_source(origin, iscsi_conf("auto")))
    expected = "kernel" if available and brick else "userspace"
    assert got == f"{expected}-source"
    assert f"{expected} initiator" in caplog.text
    if not available:                      # this machine: say why
        assert why in caplog.text
    assert run(stack.open_source(origin, iscsi_conf("userspace"))) \
        == "userspace-source"
    assert chosen[-1][2]["manifest_lun"] == 2

    with pytest.raises(ValueError):
        iscsi_conf("magic")
    if available and brick:
        assert run(stack.open_source(origin, iscsi_conf("kernel"))) \
            == "kernel-source"
        return
    n = len(chosen)
    with pytest.raises(BlockError) as info:
        run(stack.open_source(origin, iscsi_conf("kernel")))
    assert info.value.errno == errno.ENODEV
    assert "[iscsi] attach = kernel" in str(info.value)
    assert "kernel initiator" in str(info.value)
    assert len(chosen) == n                # nothing was attempted
