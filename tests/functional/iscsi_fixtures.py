"""A real tgtd (userspace iSCSI target) for tests.

Use the ``tgtd`` fixture (a factory) from a test module::

    from tests.functional.iscsi_fixtures import tgtd  # noqa: F401

    def test_x(tgtd):
        daemon = tgtd()                      # started, no targets yet
        t = daemon.add_target("iqn.2024-01.org.vmthunder.test:x")
        daemon.add_lun(t, 1, "/path/image.raw")          # read-only LUN
        daemon.add_chap(t, "user", "secret")            # optional
        url = daemon.url(t, 1)          # iscsi://127.0.0.1:PORT/IQN/1
        daemon.kill(); daemon.start()   # same portal, same targets

Each daemon listens on its own free loopback port and its own control
port (``tgtd -C N``, a unix socket named by N), so tests and a system
tgtd never meet. Every daemon the factory started is stopped at teardown,
pass or fail (killed if it will not stop). Needs root (tgtadm talks to
tgtd only as root) and the ``tgt`` package; tests skip otherwise.

tgtd quirks handled here: SIGTERM does not stop it (``tgtadm --mode
system --op delete`` does, and only once no target is left; a target
whose LUN has commands in flight cannot be deleted even with --force,
so :meth:`Tgtd.stop` sets it offline first, which drops its sessions,
and retries the delete); a portal it cannot bind is not
fatal (it falls back to listening on 0.0.0.0:3260), so the portal is
checked after every start; ``readonly=1`` is refused on ``--op new`` and
set with ``--op update``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

HOST = "127.0.0.1"


def need_tgtd() -> None:
    """Skip unless tgtd can run here."""
    missing = [b for b in ("tgtd", "tgtadm") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package "
                    "tgt; scripts/install.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("tgtd and tgtadm need root")


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_control_port() -> int:
    """A tgtd control port (``-C N``, below 2**15) whose unix socket does
    not exist: no tgtd of this machine uses it now."""
    while True:
        port = random.randrange(20000, 32768)
        if not os.path.exists(f"/var/run/tgtd/socket.{port}"):
            return port


class TgtdError(RuntimeError):
    pass


@dataclasses.dataclass
class Lun:
    lun: int
    path: str
    readonly: bool = True


@dataclasses.dataclass
class Target:
    tid: int
    iqn: str
    luns: dict[int, Lun] = dataclasses.field(default_factory=dict)
    chap: tuple[str, str] | None = None


class Tgtd:
    """One tgtd process and the configuration it should have.

    The configuration (targets, LUNs, CHAP accounts) is remembered, so
    :meth:`start` after :meth:`stop` or :meth:`kill` brings the same
    targets back on the same portal, like a restarted storage server.
    """

    def __init__(self, workdir: str, *, host: str = HOST,
                 port: int | None = None, control_port: int | None = None):
        self.workdir = str(workdir)
        self.host = host
        self.port = port
        self.control_port = control_port
        self.targets: dict[int, Target] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(
            self.workdir, f"tgtd-{time.monotonic_ns()}.log")
        self.starts = 0
        # Exit status of every run that ended: 0 after a clean stop(),
        # -9 after kill().
        self.exits: list[int] = []
        # start() and close() exclude each other: a test thread that
        # restarts the daemon must not revive it after teardown.
        self._lock = threading.RLock()
        self.closed = False

    # -- addresses -------------------------------------------------------

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, target: Target | str, lun: int, *,
            user: str | None = None, password: str | None = None) -> str:
        iqn = target.iqn if isinstance(target, Target) else target
        auth = ""
        if user:
            auth = f"{user}%{password}@" if password is not None \
                else f"{user}@"
        return f"iscsi://{auth}{self.portal}/{iqn}/{lun}"

    # -- process ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tgtadm(self, *args: str, check: bool = True,
               timeout: float = 10) -> subprocess.CompletedProcess:
        argv = ["tgtadm", "-C", str(self.control_port), *args]
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise TgtdError(f"{' '.join(argv)} failed ({proc.returncode}): "
                            f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def start(self, timeout: float = 15) -> Tgtd:
        """Start tgtd (same portal as before, if it ran before) and apply
        the configuration."""
        with self._lock:
            if self.closed:
                raise TgtdError("this tgtd was closed (test teardown)")
            if self.running:
                raise TgtdError("tgtd is already running")
            return self._start(timeout)

    def _start(self, timeout: float) -> Tgtd:
        fixed_port = self.port is not None
        fixed_ctl = self.control_port is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not fixed_port:
                self.port = free_port(self.host)
            if not fixed_ctl:
                self.control_port = free_control_port()
            ok, last = self._try_start(deadline)
            if ok:
                break
            self._kill_proc()
            if fixed_port and fixed_ctl:
                time.sleep(0.2)         # port or lock still held: wait
        else:
            raise TgtdError(f"tgtd did not start on {self.portal} "
                            f"(control port {self.control_port}): {last}")
        self.starts += 1
        for target in self.targets.values():
            self._apply(target)
        return self

    def _try_start(self, deadline: float) -> tuple[bool, str]:
        with open(self.log_path, "a") as log:
            log.write(f"--- tgtd start on {self.portal} -C "
                      f"{self.control_port}\n")
            log.flush()
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "--iscsi", f"portal={self.portal}",
                 "-C", str(self.control_port)],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"tgtd exited ({self.proc.returncode}): " \
                    f"{self.log()[-600:]}"
            r = self.tgtadm("--lld", "iscsi", "--mode", "system", "--op",
                            "show", check=False)
            if r.returncode == 0:
                portals = self.tgtadm("--lld", "iscsi", "--mode", "portal",
                                      "--op", "show", check=False).stdout
                if f"Portal: {self.portal}," in portals:
                    return True, ""
                # tgtd could not bind the portal and fell back to
                # 0.0.0.0:3260 (not fatal for it, fatal for us).
                return False, f"portal {self.portal} not bound " \
                    f"(tgtd has {portals.strip()!r})"
            time.sleep(0.05)
        return False, "no answer on the control port"

    def _kill_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, timeout: float = 10) -> None:
        """Stop as an administrator would: drop every target (closing
        the sessions), then shut the daemon down."""
        if not self.running:
            return
        deadline = time.monotonic() + timeout
        try:
            for tid in list(self.targets):
                # Offline first: tgtd drops the sessions; a target whose
                # LU still has commands is "still active" even with
                # --force, so the delete is retried until it goes.
                self.tgtadm("--lld", "iscsi", "--mode", "target", "--op",
                            "update", "--tid", str(tid), "--name", "state",
                            "--value", "offline", check=False)
                while self.tgtadm(
                        "--lld", "iscsi", "--mode", "target", "--op",
                        "delete", "--force", "--tid", str(tid),
                        check=False).returncode != 0 \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.tgtadm("--mode", "system", "--op", "delete", "--force",
                        check=False)
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            self._kill_proc()
            self.exits.append(self.proc.returncode)

    def kill(self) -> None:
        """Crash it (SIGKILL): sessions die without a logout."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.exits.append(self.proc.returncode)

    def restart(self, down_for: float = 0.0, *, crash: bool = True) -> None:
        """Kill (or stop) and start again on the same portal."""
        self.kill() if crash else self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop for good (teardown); start() is refused afterwards."""
        with self._lock:
            self.closed = True
            self.stop()
            self._kill_proc()

    # -- configuration ---------------------------------------------------

    def add_target(self, iqn: str, tid: int | None = None) -> Target:
        tid = tid or max(self.targets, default=0) + 1
        if tid in self.targets:
            raise TgtdError(f"target id {tid} is already used")
        target = Target(tid, iqn)
        self.targets[tid] = target
        if self.running:
            self._new_target(target)
        return target

    def add_lun(self, target: Target, lun: int, path: str, *,
                readonly: bool = True) -> Lun:
        if lun < 1 or lun in target.luns:
            raise TgtdError(f"LUN {lun} is reserved or taken (LUN 0 is "
                            "tgtd's controller)")
        entry = Lun(lun, os.path.abspath(path), readonly)
        target.luns[lun] = entry
        if self.running:
            self._new_lun(target, entry)
        return entry

    def remove_lun(self, target: Target, lun: int) -> None:
        target.luns.pop(lun)
        if self.running:
            self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op",
                        "delete", "--tid", str(target.tid), "--lun",
                        str(lun))

    def add_chap(self, target: Target, user: str, password: str) -> None:
        """Require CHAP (initiator authenticates) for ``target``."""
        target.chap = (user, password)
        if self.running:
            self._new_chap(target)

    def _apply(self, target: Target) -> None:
        self._new_target(target)
        for lun in target.luns.values():
            self._new_lun(target, lun)
        if target.chap:
            self._new_chap(target)

    def _new_target(self, target: Target) -> None:
        tid = str(target.tid)
        self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "new",
                    "--tid", tid, "--targetname", target.iqn)
        self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "bind",
                    "--tid", tid, "--initiator-address", "ALL")

    def _new_lun(self, target: Target, lun: Lun) -> None:
        tid = str(target.tid)
        self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op",
                    "new", "--tid", tid, "--lun", str(lun.lun),
                    "--backing-store", lun.path)
        if lun.readonly:
            self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op",
                        "update", "--tid", tid, "--lun", str(lun.lun),
                        "--params", "readonly=1")

    def _new_chap(self, target: Target) -> None:
        user, password = target.chap
        accounts = self.tgtadm("--lld", "iscsi", "--mode", "account",
                               "--op", "show").stdout.split()
        if user not in accounts:
            self.tgtadm("--lld", "iscsi", "--mode", "account", "--op",
                        "new", "--user", user, "--password", password)
        self.tgtadm("--lld", "iscsi", "--mode", "account", "--op", "bind",
                    "--tid", str(target.tid), "--user", user)


def quote_iqn(iqn: str) -> str:
    """An IQN as it may appear in an iscsi:// URL."""
    return urllib.parse.quote(iqn, safe=".-_:")


@pytest.fixture
def tgtd(tmp_path):
    """Factory: ``tgtd(**Tgtd kwargs) -> Tgtd`` (started).

    Skips the test when tgtd is not installed or not running as root.
    """
    need_tgtd()
    daemons: list[Tgtd] = []

    def factory(**kwargs) -> Tgtd:
        daemon = Tgtd(str(tmp_path), **kwargs)
        daemons.append(daemon)
        return daemon.start()

    try:
        yield factory
    finally:
        for daemon in daemons:
            with contextlib.suppress(Exception):
                daemon.close()
            daemon._kill_proc()
