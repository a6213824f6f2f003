"""The root-only work of vmthunder, in one narrow place.

Only this module runs programs that need root: ``tgtadm`` (tgtd's control
socket, /var/run/tgtd/socket.N, is root's) and ``tgtd`` itself. Each
function takes explicit arguments, builds an argv list (never a shell
line) and fails with a clear message when this is not root or the
program is missing. Everything else (what to create, parsing tgtd's
answers) lives in vmthunder.volume.tgt, which calls only these functions;
so the day this runs under oslo.privsep, as os-brick does, the
entrypoints are already here and already small.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# Debian puts tgtd/tgtadm in /usr/sbin, which a non-root PATH may lack.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# tgtadm's exit code when it cannot reach a tgtd on the control port (its
# socket is missing, or nothing listens on it): ENOTCONN.
TGTADM_NOT_CONNECTED = 107


class PrivilegedError(RuntimeError):
    """Root-only work could not be done; the message says what to do."""


class NotRoot(PrivilegedError):
    pass


class MissingBinary(PrivilegedError):
    pass


class CommandFailed(PrivilegedError):
    """A privileged program ran and failed."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        # tgtadm prefixes its messages with "tgtadm: ".
        detail = self.stderr.removeprefix(f"{os.path.basename(argv[0])}: ")
        self.detail = detail
        super().__init__(f"{' '.join(argv)} failed (exit {returncode}): "
                         f"{detail or 'no message'}")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(f"{what} needs root (tgtd's control socket under "
                      "/var/run/tgtd is root's): run vmthunder as root or "
                      "with sudo")


def find_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        for directory in _SBIN:
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                return candidate
        raise MissingBinary(f"{name} not found: install the Debian package "
                            f"{package!r} (scripts/install.sh does)")
    return path


def tgtadm(control_port: int, args: list[str], *,
           timeout: float = 30) -> str:
    """Run ``tgtadm -C control_port ARGS...``; return its stdout.

    Raises CommandFailed (with tgtadm's exit code and message) on failure;
    exit code TGTADM_NOT_CONNECTED means no tgtd answers on that port.
    """
    require_root("tgtadm")
    argv = [find_binary("tgtadm", "tgt"), "-C", str(int(control_port)),
            *[str(a) for a in args]]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CommandFailed(argv, -1, f"no answer from tgtd within "
                                      f"{timeout:g} s") from None
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode,
                            proc.stderr or proc.stdout)
    return proc.stdout


def start_tgtd(portal: str, control_port: int,
               log_path: str) -> subprocess.Popen:
    """Start ``tgtd -f --iscsi portal=PORTAL -C N`` as a detached daemon.

    It runs in its own session (a Ctrl-C of the caller does not reach it)
    with its output appended to ``log_path``. Returns at once: the caller
    waits until tgtadm answers (and watches the process for an early
    exit). tgtd ignores SIGTERM; stop it with tgtadm (see
    vmthunder.volume.tgt.Tgt.stop).
    """
    require_root("starting tgtd")
    argv = [find_binary("tgtd", "tgt"), "-f", "--iscsi",
            f"portal={portal}", "-C", str(int(control_port))]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True,
                                close_fds=True)
