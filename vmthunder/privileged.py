"""The root-only work of vmthunder, in one narrow place.

Only this module runs programs that need root: ``tgtadm`` (tgtd's control
socket, /var/run/tgtd/socket.N, is root's) and ``tgtd`` itself. Each
function takes explicit arguments, builds an argv list (never a shell
line) and fails with a clear message when this is not root or the
program is missing. Everything else (what to create, parsing tgtd's
answers) lives in vmthunder.volume.tgt, which calls only these functions;
so the day this runs under oslo.privsep, as os-brick does, the
entrypoints are already here and already small. The benchmark network's
root-only work (namespaces, links, qdiscs) is here too, done over netlink
with pyroute2 rather than by running ``ip``/``tc``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import threading

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

    It runs in its own session (a Ctrl-C of the caller does not reach it,
    and it outlives the caller, which is what a daemon does: then init
    adopts it) with its output appended to ``log_path``. While the caller
    lives, a daemon thread waits for it, so a tgtd that exits (stopped
    through tgtadm, or failing at start) is reaped at once instead of
    staying a zombie child of a long-lived caller (vmthunder boot, the
    benchmarks, the agent). Returns at once: the caller waits until
    tgtadm answers (and watches the process for an early exit: its
    returncode is set when it is reaped). tgtd ignores SIGTERM; stop it
    with tgtadm (see vmthunder.volume.tgt.Tgt.stop).
    """
    require_root("starting tgtd")
    argv = [find_binary("tgtd", "tgt"), "-f", "--iscsi",
            f"portal={portal}", "-C", str(int(control_port))]
    if netns is not None:
        argv = [find_binary("ip", "iproute2"), "netns", "exec", netns,
                *argv]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True,
                                close_fds=True)
    threading.Thread(target=proc.wait, name=f"reaper of tgtd {proc.pid}",
                     daemon=True).start()
    return proc


# --- Network namespaces, veth links, bridges and tc qdiscs ---------------
# Used by vmthunder.bench.topology to build a benchmark network on one
# machine, through netlink with pyroute2 (no `ip`/`tc` program is run).
# Every call names the namespace it works in, so nothing is ever created
# in, or changed about, the root namespace. The one exception is running
# a program inside a namespace (netns_exec_argv): that stays `ip netns
# exec`, since pyroute2 can only switch the namespace of the calling
# process (or of a child through preexec_fn, which is unsafe in a program
# with threads, as the benchmark harness is).

STALE_HINT = ("a crashed run may have left it behind: run "
              "`python -m vmthunder.bench.topology --cleanup`")

# IN6_ADDR_GEN_MODE_NONE: no IPv6 link-local address on the link.
_ADDR_GEN_MODE_NONE = 1


class NetError(PrivilegedError):
    """A netlink request failed; the message says what and why.

    ``errno`` is the kernel's error number (None when it did not come from
    the kernel), ``detail`` its text.
    """

    def __init__(self, what: str, errno_: int | None, detail: str,
                 hint: str = ""):
        self.what = what
        self.errno = errno_
        self.detail = detail
        self.hint = hint
        message = f"{what} failed: {detail or 'no message'}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class NetnsExists(NetError):
    """A network namespace of that name exists already."""


def _require_root_net(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(f"{what} needs root (network namespaces, veth links "
                      "and tc qdiscs are root's): run as root or with sudo")


def _pyroute2():
    try:
        import pyroute2
        from pyroute2 import netns
    except ImportError:
        raise MissingBinary("pyroute2 is not installed: pip install -r "
                            "requirements.txt (scripts/install.sh does)"
                            ) from None
    return pyroute2, netns


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held (for the calling thread) while pyroute2
    forks its helper: the helper, a copy of this process, must never run
    this program's handlers (the benchmark harness turns SIGTERM into
    KeyboardInterrupt, which would send the copy off into the caller's
    clean-up; and pyroute2 stops the helper with SIGTERM). The copy dies
    by os._exit() or SIGKILL; here they are delivered on leaving."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _net_error(what: str, exc: BaseException, hints: dict) -> NetError:
    """``exc`` (a NetlinkError or an OSError) as a NetError; ``hints``
    maps an errno to advice added to the message."""
    code = getattr(exc, "code", None)
    if code is None:
        code = getattr(exc, "errno", None)
    detail = os.strerror(code) if code else str(exc)
    return NetError(what, code, detail, hints.get(code, ""))


class _Netlink:
    """``with _Netlink(what, netns) as ipr:`` an IPRoute in ``netns``
    (which must exist); a failure inside becomes a NetError."""

    def __init__(self, what: str, netns: str, hints: dict | None = None):
        self.what = what
        self.netns = netns
        self.hints = hints or {}
        self.ipr = None

    def __enter__(self):
        _require_root_net(self.what)
        pyroute2, _ = _pyroute2()
        try:
            # flags=0: never create the namespace if it is missing.
            with _signals_held():
                self.ipr = pyroute2.IPRoute(netns=self.netns, flags=0)
        except OSError as exc:
            raise _net_error(self.what, exc, {
                errno.ENOENT: f"no network namespace {self.netns}"}) \
                from None
        return self.ipr

    def __exit__(self, exc_type, exc, tb) -> None:
        self.ipr.close()
        if exc is not None and not isinstance(exc, PrivilegedError) \
                and _is_net_failure(exc):
            raise _net_error(self.what, exc, self.hints) from None


def _is_net_failure(exc: BaseException) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError
    return isinstance(exc, (NetlinkError, OSError))


def _index(ipr, netns: str, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise NetError(f"finding {dev} in namespace {netns}", errno.ENODEV,
                       os.strerror(errno.ENODEV))
    return found[0]


def netns_list() -> list[str]:
    """Names of the named network namespaces (as ``ip netns list``)."""
    _, netns = _pyroute2()
    return sorted(netns.listnetns())


def netns_add(name: str) -> None:
    """Create network namespace ``name`` and bring its loopback ``lo`` up.

    Raises NetnsExists, with a hint to run the cleanup, when the name is
    taken.
    """
    what = f"creating network namespace {name}"
    _require_root_net(what)
    _, netns = _pyroute2()
    try:
        with _signals_held():
            netns.create(name)
    except FileExistsError:
        raise NetnsExists(what, errno.EEXIST, os.strerror(errno.EEXIST),
                          f"namespace {name} exists already; "
                          + STALE_HINT) from None
    except OSError as exc:
        raise _net_error(what, exc, {}) from None
    with _Netlink(f"bringing up lo in namespace {name}", name) as ipr:
        ipr.link("set", index=_index(ipr, name, "lo"), state="up")


def netns_delete(name: str) -> bool:
    """Delete network namespace ``name``; False if it did not exist.

    Links inside it go with it (a veth goes as soon as either end's
    namespace does) once no process runs in it any more: call
    netns_kill first.
    """
    what = f"deleting network namespace {name}"
    _require_root_net(what)
    _, netns = _pyroute2()
    try:
        netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _net_error(what, exc, {}) from None
    return True


def netns_pids(name: str) -> list[int]:
    """Pids of the processes running in namespace ``name`` ([] if none)."""
    _require_root_net(f"listing processes in namespace {name}")
    _, netns = _pyroute2()
    return sorted(netns.ns_pids().get(name, []))


def netns_kill(name: str, timeout: float = 2.0) -> list[int]:
    """Stop every process in namespace ``name``: SIGTERM, then SIGKILL.

    Waits up to ``timeout`` seconds for them to go after SIGTERM, then
    kills what is left and waits until the namespace holds no process
    (a process that exited but was not reaped yet no longer counts).
    Returns the pids signalled. Never signals the caller itself.
    """
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
    The one iproute2 program still used: see the comment above.
    """
    return [find_binary("ip", "iproute2"), "netns", "exec", name,
            *[str(a) for a in argv]]


def link_add_bridge(netns: str, name: str) -> None:
    """Create bridge ``name`` in ``netns`` (left down: see link_set)."""
    with _Netlink(f"creating bridge {name} in namespace {netns}", netns, {
            errno.EOPNOTSUPP: "this kernel has no bridge support (module "
                              "'bridge')",
            errno.EEXIST: f"{name} exists in {netns}; " + STALE_HINT}) as ipr:
        ipr.link("add", ifname=name, kind="bridge")


def link_add_veth(netns: str, name: str, peer_netns: str,
                  peer_name: str) -> None:
    """Create a veth pair: ``name`` in ``netns``, its peer in another.

    The peer is ``peer_name`` in ``peer_netns``. Both ends are created
    directly in their namespaces, never in the root namespace.
    """
    with _Netlink(f"creating veth {netns}/{name} <-> "
                  f"{peer_netns}/{peer_name}", netns, {
                      errno.EOPNOTSUPP: "this kernel has no veth support",
                      errno.EEXIST: "that interface name is in use; "
                                    + STALE_HINT}) as ipr:
        ipr.link("add", ifname=name, kind="veth",
                 peer={"ifname": peer_name, "net_ns_fd": peer_netns})


def link_set(netns: str, dev: str, *, up: bool | None = None,
             master: str | None = None, no_ipv6_ll: bool = False) -> None:
    """Set ``dev`` in ``netns``: its bridge (``master``), no IPv6
    link-local address (``no_ipv6_ll``), then up or down (``up``).

    ``no_ipv6_ll`` (addrgenmode none) stops the kernel giving the link an
    IPv6 link-local address, so it sends no IPv6 chatter (router/neighbour
    solicitations, MLD) that would show in byte counts.
    """
    with _Netlink(f"configuring {dev} in namespace {netns}", netns) as ipr:
        index = _index(ipr, netns, dev)
        if master is not None:
            ipr.link("set", index=index,
                     master=_index(ipr, netns, master))
        if no_ipv6_ll:
            ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [
                ["AF_INET6", {"attrs": [
                    ["IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE]]}]]})
        if up is not None:
            ipr.link("set", index=index, state="up" if up else "down")


def addr_add(netns: str, dev: str, cidr: str) -> None:
    """Add address ``cidr`` (e.g. "10.201.0.2/16") to ``dev`` in ``netns``."""
    import ipaddress
    iface = ipaddress.ip_interface(cidr)
    with _Netlink(f"adding address {cidr} to {dev} in namespace {netns}",
                  netns) as ipr:
        ipr.addr("add", index=_index(ipr, netns, dev),
                 address=str(iface.ip), prefixlen=iface.network.prefixlen)


def tc_tbf(netns: str, dev: str, rate_bits: int, burst_bytes: int,
           latency_s: float) -> None:
    """Shape egress of ``dev`` in ``netns`` with a root tbf qdisc.

    ``rate_bits`` in bits per second, ``burst_bytes`` the bucket size,
    ``latency_s`` the longest a packet may wait in the queue (which sets
    the queue's length). Replaces any root qdisc already there.
    """
    if rate_bits // 8 >= 1 << 32:
        raise ValueError(f"rate {rate_bits} bit/s is above what tbf's "
                         "32-bit byte rate holds (34 Gbit/s)")
    with _Netlink(f"shaping {dev} in namespace {netns} to {rate_bits} "
                  "bit/s", netns, {
                      errno.ENOENT: "this kernel has no tbf qdisc (module "
                                    "sch_tbf): run unshaped (rate None)"}
                  ) as ipr:
        # pyroute2 takes a bare number as bytes per second and as
        # microseconds, like tc's "Bps" and "us".
        ipr.tc("replace", "tbf", index=_index(ipr, netns, dev),
               rate=rate_bits // 8, burst=int(burst_bytes),
               latency=int(round(latency_s * 1e6)))


def link_stats(netns: str) -> dict[str, dict[str, int]]:
    """Counters of every link in ``netns``: {ifname: {rx_bytes, ...}}.

    Keys: rx_bytes, rx_packets, rx_dropped, tx_bytes, tx_packets,
    tx_dropped, as the kernel counts them (IFLA_STATS64).
    """
    stats = {}
    with _Netlink(f"reading link counters in namespace {netns}",
                  netns) as ipr:
        for link in ipr.get_links():
            counters = link.get_attr("IFLA_STATS64") \
                or link.get_attr("IFLA_STATS") or {}
            stats[link.get_attr("IFLA_IFNAME")] = {
                f"{direction}_{key}": int(counters.get(
                    f"{direction}_{key}", 0))
                for direction in ("rx", "tx")
                for key in ("bytes", "packets", "dropped")}
    return stats
