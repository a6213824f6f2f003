"""tgtd, the userspace iSCSI target (Debian ``tgt``), driven with tgtadm.

``Tgt`` starts tgtd when none answers on the configured control port,
creates and deletes targets, read-only LUNs and CHAP accounts, and reads
back what tgtd has (``parse_targets`` parses ``tgtadm --op show``). All
commands go through vmthunder.privileged.

tgtd quirks met here (tgt 1.0.85):
- ``--params readonly=1`` is refused by ``logicalunit --op new``; it is
  set with ``--op update`` afterwards.
- A backing file whose size is not a multiple of 512 loses its tail: the
  LUN is the size rounded down (the export pads its volume instead).
- tgtd ignores SIGTERM. ``--mode system --op delete --force`` stops it,
  but only once it has no targets ("invalid request" otherwise), so
  ``stop`` deletes the targets first.
- When tgtd cannot bind the ``--iscsi portal=`` it was given, it logs it
  and listens on its default portals, 0.0.0.0:3260 and [::]:3260, instead
  of exiting; ``ensure_running`` checks the portal list and stops such a
  tgtd rather than leave it listening on every interface.
- ``tgtd -p PIDFILE`` writes nothing in foreground mode; the pid of the
  tgtd started here is written to ``tgtd-N.pid`` beside its log.
- ``-C N`` takes 0 to 32767 only ("-C argument value out of range").
- A stopped tgtd leaves /var/run/tgtd/socket.N and socket.N.lock behind
  (harmless: the next tgtd on N takes them over).
- As non-root, tgtadm cannot tell "no tgtd" from "not allowed" (exit 107
  either way); privileged.require_root checks first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time

from vmthunder import privileged

LOG = logging.getLogger(__name__)


class TgtError(RuntimeError):
    pass


# --- parsing `tgtadm --lld iscsi --mode target --op show` -----------------


@dataclasses.dataclass(frozen=True)
class Lun:
    lun: int
    type: str = ""
    size_mb: int | None = None
    block_size: int | None = None
    readonly: bool = False
    online: bool = True
    backing_type: str = ""
    backing_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Nexus:
    """One initiator logged in (an I_T nexus) and its connections."""
    nexus: int
    initiator: str
    alias: str | None = None
    addresses: tuple[str, ...] = ()

    def describe(self) -> str:
        where = ",".join(self.addresses)
        return f"{self.initiator} ({where})" if where else self.initiator


@dataclasses.dataclass(frozen=True)
class Target:
    tid: int
    name: str
    driver: str = ""
    state: str = ""
    nexuses: tuple[Nexus, ...] = ()
    luns: tuple[Lun, ...] = ()
    accounts: tuple[str, ...] = ()           # incoming CHAP users
    outgoing_accounts: tuple[str, ...] = ()  # the target's own (mutual)
    acl: tuple[str, ...] = ()                # initiator addresses/names

    def lun(self, number: int) -> Lun | None:
        for lun in self.luns:
            if lun.lun == number:
                return lun
        return None

    @property
    def initiators(self) -> list[str]:
        return [n.describe() for n in self.nexuses]


_TARGET_RE = re.compile(r"^Target (\d+): (\S+)\s*$")
_SIZE_RE = re.compile(r"^(\d+) MB, Block size: (\d+)$")
_INITIATOR_RE = re.compile(r"^(\S+)(?: alias: (.*))?$")
_SECTIONS = {"System information:": "system",
             "I_T nexus information:": "nexus",
             "LUN information:": "lun",
             "Account information:": "account",
             "ACL information:": "acl"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse_targets(text: str) -> list[Target]:
    """Parse ``tgtadm --lld iscsi --mode target --op show`` output.

    Lines this parser does not know are skipped, so a newer tgt that adds
    fields still parses; a line outside any target that is not a target
    header is an error (not the output this expects).
    """
    targets: list[dict] = []
    cur: dict | None = None
    section = None
    item: dict | None = None        # the current LUN or nexus
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = raw.rstrip()
        depth = _indent(line)
        body = line.strip()
        if depth == 0:
            m = _TARGET_RE.match(line)
            if not m:
                raise TgtError(f"unexpected tgtadm output line {number}: "
                               f"{line!r}")
            cur = {"tid": int(m.group(1)), "name": m.group(2),
                   "driver": "", "state": "", "nexuses": [], "luns": [],
                   "accounts": [], "outgoing": [], "acl": []}
            targets.append(cur)
            section, item = None, None
            continue
        if cur is None:
            raise TgtError(f"unexpected tgtadm output line {number}: "
                           f"{line!r}")
        if depth == 4:
            section, item = _SECTIONS.get(body), None
            continue
        key, _, value = body.partition(":")
        value = value.strip()
        if section == "system":
            if key == "Driver":
                cur["driver"] = value
            elif key == "State":
                cur["state"] = value
        elif section == "nexus":
            if key == "I_T nexus" and depth == 8:
                item = {"nexus": int(value), "initiator": "",
                        "alias": None, "addresses": []}
                cur["nexuses"].append(item)
            elif item is not None and key == "Initiator":
                m = _INITIATOR_RE.match(value)
                item["initiator"] = m.group(1) if m else value
                alias = m.group(2) if m else None
                item["alias"] = None if alias in (None, "none") else alias
            elif item is not None and key == "IP Address":
                item["addresses"].append(value)
        elif section == "lun":
            if key == "LUN" and depth == 8:
                item = {"lun": int(value)}
                cur["luns"].append(item)
            elif item is not None:
                _lun_field(item, key, value)
        elif section == "account" and depth == 8:
            user, outgoing = body.removesuffix(" (outgoing)"), \
                body.endswith(" (outgoing)")
            cur["outgoing" if outgoing else "accounts"].append(user)
        elif section == "acl" and depth == 8:
            cur["acl"].append(body)
    return [_target(t) for t in targets]


def _lun_field(item: dict, key: str, value: str) -> None:
    if key == "Type":
        item["type"] = value
    elif key == "Size":
        m = _SIZE_RE.match(value)
        if m:
            item["size_mb"] = int(m.group(1))
            item["block_size"] = int(m.group(2))
    elif key == "Readonly":
        item["readonly"] = value == "Yes"
    elif key == "Online":
        item["online"] = value == "Yes"
    elif key == "Backing store type":
        item["backing_type"] = value
    elif key == "Backing store path":
        item["backing_path"] = None if value in ("", "None") else value


def _target(t: dict) -> Target:
    return Target(
        tid=t["tid"], name=t["name"], driver=t["driver"], state=t["state"],
        nexuses=tuple(Nexus(n["nexus"], n["initiator"], n["alias"],
                            tuple(n["addresses"])) for n in t["nexuses"]),
        luns=tuple(Lun(**lun) for lun in t["luns"]),
        accounts=tuple(t["accounts"]),
        outgoing_accounts=tuple(t["outgoing"]), acl=tuple(t["acl"]))


def parse_portals(text: str) -> list[str]:
    """``tgtadm --mode portal --op show``: 'Portal: H:P,TPGT' lines."""
    portals = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Portal" and value.strip():
            portals.append(value.strip().rsplit(",", 1)[0])
    return portals


def parse_accounts(text: str) -> list[str]:
    """``tgtadm --mode account --op show``: names under 'Account list:'."""
    return [line.strip().split()[0] for line in text.splitlines()
            if line.startswith(" ") and line.strip()]


def split_portal(portal: str) -> tuple[str, int]:
    """'127.0.0.1:3260' or '[::1]:3260' -> (host, port); ValueError."""
    host, sep, port = portal.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"portal {portal!r} is not HOST:PORT (example: "
                         "127.0.0.1:3260)")
    return host, int(port)


def portal_covers(listening: str, wanted: str) -> bool:
    """Does tgtd listening on ``listening`` serve ``wanted``?"""
    lhost, lport = split_portal(listening)
    whost, wport = split_portal(wanted)
    return lport == wport and (lhost == whost or lhost in ("0.0.0.0", "::"))


# --- driving tgtd ---------------------------------------------------------


class Tgt:
    """One tgtd, addressed by its control port (``tgtd -C N``)."""

    def __init__(self, control_port: int, portal: str, log_dir: str,
                 start_timeout: float = 10.0, netns: str | None = None):
        self.control_port = int(control_port)
        # tgtd runs in this network namespace (the benchmark's origin
        # host); tgtadm reaches it through its unix socket from anywhere.
        self.netns = netns
        self.portal = portal
        self.log_dir = log_dir
        self.start_timeout = start_timeout

    @property
    def log_path(self) -> str:
        return os.path.join(self.log_dir, f"tgtd-{self.control_port}.log")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.log_dir, f"tgtd-{self.control_port}.pid")

    def _adm(self, *args) -> str:
        return privileged.tgtadm(self.control_port, list(args))

    def _iscsi(self, *args) -> str:
        return self._adm("--lld", "iscsi", *args)

    # -- daemon --

    def running(self) -> bool:
        try:
            self._adm("--mode", "system", "--op", "show")
        except privileged.CommandFailed as exc:
            if exc.returncode == privileged.TGTADM_NOT_CONNECTED:
                return False
            raise
        return True

    def ensure_running(self) -> bool:
        """Start tgtd unless one answers; make it serve our portal.

        Returns True if this call started tgtd.
        """
        split_portal(self.portal)
        started = False
        if not self.running():
            self._start()
            started = True
        self.ensure_portal(self.portal, started_here=started)
        return started

    def _start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        LOG.info("starting tgtd on portal %s, control port %d (log %s)",
                 self.portal, self.control_port, self.log_path)
        proc = privileged.start_tgtd(self.portal, self.control_port,
                                     self.log_path, netns=self.netns)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.running():
                break
            code = proc.poll()
            if code is not None:
                # Lost a race with another start: that tgtd is ours too.
                if self.running():
                    return
                raise TgtError(
                    f"tgtd (portal {self.portal}, control port "
                    f"{self.control_port}) exited with code {code} at "
                    f"start; its log {self.log_path} ends with:\n"
                    f"{self._log_tail()}")
            if time.monotonic() > deadline:
                raise TgtError(
                    f"tgtd (pid {proc.pid}) did not answer tgtadm on "
                    f"control port {self.control_port} within "
                    f"{self.start_timeout:g} s; see {self.log_path}")
            time.sleep(0.05)
        with open(self.pid_path, "w") as f:
            f.write(f"{proc.pid}\n")

    def _log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return "(no log)"

    def portals(self) -> list[str]:
        return parse_portals(self._iscsi("--mode", "portal", "--op",
                                         "show"))

    def ensure_portal(self, portal: str, started_here: bool = False) -> None:
        have = self.portals()
        if any(portal_covers(p, portal) for p in have):
            return
        if started_here:
            # tgtd could not bind it and fell back to 0.0.0.0:3260 and
            # [::]:3260: do not leave that running.
            tail = self._log_tail()
            self.stop()
            raise TgtError(
                f"tgtd could not listen on portal {portal} (in use by "
                f"another program?); it listened on {', '.join(have)} "
                f"instead and was stopped. Its log {self.log_path} ends "
                f"with:\n{tail}")
        try:
            self._iscsi("--mode", "portal", "--op", "new", "--param",
                        f"portal={portal}")
        except privileged.CommandFailed as exc:
            raise TgtError(
                f"tgtd on control port {self.control_port} listens on "
                f"{', '.join(have) or 'no portal'} and could not add "
                f"portal {portal}: {exc.detail}") from None

    def stop(self) -> None:
        """Stop this tgtd (targets first: tgtd refuses otherwise)."""
        if not self.running():
            return
        for target in self.targets():
            self.delete_target(target.tid)
        self._adm("--mode", "system", "--op", "delete", "--force")
        deadline = time.monotonic() + 5
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- targets --

    def targets(self) -> list[Target]:
        return parse_targets(self._iscsi("--mode", "target", "--op",
                                         "show"))

    def target_named(self, iqn: str) -> Target | None:
        for target in self.targets():
            if target.name == iqn:
                return target
        return None

    def create_target(self, tid: int, iqn: str) -> None:
        self._iscsi("--mode", "target", "--op", "new", "--tid", tid,
                    "--targetname", iqn)

    def delete_target(self, tid: int) -> None:
        """Delete a target, logging out any initiator still attached."""
        self._iscsi("--mode", "target", "--op", "delete", "--force",
                    "--tid", tid)

    def add_lun(self, tid: int, lun: int, path: str,
                readonly: bool = True) -> None:
        self._iscsi("--mode", "logicalunit", "--op", "new", "--tid", tid,
                    "--lun", lun, "--backing-store", path)
        if readonly:
            # Refused on --op new; only --op update takes it.
            self._iscsi("--mode", "logicalunit", "--op", "update", "--tid",
                        tid, "--lun", lun, "--params", "readonly=1")

    def delete_lun(self, tid: int, lun: int) -> None:
        self._iscsi("--mode", "logicalunit", "--op", "delete", "--tid", tid,
                    "--lun", lun)

    def bind_initiators(self, tid: int, address: str = "ALL") -> None:
        self._iscsi("--mode", "target", "--op", "bind", "--tid", tid,
                    "--initiator-address", address)

    # -- CHAP accounts (incoming: the initiator proves who it is) --

    def accounts(self) -> list[str]:
        return parse_accounts(self._iscsi("--mode", "account", "--op",
                                          "show"))

    def create_account(self, user: str, secret: str) -> None:
        self._iscsi("--mode", "account", "--op", "new", "--user", user,
                    "--password", secret)

    def delete_account(self, user: str) -> None:
        self._iscsi("--mode", "account", "--op", "delete", "--user", user)

    def bind_account(self, tid: int, user: str) -> None:
        self._iscsi("--mode", "account", "--op", "bind", "--tid", tid,
                    "--user", user)
