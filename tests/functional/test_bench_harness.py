"""`vmthunder bench` in its smallest form: real namespaces, tgtd, nbdkit,
qemu-nbd and `vmthunder serve`, virtual VMs replaying the small guest's
boot trace (and one real QEMU boot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO, need
from vmthunder import privileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="network namespaces and tgtd need "
                                       "root")


def namespaces_of(pid: int) -> set[str]:
    """Namespaces a harness process (pid) made: vmt-PID-TAG-ROLE."""
    return {ns for ns in privileged.netns_list()
            if ns.startswith(f"vmt-{pid}-")}


def bench(tmp_path, *args, timeout=300):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmthunder.cli", "bench", "--guest", "small",
         "--output", str(out), "--workdir", str(tmp_path), "--no-plots",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO)
    try:
        proc.stdout_text, proc.stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stdout = proc.stdout_text
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() \
        else "{}"
    report = None
    if (out / "results.json").exists():
        report = json.loads((out / "results.json").read_text())
    return proc, json.loads(last), report


def test_every_strategy_boots_every_vm_and_leaves_nothing(tmp_path,
                                                          guest_dir):
    need("tgtd", "nbdkit", "nbdcopy", "qemu-nbd")
    proc, summary, report = bench(tmp_path, "--hosts", "2",
                                  "--vms-per-host", "2", "--no-sim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(summary["strategies"]) == {"copy", "precache", "direct",
                                          "lazy", "vmthunder",
                                          "vmthunder-prefetch", "tree"}
    ws = summary["working_set_bytes"]
    image = report["image_allocated_bytes"]
    for name, row in report["strategies"].items():
        assert row["booted"] == 4 and not row["failed"], (name, row)
        assert row["all_booted_s"] >= row["p50_boot_s"] > 0
    origin = {n: r["origin_bytes"] for n, r in report["strategies"].items()}
    # The shape the strategies must have (TCP/iSCSI headers add a few %):
    # (nbdcopy skips holes, but moves some zeros next to data)
    assert 2 * image <= origin["copy"] <= 2.2 * report["image_size"]
    assert origin["copy"] > origin["lazy"]
    assert origin["precache"] < 0.01 * image          # copied before
    assert 4 * ws <= origin["direct"] <= 4.6 * ws
    # lazy: each host fetches the chunks the boot touches, once.
    assert 2 * ws <= origin["lazy"] \
        <= 1.1 * 2 * report["working_set_chunk_bytes"]
    # vmthunder and tree: each chunk leaves the origin about once, the
    # rest goes between the hosts.
    for peer in ("vmthunder", "vmthunder-prefetch", "tree"):
        assert report["working_set_chunk_bytes"] <= origin[peer] \
            <= 1.2 * report["working_set_chunk_bytes"], peer
        assert report["strategies"][peer]["host_sent_bytes"] \
            >= 0.9 * report["working_set_chunk_bytes"], peer
    assert report["strategies"]["precache"]["precache_s"] > 0
    # The agents' fetch latency by source, added up over the hosts (what
    # the simulator learns its per-fetch costs from): tree hosts read
    # their parent (host1) or the origin (host0); vmthunder hosts read
    # their chunks from the origin and the other's from it, its owner.
    tree = report["strategies"]["tree"]["fetch_latency"]
    assert set(tree) == {"origin", "parent"}, tree
    mesh = report["strategies"]["vmthunder"]["fetch_latency"]
    assert {"origin", "owner"} <= set(mesh), mesh
    for row in (*tree.values(), *mesh.values()):
        assert row["fetches"] > 0 and row["mean_ms"] > 0, row
    # The trace published with the export, prefetched by both hosts'
    # agents (each chunk by its owner), used by their guests; none
    # without prefetch.
    prefetch = report["strategies"]["vmthunder-prefetch"]["prefetch"]
    assert prefetch["hosts"] == 2, prefetch
    assert prefetch["chunks_prefetched"] > 0 and prefetch["chunks_used"] > 0
    assert report["strategies"]["vmthunder"]["prefetch"] is None
    # Clean: no namespace, no leftover process of the run, no workdir.
    assert namespaces_of(proc.pid) == set()
    assert not [p for p in os.listdir(tmp_path)
                if p.startswith("vmthunder-bench-")]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True,
                        text=True).stdout
    assert str(tmp_path) not in ps


def test_a_vm_that_does_not_boot_is_reported_failed(tmp_path, guest_dir):
    """VMs that cannot finish in --vm-timeout count as failed: no boot
    time, no all_booted_s, exit status 1."""
    need("tgtd")
    proc, summary, report = bench(tmp_path, "--hosts", "1",
                                  "--vms-per-host", "2", "--strategies",
                                  "lazy", "--vm-timeout", "0.5", "--no-sim")
    assert proc.returncode == 1, proc.stderr[-3000:]
    row = report["strategies"]["lazy"]
    assert row["booted"] == 0 and len(row["failed"]) == 2
    assert row["all_booted_s"] is None and row["p50_boot_s"] is None
    assert all(t is None for t in row["boot_s"].values())
    assert summary["strategies"]["lazy"]["failed"] == 2
    assert namespaces_of(proc.pid) == set()


def test_real_qemu_boot_through_lazy(tmp_path, guest_dir):
    need("tgtd", "qemu-system-x86_64")
    proc, summary, report = bench(tmp_path, "--hosts", "1",
                                  "--vms-per-host", "1", "--strategies",
                                  "lazy", "--workload", "qemu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = report["strategies"]["lazy"]
    assert row["booted"] == 1 and row["all_booted_s"] > 1
    assert row["origin_bytes"] >= report["working_set_bytes"]
