"""Record a real boot's block trace, replay it, compare (bench/replay.py).

The small guest's boot time is mostly guest CPU under TCG; the replay
reproduces it only through the recorded think times, so matching it is
the test of the timing model. Both runs go through the same path: a cold
`vmthunder serve` of the image file with a snapshot for the VM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO, need
from vmthunder import trace as tr

pytestmark = pytest.mark.timeout(120)


def reads(t: tr.Trace) -> list[tuple[int, int]]:
    return sorted((r.offset, r.length) for r in t.reads())


def test_replay_reads_the_same_bytes_in_the_same_time(guest_dir, serve,
                                                      tmp_path):
    need("qemu-system-x86_64")
    real_path = str(tmp_path / "real.trace.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "boot", "--origin", "file",
         "--guest-dir", guest_dir, "--json", "--trace", real_path,
         "--cache-dir", str(tmp_path / "cache-real")],
        cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    boot = json.loads(proc.stdout.strip().splitlines()[-1])["vms"][0]
    assert boot["trace"] == real_path
    real = tr.load(real_path)
    assert real.header["recorder"] == "vmthunder boot"
    assert real.requests and real.requests[0].issue_s == 0.0
    # QEMU starts, then requests, then the marker; the trace's clock
    # agrees with the boot's own timing.
    assert real.header["vm_start_s"] <= 0 < real.boot_s
    assert real.boot_s - real.header["vm_start_s"] == \
        pytest.approx(boot["boot_s"], abs=0.01)
    assert real.read_bytes() == boot["guest_read_bytes"]

    # Replay on a fresh, cold server of the same image, itself traced.
    srv = serve(os.path.join(guest_dir, "root.img"), "--snapshot", "vm1",
                "--trace", str(tmp_path / "replayed.trace"),
                cache_dir=str(tmp_path / "cache-replay"),
                listen=f"unix:{tmp_path}/nbd.sock")
    out = subprocess.run(
        [sys.executable, "-m", "vmthunder.bench.replay", real_path,
         "--nbd", srv.uri("vm1")],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    srv.stop()
    assert not result["failed"], result["error"]
    assert result["errors"] == 0
    assert result["requests"] == len(real.requests)

    # (a) The same bytes read: same extents, same working set, same
    # chunks fetched into a cold cache.
    replayed = tr.load(str(tmp_path / "replayed.vm1.trace"))
    assert reads(replayed) == reads(real)
    assert replayed.working_set_bytes() == real.working_set_bytes()
    assert result["bytes_read"] == boot["guest_read_bytes"]
    assert result["bytes_written"] == boot["guest_written_bytes"]
    stats = srv.stats()
    assert stats["cache"]["bytes_fetched"] == boot["fetched_bytes"]
    assert not os.path.exists(tmp_path / "replayed.root.trace"), \
        "an export nobody used got a trace"

    # (b) The same boot time, within 15%: from the first request, and
    # from QEMU's start as `vmthunder boot` reports it.
    print(f"real boot {real.boot_s:.3f} s after the first request "
          f"({boot['boot_s']:.3f} s from QEMU start); replay "
          f"{result['boot_s']:.3f} s ({result['boot_from_vm_start_s']:.3f}"
          f" s); working set {real.working_set_bytes()} bytes")
    assert result["boot_s"] == pytest.approx(real.boot_s, rel=0.15)
    assert result["boot_from_vm_start_s"] == pytest.approx(boot["boot_s"],
                                                           rel=0.15)
