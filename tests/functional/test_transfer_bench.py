"""`python -m vmthunder.bench.transfer --smoke` runs end to end: every
driver it can run here (file; nbd with qemu-nbd and nbdcopy; http with
curl; iscsi with tgtd as root) copies the image, each output is checked
against it, and the last line is JSON with a ratio per driver. The 1.1
target is not enforced here (a loaded CI machine makes it noise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO, need

pytestmark = pytest.mark.timeout(300)


def test_transfer_bench_smoke(tmp_path):
    need("qemu-img", "qemu-nbd", "nbdcopy", "curl")
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.bench.transfer", "--smoke",
         "--workdir", str(tmp_path)], capture_output=True, text=True,
        timeout=240, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    drivers = ["file", "nbd", "http"]
    if os.geteuid() == 0 and shutil.which("tgtd"):
        drivers.append("iscsi")
    for name in drivers:
        figures = report[name]
        assert figures["vmthunder_s"] > 0
        assert figures["faster_peer"] in figures["peers_s"]
        peer_s = figures["peers_s"][figures["faster_peer"]]
        assert peer_s == min(figures["peers_s"].values())
        assert report[f"{name}_ratio"] == pytest.approx(
            figures["vmthunder_s"] / peer_s, rel=0.02)
        assert any(line.startswith(name) for line in lines[:-1]), name
    assert report["size"] == 32 * 1024 * 1024
    assert report["worst_ratio"] == max(report[f"{n}_ratio"]
                                        for n in drivers)
    assert report["meets_target"] == (report["worst_ratio"] <= 1.1)
    # The work directory is left empty.
    assert os.listdir(tmp_path) == []
