"""The whole-disk test guest (scripts/build-guest-disk.sh) boots from its
disk alone, as Nova boots an instance: with plain QEMU, and as a libvirt
domain whose disk is an NBD export of `vmthunder serve` on a unix socket.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time

import pytest

from tests.functional.conftest import need
from tests.functional.libvirt_fixtures import libvirtd  # noqa: F401

pytestmark = pytest.mark.timeout(240)

BOOT_TIMEOUT = 120


def _mtime(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def test_disk_layout(guest_disk):
    """MBR with boot code, root partition 1 = the small guest's root.img,
    active FAT boot partition 2."""
    with open(guest_disk["path"], "rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[:440].strip(b"\0"), "no boot code in the MBR"
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i)
               for i in range(4)]
    (flag1, type1, start1, size1), (flag2, type2, start2, size2) = entries[:2]
    root, boot = guest_disk["root_partition"], guest_disk["boot_partition"]
    assert (type1, start1 * 512, size1 * 512) == \
        (0x83, root["start_bytes"], root["size_bytes"])
    assert (flag2, type2, start2 * 512) == (0x80, 0x0C, boot["start_bytes"])
    assert flag1 == 0 and entries[2][1] == entries[3][1] == 0
    assert guest_disk["root_device"] == "/dev/vda1"
    assert "root=/dev/vda1" in guest_disk["append"]
    assert os.path.getsize(guest_disk["path"]) == guest_disk["size_bytes"]


def test_disk_boots_with_plain_qemu(guest_disk):
    """No -kernel/-initrd: BIOS, MBR, SYSLINUX, kernel, root on vda1."""
    need("qemu-system-x86_64")
    disk = guest_disk["path"]
    before = _mtime(disk)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m",
            str(guest_disk["memory_mb"]), "-smp", "1", "-nographic",
            "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    started = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=BOOT_TIMEOUT)
    elapsed = time.monotonic() - started
    console = proc.stdout.decode("utf-8", "replace")
    why = console[-3000:]
    assert "SYSLINUX" in console, why
    for marker in ("marker", "read_marker", "write_marker"):
        assert guest_disk[marker] in console, why
    assert guest_disk["failure_marker"] not in console, why
    assert "I/O error" not in console, why
    # The guest powered itself off (QEMU exited without our help).
    assert proc.returncode == 0, why
    assert _mtime(disk) == before, "snapshot=on boot changed disk.img"
    print(f"plain qemu: whole-disk guest booted and powered off in "
          f"{elapsed:.2f} s")


def _domain_xml(name: str, memory_mb: int, socket_path: str, export: str,
                console_log: str) -> str:
    # Close to what Nova writes for an instance on a network disk: ACPI
    # (the guest's poweroff), a pty serial console logged by virtlogd.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='{export}'>
        <host transport='unix' socket='{socket_path}'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='{console_log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def test_disk_boots_as_libvirt_domain_from_vmthunder_nbd(
        libvirtd, guest_disk, serve, tmp_path):  # noqa: F811
    """libvirt (type='qemu') boots the disk through `vmthunder serve
    DISK --snapshot vm1` on a unix socket; the disk stays untouched."""
    disk = guest_disk["path"]
    before = _mtime(disk)
    sock = str(tmp_path / "nbd.sock")
    srv = serve(disk, "--snapshot", "vm1", listen=f"unix:{sock}")
    name = libvirtd.track(f"vmthunder-test-disk-{os.getpid()}")
    console_log = str(tmp_path / "console.log")
    xml = tmp_path / "domain.xml"
    xml.write_text(_domain_xml(name, guest_disk["memory_mb"], sock, "vm1",
                               console_log))
    libvirtd.remove_domain(name)          # a leftover of a killed run
    libvirtd.virsh("define", str(xml))
    try:
        dumped = libvirtd.virsh("dumpxml", name).stdout
        assert "transport='unix'" in dumped and sock in dumped, dumped
        started = time.monotonic()
        libvirtd.virsh("start", name)
        marker_s = None
        deadline = started + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            console = _read(console_log)
            if marker_s is None and guest_disk["marker"] in console:
                marker_s = time.monotonic() - started
            if guest_disk["failure_marker"] in console:
                break
            # Done once the guest has written and powered off.
            if guest_disk["write_marker"] in console and \
                    libvirtd.state(name) == "shut off":
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        console = _read(console_log)
        why = (f"console:\n{console[-3000:]}\nqemu log:\n"
               f"{libvirtd.qemu_log(name)[-3000:]}\nserver:\n"
               f"{srv.stderr()[-3000:]}")
        assert marker_s is not None, why
        for marker in ("read_marker", "write_marker"):
            assert guest_disk[marker] in console, why
        assert guest_disk["failure_marker"] not in console, why
        assert "I/O error" not in console, why
        assert libvirtd.state(name) == "shut off", why
    finally:
        libvirtd.remove_domain(name)
    assert name not in libvirtd.domains()
    srv.stop()
    stats = srv.stats()
    vm1 = stats["snapshots"]["vm1"]
    # The BIOS and SYSLINUX read the boot partition (kernel, initramfs),
    # the guest its root: all through vmthunder; its writes stayed in vm1.
    assert vm1["bytes_read"] > 15 * 1024 * 1024, stats
    assert vm1["bytes_written"] > 0, stats
    assert stats["cache"]["bytes_fetched"] > 0, stats
    assert _mtime(disk) == before
    print(f"libvirt + vmthunder NBD: marker after {marker_s:.2f} s, "
          f"powered off after {elapsed:.2f} s; guest read "
          f"{vm1['bytes_read'] / 2**20:.1f} MiB")
