"""The Nova driver's tests (tests/nova), run from the main suite.

They need nova, which lives in its own venv (.venv-nova, made by
scripts/install-nova.sh, which scripts/install.sh calls), and each runs in
a process of its own: importing nova.tests monkey-patches the whole
process with eventlet, and Nova's unit-test classes run under unittest,
not pytest.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.functional.conftest import REPO

NOVA_PYTHON = os.path.join(REPO, ".venv-nova", "bin", "python")


def _nova_python() -> str:
    if not os.access(NOVA_PYTHON, os.X_OK):
        pytest.skip(f"{NOVA_PYTHON} missing: the Nova venv is made by "
                    "scripts/install-nova.sh (scripts/install.sh runs it "
                    "unless VMTHUNDER_SKIP_NOVA=1)")
    return NOVA_PYTHON


def _run(argv, timeout) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - t0


@pytest.mark.timeout(600)
def test_nova_unit_tests_in_their_own_process():
    """tests/nova/test_nova_imagebackend.py under unittest, in .venv-nova:
    Nova's _ImageTestCase patterns on our Image, the domain XML with the
    NBD disk (unix and TCP), the driver's overrides."""
    proc, took = _run([_nova_python(), "-m", "unittest", "-v",
                       "tests.nova.test_nova_imagebackend"], timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    ran = re.search(r"^Ran (\d+) tests? in", out, re.M)
    assert ran and int(ran.group(1)) >= 50, out[-5000:]
    assert re.search(r"^OK\b", out, re.M), out[-5000:]
    print(f"{ran.group(0)} ... {took:.1f} s with the interpreter's start")


@pytest.mark.timeout(900)
def test_nova_end_to_end_in_their_own_process():
    """tests/nova/test_nova_e2e.py under pytest in .venv-nova: the driver
    against a real vmthunder-agent, libvirtd and QEMU."""
    python = _nova_python()
    proc, took = _run([python, "-m", "pytest", "-q", "-rs",
                       "-p", "no:cacheprovider", "tests/nova"],
                      timeout=840)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 0 and "passed" not in summary and \
            "skipped" in summary:
        # Skipped as a whole (no root, no libvirtd...): say why here too.
        reasons = re.findall(r"^SKIPPED \[\d+\] (.*)$", out, re.M)
        pytest.skip(f"tests/nova skipped: {'; '.join(reasons) or summary}")
    assert proc.returncode == 0, out[-30000:]
    assert re.search(r"\d+ passed", summary), out[-5000:]
    print(f"tests/nova: {summary} ({took:.0f} s)")
