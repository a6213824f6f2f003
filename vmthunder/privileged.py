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


def start_tgtd(portal: str, control_port: int, log_path: str, *,
               netns: str | None = None) -> subprocess.Popen:
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
    if netns is not None:
        argv = [find_binary("ip", "iproute2"), "netns", "exec", netns,
                *argv]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True,
                                close_fds=True)


# --- Network namespaces, veth links, bridges and tc qdiscs ---------------
# Used by vmthunder.bench.topology to build a benchmark network on one
# machine. Every call names the namespace it works in (``ip -n NS``), so
# nothing is ever created in, or changed about, the root namespace.

STALE_HINT = ("a crashed run may have left it behind: run "
              "`python -m vmthunder.bench.topology --cleanup`")


class NetCommandFailed(CommandFailed):
    """An ``ip``/``tc`` command failed; the message says what and why."""

    def __init__(self, what: str, argv: list[str], returncode: int,
                 stderr: str, hint: str = ""):
        super().__init__(argv, returncode, stderr)
        self.what = what
        self.hint = hint
        message = (f"{what} failed: `{' '.join(argv)}` exited {returncode}: "
                   f"{self.detail or 'no message'}")
        if hint:
            message += f" ({hint})"
        self.args = (message,)


class NetnsExists(NetCommandFailed):
    """A network namespace of that name exists already."""


def _require_root_net(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(f"{what} needs root (network namespaces, veth links "
                      "and tc qdiscs are root's): run as root or with sudo")


def _net(what: str, argv: list[str], *, hints=(), root: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run an iproute2 command ``argv`` (argv[0] is "ip" or "tc").

    ``hints`` is a sequence of (substring of the error, advice) pairs: the
    first that matches is added to the error message.
    """
    if root:
        _require_root_net(what)
    argv = [find_binary(argv[0], "iproute2"), *[str(a) for a in argv[1:]]]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetCommandFailed(what, argv, -1,
                               f"no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        hint = next((advice for pattern, advice in hints if pattern in err),
                    "")
        raise NetCommandFailed(what, argv, proc.returncode, err, hint)
    return proc


def netns_list() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    proc = _net("listing network namespaces", ["ip", "netns", "list"],
                root=False)
    # Lines look like "NAME" or "NAME (id: 3)".
    return [line.split()[0] for line in proc.stdout.splitlines()
            if line.strip()]


def netns_add(name: str) -> None:
    """Create network namespace ``name`` and bring its loopback ``lo`` up.

    Raises NetnsExists, with a hint to run the cleanup, when the name is
    taken.
    """
    try:
        _net(f"creating network namespace {name}",
             ["ip", "netns", "add", name])
    except NetCommandFailed as e:
        if "File exists" in e.detail:
            raise NetnsExists(e.what, e.argv, e.returncode, e.stderr,
                              f"namespace {name} exists already; "
                              + STALE_HINT) from None
        raise
    _net(f"bringing up lo in namespace {name}",
         ["ip", "-n", name, "link", "set", "dev", "lo", "up"])


def netns_delete(name: str) -> bool:
    """Delete network namespace ``name``; False if it did not exist.

    Links inside it go with it (a veth goes as soon as either end's
    namespace does) once no process runs in it any more: call
    netns_kill first.
    """
    try:
        _net(f"deleting network namespace {name}",
             ["ip", "netns", "delete", name])
    except NetCommandFailed as e:
        if "No such file" in e.detail:
            return False
        raise
    return True


def netns_pids(name: str) -> list[int]:
    """Pids of the processes running in namespace ``name`` ([] if none)."""
    try:
        proc = _net(f"listing processes in namespace {name}",
                    ["ip", "netns", "pids", name])
    except NetCommandFailed as e:
        if "No such file" in e.detail:
            return []
        raise
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def netns_kill(name: str, timeout: float = 2.0) -> list[int]:
    """Stop every process in namespace ``name``: SIGTERM, then SIGKILL.

    Waits up to ``timeout`` seconds for them to go after SIGTERM, then
    kills what is left and waits until the namespace holds no process
    (a process that exited but was not reaped yet no longer counts).
    Returns the pids signalled. Never signals the caller itself.
    """
    import signal
    import time
    me = os.getpid()
    signalled: list[int] = []
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        pids = [p for p in netns_pids(name) if p != me]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            if pid not in signalled:
                signalled.append(pid)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not [p for p in netns_pids(name) if p != me]:
                return signalled
            time.sleep(0.02)
    return signalled


def netns_exec_argv(name: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``name``.

    ``ip netns exec`` joins the namespace and execs ``argv`` in the same
    process (so a Popen's pid is the program's). Running it needs root.
    """
    return [find_binary("ip", "iproute2"), "netns", "exec", name,
            *[str(a) for a in argv]]


def link_add_bridge(netns: str, name: str) -> None:
    """Create bridge ``name`` in ``netns`` (left down: see link_set)."""
    _net(f"creating bridge {name} in namespace {netns}",
         ["ip", "-n", netns, "link", "add", name, "type", "bridge"],
         hints=[("Unknown device type", "this kernel has no bridge "
                 "support (module 'bridge')"),
                ("File exists", f"{name} exists in {netns}; " + STALE_HINT)])


def link_add_veth(netns: str, name: str, peer_netns: str,
                  peer_name: str) -> None:
    """Create a veth pair: ``name`` in ``netns``, its peer in another.

    The peer is ``peer_name`` in ``peer_netns``. Both ends are created
    directly in their namespaces, never in the root namespace.
    """
    _net(f"creating veth {netns}/{name} <-> {peer_netns}/{peer_name}",
         ["ip", "-n", netns, "link", "add", name, "type", "veth",
          "peer", "name", peer_name, "netns", peer_netns],
         hints=[("Unknown device type", "this kernel has no veth support"),
                ("File exists", "that interface name is in use; "
                 + STALE_HINT)])


def link_set(netns: str, dev: str, *, up: bool | None = None,
             master: str | None = None, no_ipv6_ll: bool = False) -> None:
    """``ip -n NETNS link set dev DEV [master M] [addrgenmode none] [up]``.

    ``no_ipv6_ll`` stops the kernel giving the link an IPv6 link-local
    address, so it sends no IPv6 chatter (router/neighbour solicitations,
    MLD) that would show in byte counts.
    """
    argv = ["ip", "-n", netns, "link", "set", "dev", dev]
    if master is not None:
        argv += ["master", master]
    if no_ipv6_ll:
        argv += ["addrgenmode", "none"]
    if up is not None:
        argv.append("up" if up else "down")
    _net(f"configuring {dev} in namespace {netns}", argv)


def addr_add(netns: str, dev: str, cidr: str) -> None:
    """Add address ``cidr`` (e.g. "10.201.0.2/16") to ``dev`` in ``netns``."""
    _net(f"adding address {cidr} to {dev} in namespace {netns}",
         ["ip", "-n", netns, "addr", "add", cidr, "dev", dev])


def tc_tbf(netns: str, dev: str, rate: str, burst: str,
           latency: str) -> None:
    """Shape egress of ``dev`` in ``netns`` with a root tbf qdisc.

    ``rate``, ``burst`` and ``latency`` are tc(8) values ("40mbit",
    "128kb", "50ms"). Replaces any root qdisc already there.
    """
    _net(f"shaping {dev} in namespace {netns} to {rate}",
         ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf",
          "rate", rate, "burst", burst, "latency", latency],
         hints=[("qdisc kind is unknown", "this kernel has no tbf qdisc "
                 "(module sch_tbf): run unshaped (rate None)")])


def link_stats(netns: str) -> dict[str, dict[str, int]]:
    """Counters of every link in ``netns``: {ifname: {rx_bytes, ...}}.

    Keys: rx_bytes, rx_packets, rx_dropped, tx_bytes, tx_packets,
    tx_dropped, as the kernel counts them (``ip -s -j link show``).
    """
    import json
    proc = _net(f"reading link counters in namespace {netns}",
                ["ip", "-n", netns, "-s", "-j", "link", "show"])
    stats = {}
    for link in json.loads(proc.stdout or "[]"):
        counters = link.get("stats64") or link.get("stats") or {}
        entry = {}
        for direction in ("rx", "tx"):
            values = counters.get(direction, {})
            for key in ("bytes", "packets", "dropped"):
                entry[f"{direction}_{key}"] = int(values.get(key, 0))
        stats[link["ifname"]] = entry
    return stats
