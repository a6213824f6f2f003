"""A benchmark network on one machine: an origin and M compute hosts.

Every host is a Linux network namespace with one interface, ``eth0``,
whose other end (a veth pair) is plugged into a bridge ``br0`` living in
a dedicated "switch" namespace. Nothing at all is added to, or changed
in, the root namespace: no link, no route, no firewall rule. Programs run
inside a host with ``host.popen(argv)`` / ``host.run(argv)`` (``ip netns
exec NS argv``) and reach the others at their ``address``.

    origin (10.201.0.1) eth0 ==tbf== p-origin ┐
    host0  (10.201.0.2) eth0 ==tbf== p-host0  ├─ br0   [switch namespace]
    host1  (10.201.0.3) eth0 ==tbf== p-host1  ┘

Each uplink is shaped in both directions with a tbf qdisc: on ``eth0``
(what the host sends) and on its switch port (what is sent to it), at
``origin_rate`` for the origin and ``host_rate`` for compute hosts (None:
unshaped; a veth then carries ~15-20 Gbit/s of TCP here). The kernel here
has no netem, so there is no added delay or loss.

Namespace names are ``PREFIX-PID-TAG-ROLE`` (e.g. ``vmt-4242-9f3a-host0``,
``vmt-4242-9f3a-sw``): PID is the creating process and TAG random, so
parallel runs never clash, and cleanup_stale() removes only runs whose
creator is dead (a crashed or SIGKILLed run).

Root-only work (namespaces, links, addresses and tbf qdiscs, through
netlink with pyroute2) goes through vmthunder.privileged; only running a
program inside a host is `ip netns exec`.

    python -m vmthunder.bench.topology --hosts 3 --hold   # build, wait, remove
    python -m vmthunder.bench.topology --cleanup          # remove leftovers
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from typing import ClassVar

import psutil

from vmthunder import privileged

SWITCH_ROLE = "sw"
BRIDGE = "br0"
UPLINK = "eth0"

# PREFIX-PID-TAG-ROLE; the prefix itself may not contain "-".
_NS_RE = re.compile(r"^(?P<run>(?P<prefix>[A-Za-z0-9_]+)-(?P<pid>\d+)-"
                    r"(?P<tag>[0-9a-f]{4}))-(?P<role>[A-Za-z0-9_]+)$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]{1,16}$")

# tc(8) rate units, in bits per second ("bps" is bytes per second).
_RATE_UNITS = {
    "": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
    "tbit": 10**12, "kibit": 2**10, "mibit": 2**20, "gibit": 2**30,
    "tibit": 2**40, "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6,
    "gbps": 8 * 10**9, "tbps": 8 * 10**12, "kibps": 8 * 2**10,
    "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}

# tbf parameters. Measured here with one TCP stream (python sendall of
# 4-125 MB) through a veth shaped this way in both directions:
#   40mbit -> 38.1 Mbit/s, 200mbit -> 191 Mbit/s, 1gbit -> 952 Mbit/s
# of payload, i.e. 95-96 % of the rate: tbf counts whole frames, and a
# 1500-byte frame carries 1448 bytes of TCP payload (1448/1514 = 95.6 %).
# - burst: veth does GSO, so up to 64 KiB skbs reach the qdisc; a bucket
#   smaller than that makes tbf segment every skb (1gbit with the common
#   "burst 32kbit" = 4 KB gave only 744 Mbit/s). So the bucket holds at
#   least 128 KiB, and at least 2 ms of traffic so that a late qdisc timer
#   on a busy 2-core machine does not lose throughput at high rates. The
#   cost is one initial line-rate burst of that size (128 KiB is 26 ms of
#   a 40mbit link: noise for transfers of megabytes).
# - latency (queue length): 50 ms of traffic. TCP over veth has a
#   microsecond RTT, so a short queue already keeps the link busy (10 ms
#   and 400 ms measured the same), while a long one would add up to
#   `latency` of queueing delay to small requests (an NBD/iSCSI read
#   behind a bulk transfer). Beyond it tbf drops, and TCP backs off.
TBF_MIN_BURST = 128 * 1024
TBF_BURST_SECONDS = 0.002
TBF_LATENCY_S = 0.050


def parse_rate(rate: str) -> int:
    """A tc rate ("200mbit", "1gbit", "10mbps"...) in bits per second."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", rate)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _RATE_UNITS:
        raise ValueError(f"bad rate {rate!r}: use a tc rate such as "
                         "'40mbit', '1gbit' or '10mbps' (bytes/s), or None "
                         "for no shaping")
    bits = int(float(m.group(1)) * _RATE_UNITS[unit])
    if bits < 8000:
        raise ValueError(f"rate {rate!r} is below 8kbit: too slow to "
                         "shape with tbf")
    return bits


def tbf_params(rate_bits: int) -> tuple[int, int, float]:
    """(rate in bit/s, burst in bytes, latency in s) of the tbf of a link
    of rate_bits/s (privileged.tc_tbf's arguments)."""
    burst = max(TBF_MIN_BURST, int(rate_bits / 8 * TBF_BURST_SECONDS))
    return rate_bits, burst, TBF_LATENCY_S


@dataclasses.dataclass
class Host:
    """One machine of the topology: a namespace with one uplink, eth0."""

    name: str          # "origin", "host0", "host1", ...
    netns: str         # its network namespace
    address: str       # its IPv4 address ("10.201.0.2")
    # What popen started here: destroy stops these too (one just started
    # may not have entered the namespace yet, where netns_kill looks).
    started: list = dataclasses.field(default_factory=list, repr=False,
                                      compare=False)

    interface: ClassVar[str] = UPLINK

    def argv(self, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` in this host's namespace."""
        return privileged.netns_exec_argv(self.netns, list(argv))

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in this host (subprocess.Popen keywords)."""
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.started = [p for p in self.started if p.poll() is None]
        self.started.append(proc)
        return proc

    def stop_started(self, timeout: float = 2.0) -> None:
        """SIGTERM what popen started and still runs, SIGKILL after
        ``timeout`` seconds."""
        running = [p for p in self.started if p.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started = []

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host (subprocess.run keywords)."""
        return subprocess.run(self.argv(argv), **kw)


class TopologyError(privileged.PrivilegedError):
    pass


class Topology:
    """An origin and ``hosts`` compute hosts on one bridge; see module doc.

    ``with Topology(3) as topo:`` creates it and always destroys it.
    """

    def __init__(self, hosts: int, *, origin_rate: str | None = "200mbit",
                 host_rate: str | None = "1gbit", prefix: str = "vmt",
                 subnet: str = "10.201.0.0/16"):
        if not isinstance(hosts, int) or hosts < 0:
            raise ValueError(f"hosts must be an integer >= 0, not {hosts!r}")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: 1-16 letters, digits "
                             "or '_' (no '-')")
        network = ipaddress.IPv4Network(subnet)
        if network.num_addresses - 2 < hosts + 1:
            raise ValueError(f"subnet {subnet} is too small for "
                             f"{hosts + 1} hosts")
        self.origin_rate = origin_rate
        self.host_rate = host_rate
        # Parse now: a bad rate should fail before anything is built.
        self._origin_bits = None if origin_rate is None else \
            parse_rate(origin_rate)
        self._host_bits = None if host_rate is None else parse_rate(host_rate)
        self.prefix = prefix
        self.subnet = str(network)
        self.run_id = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch_netns = f"{self.run_id}-{SWITCH_ROLE}"
        addresses = iter(network.hosts())

        def make(name):
            return Host(name=name, netns=f"{self.run_id}-{name}",
                        address=str(next(addresses)))

        self.origin = make("origin")
        self.hosts = [make(f"host{i}") for i in range(hosts)]
        self._prefixlen = network.prefixlen
        self._lock = threading.RLock()
        self._created = False
        self._destroyed = False
        # Namespaces with our names that create() found already there (a
        # PID and tag reused after a crash): never ours to delete.
        self._foreign: set[str] = set()

    @property
    def all_hosts(self) -> list[Host]:
        """The origin first, then the compute hosts."""
        return [self.origin, *self.hosts]

    def rate_of(self, host: Host) -> str | None:
        """The configured rate of ``host``'s uplink (None: unshaped)."""
        return self.origin_rate if host is self.origin else self.host_rate

    @staticmethod
    def port_of(host: Host) -> str:
        """The name of ``host``'s port on the switch (in switch_netns)."""
        return f"p-{host.name}"

    # --- life cycle ------------------------------------------------------

    def create(self) -> None:
        """Build the namespaces, links and qdiscs.

        On any failure (or an interruption), removes whatever it had built
        and raises. A Topology is created at most once.
        """
        with self._lock:
            if self._created or self._destroyed:
                raise TopologyError(f"topology {self.run_id} was already "
                                    "created or destroyed: make a new "
                                    "Topology")
            self._created = True
        try:
            self._build()
        except BaseException as e:
            # Destroyed under our feet (by a signal handler): say so rather
            # than report whichever step then failed.
            interrupted = self._destroyed and isinstance(e, Exception) \
                and not isinstance(e, TopologyError)
            try:
                self.destroy()
            except Exception as cleanup_error:  # keep the first error
                print(f"vmthunder.bench.topology: cleanup after a failed "
                      f"create also failed: {cleanup_error}",
                      file=sys.stderr)
            if interrupted:
                raise TopologyError(f"topology {self.run_id} was destroyed "
                                    "while being created") from e
            raise

    def _check(self) -> None:
        # A signal handler may destroy() while create() runs: stop building.
        if self._destroyed:
            raise TopologyError(f"topology {self.run_id} was destroyed while "
                                "being created")

    def _build(self) -> None:
        sw = self.switch_netns
        self._check()
        self._netns_add(sw)
        privileged.link_add_bridge(sw, BRIDGE)
        privileged.link_set(sw, BRIDGE, no_ipv6_ll=True, up=True)
        for host in self.all_hosts:
            self._check()
            port = self.port_of(host)
            self._netns_add(host.netns)
            privileged.link_add_veth(sw, port, host.netns, UPLINK)
            privileged.link_set(sw, port, master=BRIDGE, no_ipv6_ll=True,
                                up=True)
            privileged.link_set(host.netns, UPLINK, no_ipv6_ll=True)
            privileged.addr_add(host.netns, UPLINK,
                                f"{host.address}/{self._prefixlen}")
            privileged.link_set(host.netns, UPLINK, up=True)
            bits = self._origin_bits if host is self.origin \
                else self._host_bits
            if bits is not None:
                rate, burst, latency = tbf_params(bits)
                # What the host sends...
                privileged.tc_tbf(host.netns, UPLINK, rate, burst, latency)
                # ...and what the switch sends to it.
                privileged.tc_tbf(sw, port, rate, burst, latency)
        self._check()

    def _netns_add(self, name: str) -> None:
        try:
            privileged.netns_add(name)
        except privileged.NetnsExists:
            self._foreign.add(name)
            raise

    def namespaces(self) -> list[str]:
        """The namespaces of this run that exist now (switch last).

        Found by name (so a namespace whose creation was interrupted
        counts too), less any that create() found already there.
        """
        mine = [ns for ns in privileged.netns_list()
                if ns.startswith(self.run_id + "-")
                and ns not in self._foreign]
        return sorted(mine, key=lambda ns: ns == self.switch_netns)

    def destroy(self) -> None:
        """Remove everything this topology created; safe to call again.

        Stops the processes still running in its namespaces (SIGTERM,
        then SIGKILL), then deletes the host namespaces and the switch
        namespace; their veths, bridge and qdiscs go with them. Works
        after a partial create and from a signal handler (even one that
        interrupts another destroy: each call removes what is left).
        Raises only if something could not be removed, after trying all.
        """
        self._destroyed = True
        for host in [self.origin, *self.hosts]:
            if host is not None:
                host.stop_started()
        _remove_namespaces(self.namespaces())

    def __enter__(self) -> Topology:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # --- measurements ----------------------------------------------------

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Traffic on each host's uplink since it was created.

        {host name: {"tx_bytes", "tx_packets", "rx_bytes", "rx_packets"}},
        from the host's point of view (tx: sent by the host). Read in one
        go from the switch ports (a port receives exactly what its host's
        eth0 sends, and vice versa). Bytes are the kernel's link counters:
        they include the Ethernet/IP/TCP headers of each skb, and veth
        passes GSO skbs of up to 64 KiB, so a bulk TCP transfer of N bytes
        counts about N plus 0.1-5 % (not the per-frame wire overhead).
        Subtract two readings to measure one phase of a run.
        """
        stats = privileged.link_stats(self.switch_netns)
        result = {}
        for host in self.all_hosts:
            port = stats.get(self.port_of(host))
            if port is None:
                raise TopologyError(f"port {self.port_of(host)} of "
                                    f"{host.name} is missing in "
                                    f"{self.switch_netns}: was the topology "
                                    "created (and not destroyed)?")
            result[host.name] = {
                "tx_bytes": port["rx_bytes"], "tx_packets": port["rx_packets"],
                "rx_bytes": port["tx_bytes"], "rx_packets": port["tx_packets"],
            }
        return result

    def describe(self) -> list[dict]:
        """One dict per host: name, address, netns, rate (for reports)."""
        return [{"name": h.name, "address": h.address, "netns": h.netns,
                 "rate": self.rate_of(h)} for h in self.all_hosts]


def _remove_namespaces(names: list[str]) -> list[str]:
    """Stop processes in, then delete, ``names`` (in that order).

    Tries every namespace; raises one TopologyError listing what failed.
    Returns the namespaces deleted by this call.
    """
    errors = []
    for ns in names:
        try:
            privileged.netns_kill(ns)
        except privileged.PrivilegedError as e:
            errors.append(str(e))
    removed = []
    for ns in names:
        try:
            if privileged.netns_delete(ns):
                removed.append(ns)
        except privileged.PrivilegedError as e:
            errors.append(str(e))
    if errors:
        raise TopologyError("could not remove every namespace: "
                            + "; ".join(errors))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        state = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    # A zombie's run is over.
    return state not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def cleanup_stale(prefix: str = "vmt", *,
                  include_live: bool = False) -> list[str]:
    """Remove the namespaces of crashed runs with this prefix.

    A run is stale when the process that created it (the PID in its
    namespace names) is gone; runs of live processes, including this
    one, are kept unless ``include_live``. Processes still running in a
    stale namespace are stopped first. The topology puts nothing in the
    root namespace, so deleting its namespaces removes all its links,
    bridge and qdiscs. Returns the namespaces removed.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    stale = []
    for ns in privileged.netns_list():
        m = _NS_RE.match(ns)
        if m is None or m["prefix"] != prefix:
            continue
        if include_live or not _pid_alive(int(m["pid"])):
            stale.append(ns)
    # Hosts before their switch (either order works; this one is tidier).
    stale.sort(key=lambda ns: (ns.endswith("-" + SWITCH_ROLE), ns))
    return _remove_namespaces(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.topology",
        description="Build the benchmark network on this machine: an origin "
                    "and N compute hosts, each a network namespace with one "
                    "shaped uplink (tbf, both directions) to a bridge in a "
                    "switch namespace. Nothing is added to the root "
                    "namespace. Needs root.",
        epilog="Examples: --hosts 3 --hold (then e.g. `ip netns exec "
               "NETNS bash` in another terminal; Ctrl-C removes it all); "
               "--cleanup (after a crash).")
    parser.add_argument("--hosts", type=int, default=3,
                        help="number of compute hosts (default 3)")
    parser.add_argument("--origin-rate", default="200mbit",
                        help="origin uplink rate, a tc rate or 'none' "
                             "(default 200mbit)")
    parser.add_argument("--host-rate", default="1gbit",
                        help="compute host uplink rate, a tc rate or "
                             "'none' (default 1gbit)")
    parser.add_argument("--prefix", default="vmt",
                        help="namespace name prefix (default vmt)")
    parser.add_argument("--subnet", default="10.201.0.0/16",
                        help="IPv4 subnet of the hosts (default "
                             "10.201.0.0/16)")
    parser.add_argument("--hold", action="store_true",
                        help="keep the topology until Ctrl-C or SIGTERM "
                             "(without it: build, print, remove)")
    parser.add_argument("--cleanup", action="store_true",
                        help="only remove namespaces left by crashed runs "
                             "with --prefix")
    parser.add_argument("--all", action="store_true",
                        help="with --cleanup: also remove runs whose "
                             "creating process is still alive")
    args = parser.parse_args(argv)

    def rate(value):
        return None if value.lower() in ("none", "") else value

    try:
        if args.cleanup:
            removed = cleanup_stale(args.prefix, include_live=args.all)
            for ns in removed:
                print(f"removed {ns}")
            print(f"{len(removed)} namespace(s) removed")
            return 0
        topo = Topology(args.hosts, origin_rate=rate(args.origin_rate),
                        host_rate=rate(args.host_rate), prefix=args.prefix,
                        subnet=args.subnet)
        # SIGTERM unwinds like Ctrl-C, so the `with` removes everything
        # (SIGINT too when started with it ignored, e.g. by `cmd &`).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with topo:
            print(f"topology {topo.run_id}: switch namespace "
                  f"{topo.switch_netns}")
            for row in topo.describe():
                print(f"  {row['name']:<8} {row['address']:<15} "
                      f"{row['netns']:<28} {row['rate'] or 'unshaped'}")
            if args.hold:
                print(f"run e.g.: ip netns exec {topo.origin.netns} bash; "
                      "Ctrl-C removes the topology", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        signal.pause()
        print("removed")
        return 0
    except (privileged.PrivilegedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while building: already removed
        print("interrupted; removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
