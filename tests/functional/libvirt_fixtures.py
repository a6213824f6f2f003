"""A real libvirtd (QEMU/TCG) on ``qemu:///system`` for tests.

Use the session fixture ``libvirtd`` from a test module::

    from tests.functional.libvirt_fixtures import libvirtd  # noqa: F401

    def test_x(libvirtd):
        libvirtd.uri                        # "qemu:///system"
        libvirtd.track("my-domain")         # destroyed/undefined at the end
        libvirtd.virsh("define", xml_path)
        libvirtd.virsh("start", "my-domain")
        libvirtd.remove_domain("my-domain") # destroy + undefine, quietly

If a libvirtd of the host already answers on ``qemu:///system`` it is used
as it is and left running; only the domains the tests tracked are removed
at the end. Otherwise the fixture starts a private virtlogd and libvirtd
and stops them at the end, pass or fail, after destroying and undefining
every domain they hold (a QEMU left behind is killed by its pid file).
Concurrent pytest sessions (say this suite and the Nova tests in their own
venv) share that private daemon: each holds a shared lock on
/run/vmthunder-tests/libvirtd.users while it uses it, and the last one out
stops it (until then a session removes only the domains it tracked). A
private daemon left by a killed session is stopped and replaced.

The private daemons are the system ones (``qemu:///system``, the sockets
in /run/libvirt, as Nova connects), run with their own configuration and
state: each runs in a mount namespace of its own (``unshare --mount``)
where /etc/libvirt, /var/lib/libvirt and /var/log/libvirt are a private
directory (``Libvirtd.base``, removed at the end) and /var/cache/libvirt is
``<repo>/.cache/libvirt`` (QEMU's probed capabilities, kept: the first
probe takes ~8 s). Nothing on the host is configured. The qemu.conf is the
one that works here (see ../shared/NOTES.md): ``user = group = "root"``,
``dynamic_ownership = 0``, ``security_driver = "none"``,
``cgroup_controllers = [ ]``. libvirtd refuses to start without a
``libvirt-qemu`` user (its build-time default, looked up before qemu.conf
is read); when the host has none (Debian's libvirt-daemon-system creates
it; this fixture does not need that package), the namespace gets copies
of /etc/passwd and /etc/group that have one.

QEMU's own log of a domain: :meth:`Libvirtd.qemu_log`. libvirtd's log
(warnings and errors): ``Libvirtd.daemon_log()``.

For a session by hand (e.g. to try nova-compute against it)::

    .venv/bin/python -m tests.functional.libvirt_fixtures   # Ctrl-C stops

Needs root, ``unshare`` (util-linux) and the Debian packages
libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients and
qemu-system-x86 (scripts/install.sh installs them); skips otherwise, with
the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SYSTEM_URI = "qemu:///system"
RUN_DIR = "/run/libvirt"
LIBVIRTD_SOCKETS = ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock")
VIRTLOGD_SOCKETS = ("virtlogd-sock", "virtlogd-admin-sock")
TEST_DOMAIN_PREFIX = "vmthunder-test-"
CACHE_DIR = os.path.join(REPO, ".cache", "libvirt")
# Sessions sharing the tests' private daemon: where it is (pids, base),
# a mutex for starting/stopping it, and a lock each session holds shared
# while it uses it (the last one out stops it).
STATE_FILE = "/run/vmthunder-tests/libvirtd.json"
MUTEX_LOCK = "/run/vmthunder-tests/libvirtd.mutex"
USERS_LOCK = "/run/vmthunder-tests/libvirtd.users"

QEMU_CONF = """\
# Written by tests/functional/libvirt_fixtures.py (see ../shared/NOTES.md).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""

# Debugging: e.g. VMTHUNDER_TEST_LIBVIRTD_LOG_FILTERS="1:qemu 1:util.filecache"
# (libvirtd.conf log_filters) puts libvirtd's debug messages of those
# modules in its log (Libvirtd.daemon_log()).
LOG_FILTERS = os.environ.get("VMTHUNDER_TEST_LIBVIRTD_LOG_FILTERS", "")


def _log_level() -> int:
    return 1 if LOG_FILTERS else 3


# Mount points, in the daemons' namespace, of the private directories.
PRIVATE_MOUNTS = (("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"),
                  ("log", "/var/log/libvirt"))


class LibvirtdError(Exception):
    """libvirtd cannot run here (the reason is the message)."""


def _sock_state(path: str) -> str:
    """"alive", "stale" (nobody listens) or "absent"."""
    if not os.path.exists(path):
        return "absent"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return "stale"
            return "alive"      # e.g. busy: somebody is there
    return "alive"


def virsh(uri: str, *args: str, check: bool = True, timeout: float = 60
          ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["virsh", "-q", "-c", uri, *args],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)} failed "
                           f"({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _answers(uri: str, timeout: float = 15) -> bool:
    try:
        return virsh(uri, "uri", check=False, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Libvirtd:
    """A libvirtd on ``qemu:///system``: the tests' own or the host's.

    ``started`` says whether it is the tests' private daemon (started by
    this session or by a concurrent one it shares with); ``base`` is that
    daemon's private directory.
    """

    def __init__(self, uri: str = SYSTEM_URI):
        self.uri = uri
        self.started = False
        self.base: str | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._tracked: set[str] = set()
        self._users = None            # our shared lock on USERS_LOCK
        self._stopped = False

    # ---------------------------------------------------------------- use
    def virsh(self, *args: str, check: bool = True, timeout: float = 60
              ) -> subprocess.CompletedProcess:
        return virsh(self.uri, *args, check=check, timeout=timeout)

    def track(self, name: str) -> str:
        """Have domain ``name`` destroyed and undefined at the end of the
        session (Nova tests: track each instance's domain name)."""
        self._tracked.add(name)
        return name

    def domains(self) -> list[str]:
        out = self.virsh("list", "--all", "--name").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def state(self, name: str) -> str:
        return self.virsh("domstate", name).stdout.strip()

    def remove_domain(self, name: str) -> None:
        """Destroy (if running) and undefine (if persistent) ``name``;
        a domain that is not there is fine."""
        with contextlib.suppress(Exception):
            self.virsh("destroy", name, check=False, timeout=30)
        for flags in (("--managed-save", "--snapshots-metadata",
                       "--checkpoints-metadata", "--nvram"), ()):
            with contextlib.suppress(Exception):
                if self.virsh("undefine", name, *flags, check=False,
                              timeout=30).returncode == 0:
                    break

    def qemu_log(self, name: str) -> str:
        """QEMU's log of domain ``name`` (command line, errors)."""
        roots = [os.path.join(self.base, "log")] if self.base else []
        for root in roots + ["/var/log/libvirt"]:
            path = os.path.join(root, "qemu", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    return f.read()
        return f"(no QEMU log for {name})"

    def daemon_log(self) -> str:
        if not self.base:
            return "(libvirtd not started by the tests: see its own log)"
        parts = []
        for name in ("libvirtd.log", "libvirtd.out", "virtlogd.log",
                     "virtlogd.out"):
            path = os.path.join(self.base, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name}\n{f.read()[-5000:]}")
        return "\n".join(parts)

    # -------------------------------------------------------------- start
    def start(self, timeout: float = 90) -> "Libvirtd":
        """Use the running libvirtd (the host's, or the tests' own private
        one that a concurrent session started), or start a private one."""
        for tool in ("virsh", "libvirtd", "virtlogd", "unshare", "taskset",
                     "qemu-system-x86_64"):
            if shutil.which(tool) is None:
                raise LibvirtdError(
                    f"{tool} not found: install the Debian packages "
                    "libvirt-daemon libvirt-daemon-driver-qemu "
                    "libvirt-clients qemu-system-x86 (scripts/install.sh)")
        if os.geteuid() != 0:
            if _answers(self.uri):
                return self
            raise LibvirtdError("no libvirtd answers on qemu:///system and "
                                "starting one needs root")
        atexit.register(self.stop)
        with _mutex():
            state = _read_state()
            alive = os.path.exists(os.path.join(RUN_DIR, "libvirt-sock")) \
                and _answers(self.uri)
            ours = state is not None and _pid_is(state.get("libvirtd_pid"),
                                                 b"libvirtd")
            if alive and ours:
                self.started, self.base = True, state["base"]
                self._take_users_lock()
                return self
            if alive:
                return self                   # the host's: use as it is
            if state is not None:
                # A private daemon of a session that died: its domains,
                # QEMUs and daemons go; then start afresh.
                self._stop_private(state)
            try:
                self._start_private(timeout)
            except BaseException:
                self._stop_private(self._state())
                self.started, self.base = False, None
                raise
            self._take_users_lock()
            return self

    def _take_users_lock(self) -> None:
        self._users = open(USERS_LOCK, "a")
        fcntl.flock(self._users, fcntl.LOCK_SH)

    def _state(self) -> dict:
        return {"base": self.base,
                "libvirtd_pid": getattr(self._procs.get("libvirtd"),
                                        "pid", None),
                "virtlogd_pid": getattr(self._procs.get("virtlogd"),
                                        "pid", None)}

    def _start_private(self, timeout: float) -> None:
        self.base = tempfile.mkdtemp(prefix="vmthunder-libvirt-")
        self.started = True
        base = self.base
        for sub, _ in PRIVATE_MOUNTS:
            os.makedirs(os.path.join(base, sub))
        os.makedirs(CACHE_DIR, exist_ok=True)
        etc = os.path.join(base, "etc")
        with open(os.path.join(etc, "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        with open(os.path.join(etc, "libvirtd.conf"), "w") as f:
            f.write('# Written by tests/functional/libvirt_fixtures.py\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                    'unix_sock_rw_perms = "0700"\n'
                    f'log_outputs = "{_log_level()}:file:'
                    f'{base}/libvirtd.log"\n'
                    + (f'log_filters = "{LOG_FILTERS}"\n'
                       if LOG_FILTERS else ""))
        with open(os.path.join(etc, "virtlogd.conf"), "w") as f:
            f.write(f'log_outputs = "3:file:{base}/virtlogd.log"\n')
        for name in ("libvirt.conf", "libvirt-admin.conf"):
            with contextlib.suppress(OSError):
                shutil.copy(os.path.join("/etc/libvirt", name), etc)

        binds = [(os.path.join(base, sub), target)
                 for sub, target in PRIVATE_MOUNTS]
        binds.append((CACHE_DIR, "/var/cache/libvirt"))
        if not _has_user("libvirt-qemu"):
            binds += _passwd_overlay(base)
        for _, target in binds:
            if not os.path.exists(target):
                os.makedirs(target, exist_ok=True)   # an empty mount point
        os.makedirs(RUN_DIR, exist_ok=True)

        # Sockets nobody listens on (a daemon killed earlier) would make
        # the new daemons fail to bind.
        _unlink_stale_sockets()
        if _sock_state(os.path.join(RUN_DIR, "virtlogd-sock")) != "alive":
            self._spawn(binds, "virtlogd", [
                "virtlogd", "-f", os.path.join(etc, "virtlogd.conf"),
                "-p", os.path.join(base, "virtlogd.pid")])
            self._wait_socket("virtlogd", "virtlogd-sock", 20)
        self._spawn(binds, "libvirtd", [
            "libvirtd", "-f", os.path.join(etc, "libvirtd.conf"),
            "-p", os.path.join(base, "libvirtd.pid")])
        _write_state(self._state())
        self._wait_socket("libvirtd", "libvirt-sock", 30)
        # The QEMU driver answers once it has probed QEMU (cached after).
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc = virsh(self.uri, "capabilities", check=False,
                             timeout=max(5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc = None
            if proc is not None and proc.returncode == 0:
                if "<domain type='qemu'" in proc.stdout:
                    _unpin(self._procs["libvirtd"].pid)
                    return
                raise LibvirtdError("libvirtd runs but offers no QEMU "
                                    "domains (is qemu-system-x86 "
                                    f"installed?)\n{self.daemon_log()}")
            if self._procs["libvirtd"].poll() is not None or \
                    time.monotonic() > deadline:
                why = proc.stderr.strip() if proc is not None else "timeout"
                raise LibvirtdError(
                    f"libvirtd started but does not answer: {why}\n"
                    f"{self.daemon_log()}")
            time.sleep(0.5)

    def _spawn(self, binds, name: str, argv: list[str]) -> None:
        script = "set -e\n" + "".join(
            f"mount --bind '{src}' '{dst}'\n" for src, dst in binds) \
            + 'exec "$@"\n'
        with open(os.path.join(self.base, f"{name}.out"), "wb") as out:
            # A session of its own: Ctrl-C on pytest reaches the fixture's
            # teardown, which stops the daemons in order, not the daemons.
            # libvirtd starts on one CPU (unpinned once up): it checks
            # the host's CPUID against its QEMU capabilities cache, and
            # CPUID differs from core to core here (APIC ids), which made
            # every other start re-probe QEMU (~8 s).
            self._procs[name] = subprocess.Popen(
                ["taskset", "-c", str(min(os.sched_getaffinity(0))),
                 "unshare", "--mount", "--propagation", "private", "--",
                 "/bin/sh", "-c", script, name, *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)

    def _wait_socket(self, name: str, sock: str, timeout: float) -> None:
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while _sock_state(os.path.join(RUN_DIR, sock)) != "alive":
            if proc.poll() is not None:
                raise LibvirtdError(
                    f"{name} exited ({proc.returncode}) at start:\n"
                    f"{self.daemon_log()}")
            if time.monotonic() > deadline:
                raise LibvirtdError(f"{name} did not open its socket within "
                                    f"{timeout:.0f} s:\n{self.daemon_log()}")
            time.sleep(0.1)

    # --------------------------------------------------------------- stop
    def stop(self) -> None:
        """Remove the tracked domains; the last session using the tests'
        private daemon also removes every domain and stops the daemons.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for name in sorted(self._tracked):
            self.remove_domain(name)
        self._tracked = set()
        if not self.started:
            return
        with _mutex():
            if self._users is not None:
                fcntl.flock(self._users, fcntl.LOCK_UN)
                self._users.close()
                self._users = None
            with open(USERS_LOCK, "a") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return                # another session still uses it
                state = _read_state() or self._state()
                self._stop_private(state)
        self.started = False

    def _stop_private(self, state: dict) -> None:
        """Stop a private daemon (ours or a dead session's): all its
        domains, its QEMUs, libvirtd, virtlogd, its directory."""
        if _pid_is(state.get("libvirtd_pid"), b"libvirtd") and \
                _sock_state(os.path.join(RUN_DIR, "libvirt-sock")) == \
                "alive":
            try:
                present = self.domains()
            except Exception:                 # noqa: BLE001 - best effort
                present = []
            for name in present:
                self.remove_domain(name)
        # QEMUs still there (pid files in the shared /run/libvirt/qemu),
        # killed once libvirtd is gone.
        leftovers = _qemu_pids()
        for name in ("libvirtd", "virtlogd"):
            _terminate(state.get(f"{name}_pid"), name.encode(),
                       self._procs.get(name))
        for pid, pidfile in leftovers.items():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.unlink(pidfile)
        self._procs = {}
        _unlink_stale_sockets()
        with contextlib.suppress(OSError):
            os.unlink(STATE_FILE)
        base = state.get("base")
        if base and os.path.basename(base).startswith("vmthunder-libvirt-"):
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _mutex():
    os.makedirs(os.path.dirname(MUTEX_LOCK), exist_ok=True)
    with open(MUTEX_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state() -> dict | None:
    try:
        with open(STATE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_state(state: dict) -> None:
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, STATE_FILE)


def _pid_is(pid, name: bytes) -> bool:
    """Whether ``pid`` is a live (not zombie) process running ``name``."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return any(os.path.basename(a) == name for a in argv[:1])


def _terminate(pid, name: bytes, proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 20 s; our child is reaped."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    if not _pid_is(pid, name):
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _pid_is(pid, name):
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def _unpin(pid: int) -> None:
    """Let every thread of ``pid`` (and the QEMUs it starts) use all the
    CPUs this process may use."""
    cpus = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def _unlink_stale_sockets() -> None:
    for name in LIBVIRTD_SOCKETS + VIRTLOGD_SOCKETS:
        path = os.path.join(RUN_DIR, name)
        if _sock_state(path) == "stale":
            with contextlib.suppress(OSError):
                os.unlink(path)


def _has_user(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _passwd_overlay(base: str) -> list[tuple[str, str]]:
    """/etc/passwd and /etc/group copies with a libvirt-qemu user."""
    import grp
    gid = 64055
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            break
        gid += 1
    out = []
    for name, line in (("passwd", f"libvirt-qemu:x:{gid}:{gid}:Libvirt Qemu "
                        "(vmthunder tests):/var/lib/libvirt:"
                        "/usr/sbin/nologin\n"),
                       ("group", f"libvirt-qemu:x:{gid}:\n")):
        path = os.path.join(base, name)
        shutil.copy(f"/etc/{name}", path)
        with open(path, "a") as f:
            f.write(line)
        out.append((path, f"/etc/{name}"))
    return out


def _qemu_pids() -> dict[int, str]:
    found = {}
    for pidfile in glob.glob(os.path.join(RUN_DIR, "qemu", "*.pid")):
        with contextlib.suppress(OSError, ValueError):
            with open(pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu" in f.read():
                    found[pid] = pidfile
    return found


@pytest.fixture(scope="session")
def libvirtd():
    """A libvirtd on qemu:///system for the session (see the module doc).

    Yields a :class:`Libvirtd`: ``uri``, ``virsh(*args)``, ``track(name)``,
    ``remove_domain(name)``, ``state(name)``, ``domains()``,
    ``qemu_log(name)``, ``daemon_log()``, ``started`` (True for the tests'
    private daemon, False for the host's) and ``base`` (the private
    daemon's directory, or None).
    """
    daemon = Libvirtd()
    try:
        daemon.start()
    except LibvirtdError as exc:
        pytest.skip(f"libvirtd cannot start here: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


def main() -> int:
    daemon = Libvirtd()
    daemon.start()
    print(f"libvirtd on {daemon.uri} "
          f"({'private, in ' + daemon.base if daemon.started else 'host'}); "
          "Ctrl-C stops it", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
