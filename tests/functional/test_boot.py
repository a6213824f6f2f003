"""Real VM boots under QEMU (TCG) through `vmthunder serve`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO, need

pytestmark = pytest.mark.timeout(240)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qemu_boot(guest_dir: str, uri: str, timeout: float = 90,
              wrap=None) -> str:
    """Boot the test guest from ``uri``; return its console output.
    ``wrap``: argv -> the argv to run (e.g. in a network namespace)."""
    with open(os.path.join(guest_dir, "guest.json")) as f:
        meta = json.load(f)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", os.path.join(guest_dir, meta["kernel"]),
            "-initrd", os.path.join(guest_dir, meta["initrd"]),
            "-append", meta["append"],
            "-drive", f"file={uri},format=raw,if=virtio,cache=none"]
    proc = subprocess.run(wrap(argv) if wrap else argv,
                          stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)
    return proc.stdout.decode("utf-8", "replace")


def test_two_vms_boot_from_one_cache_second_fetches_nothing(
        guest_dir, serve, tmp_path):
    """Two VMs, one cache: both boot, both write, the base never changes."""
    need("qemu-system-x86_64")
    image = os.path.join(guest_dir, "root.img")
    before = sha256(image)
    srv = serve(image, "--snapshot", "vm1", "--snapshot", "vm2",
                listen=f"unix:{tmp_path}/nbd.sock")

    console1 = qemu_boot(guest_dir, srv.uri("vm1"))
    why = console1[-3000:] + "\nserver:\n" + srv.stderr()[-3000:]
    assert "VMTHUNDER-BOOT-OK" in console1, why
    assert "VMTHUNDER-READ-OK" in console1, why
    assert "VMTHUNDER-WRITE-OK" in console1, why
    assert "I/O error" not in console1, why
    srv.stop()
    first = srv.stats()
    fetched_first = first["cache"]["bytes_fetched"]
    assert fetched_first > 0
    assert first["snapshots"]["vm1"]["bytes_written"] > 0
    # The boot reads a small part of the image.
    assert first["snapshots"]["vm1"]["bytes_read"] < first["image_size"] / 4

    # Same cache, new process: vm2 boots with nothing from the source.
    srv2 = serve(image, "--snapshot", "vm1", "--snapshot", "vm2",
                 listen=f"unix:{tmp_path}/nbd2.sock")
    console2 = qemu_boot(guest_dir, srv2.uri("vm2"))
    why = console2[-3000:] + "\nserver:\n" + srv2.stderr()[-3000:]
    assert "VMTHUNDER-WRITE-OK" in console2, why
    assert "I/O error" not in console2, why
    srv2.stop()
    second = srv2.stats()
    assert second["cache"]["bytes_fetched"] == 0, srv2.stderr()[-5000:]
    assert second["source"]["bytes_read"] == 0
    assert second["snapshots"]["vm2"]["bytes_read"] > 0
    # Each VM counts its boots in its own snapshot: vm2 starts from the
    # base image's count, so it did not see vm1's write.
    count1 = re.search(r"boot-count=(\d+)", console1).group(1)
    count2 = re.search(r"boot-count=(\d+)", console2).group(1)
    assert count1 == count2, (count1, count2)
    assert sha256(image) == before


def _tgtd_on(portal: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-x", "tgtd"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines()
            if f"portal={portal}" in line and "<defunct>" not in line]


def test_vmthunder_boot_command_reports_cold_then_warm(guest_dir, tmp_path):
    """The README's main command, with two VMs on one cache.

    As root (CI) the image comes from an iSCSI LUN on a tgtd of the boot's
    own, which is gone afterwards.
    """
    need("qemu-system-x86_64")
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "boot", "--vms", "2",
         "--json", "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vms = json.loads(proc.stdout.strip().splitlines()[-1])["vms"]
    assert [v["vm"] for v in vms] == ["vm1", "vm2"]
    cold, warm = vms
    expected = "iscsi" if os.geteuid() == 0 and shutil.which("tgtd") \
        else "file"
    assert cold["origin"] == warm["origin"] == expected
    if expected == "iscsi":
        assert _tgtd_on(cold["origin_portal"]) == [], \
            "boot left its tgtd running"
    assert cold["fetched_bytes"] >= cold["guest_read_bytes"] > 0
    assert warm["fetched_bytes"] == 0
    assert warm["guest_read_bytes"] > 0
    assert 0 < cold["boot_s"] < 120
    # Snapshots of finished VMs are deleted, the cache stays.
    leftovers = [p for p, _, files in os.walk(tmp_path / "cache")
                 for f in files if f.endswith(".overlay")]
    assert leftovers == []
