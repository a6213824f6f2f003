"""The tgtd that vmthunder starts (vmthunder.privileged.start_tgtd) is a
proper daemon: reaped when it exits while its starter lives (no zombie
child), and alive after its starter exits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from tests.functional.conftest import REPO
from tests.functional.iscsi_fixtures import free_control_port, free_port
from tests.waiting import wait_until
from vmthunder.volume import tgt as tgt_mod

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd and tgtadm need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None
                       and not os.path.exists("/usr/sbin/tgtd"),
                       reason="tgtd not installed (Debian package tgt)"),
]


def _tgt(tmp_path) -> tgt_mod.Tgt:
    return tgt_mod.Tgt(free_control_port(), f"127.0.0.1:{free_port()}",
                       str(tmp_path))


def _pid(tgt) -> int:
    with open(tgt.pid_path) as f:
        return int(f.read())


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _zombie_children() -> list[int]:
    zombies = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


@pytest.mark.parametrize("how", ["tgtadm", "crash"])
def test_tgtd_that_exits_leaves_no_zombie_child(tmp_path, how):
    """Stopped through tgtadm, or killed: either way its starter reaps it
    at once. (Nothing here starts a process after tgtd exits: Python's
    subprocess would reap a forgotten child when the next one starts.)"""
    tgt = _tgt(tmp_path)
    try:
        assert tgt.ensure_running()
        pid = _pid(tgt)
        me = psutil.Process()
        assert pid in [c.pid for c in me.children()]
        assert os.getsid(pid) == pid                        # own session
        if how == "tgtadm":
            tgt._adm("--mode", "system", "--op", "delete", "--force")
        else:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _exited(pid), "tgtd to exit", timeout=10)
        # Reaped at once by its starter (this process), not left behind.
        wait_until(lambda: pid not in _zombie_children(),
                   f"tgtd (pid {pid}) to be reaped", timeout=2)
        assert pid not in [c.pid for c in me.children()]
    finally:
        tgt.stop()


STARTER = r"""
import sys
from vmthunder.volume import tgt as tgt_mod
tgt = tgt_mod.Tgt(int(sys.argv[1]), sys.argv[2], sys.argv[3])
assert tgt.ensure_running()
print(open(tgt.pid_path).read().strip(), flush=True)
"""


def test_tgtd_outlives_the_process_that_started_it(tmp_path):
    tgt = _tgt(tmp_path)
    try:
        starter = subprocess.run(
            [sys.executable, "-c", STARTER, str(tgt.control_port),
             tgt.portal, str(tmp_path)], capture_output=True, text=True,
            timeout=30, cwd=REPO)
        assert starter.returncode == 0, starter.stderr[-2000:]
        pid = int(starter.stdout.split()[0])
        # The starter is gone (its reaper thread did not hold it); tgtd
        # runs on, answers, and is no child of ours.
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert tgt.running()
        assert pid not in [c.pid for c in psutil.Process().children()]
    finally:
        tgt.stop()
