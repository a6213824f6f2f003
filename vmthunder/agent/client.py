"""Client of the agent's local API, and the `vmthunder image|vm|status|
precache` commands built on it.

Plain http.client over an AF_UNIX socket: synchronous, no event loop, so
the Nova driver and the CLI can call it from anywhere.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.parse

from vmthunder.sizes import parse_size

DEFAULT_TIMEOUT = 120.0     # an iSCSI attach may wait for a login


class AgentError(Exception):
    """The agent refused a request; the message says why (``reply``: the
    body it answered, when it did)."""

    def __init__(self, status: int, message: str, reply=None):
        super().__init__(message)
        self.status = status
        self.reply = reply


class AgentUnavailable(AgentError):
    """Nothing answers on the API socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body=None) -> dict:
        """One API call; the decoded JSON reply, or AgentError."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        payload = None
        headers = {}
        if body is not None:
            payload = (body if isinstance(body, (bytes, str))
                       else json.dumps(body))
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                why = ("no such socket" if isinstance(exc, FileNotFoundError)
                       else "connection refused")
                raise AgentUnavailable(
                    0, f"cannot reach the vmthunder agent at "
                    f"{self.socket_path} ({why}); is vmthunder-agent "
                    "running? Start it, or give the socket it uses with "
                    "--api-socket") from None
            except PermissionError:
                raise AgentUnavailable(
                    0, f"no permission to use the agent socket "
                    f"{self.socket_path}; run as root or as a member of "
                    "its group") from None
            except TimeoutError:
                raise AgentError(
                    0, f"the agent at {self.socket_path} did not answer "
                    f"{method} {path} within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise AgentError(
                    0, f"talking to the agent at {self.socket_path}: "
                    f"{exc or type(exc).__name__}; see the agent's log"
                ) from None
        finally:
            conn.close()
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = {"error": raw.decode("utf-8", "replace")[:500]}
        if response.status >= 400:
            message = (reply.get("error") if isinstance(reply, dict)
                       else None) or f"HTTP {response.status}"
            raise AgentError(response.status, message, reply)
        return reply

    @staticmethod
    def _quote(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def attach_image(self, name: str, origin: str) -> dict:
        return self.request("POST", "/images",
                            {"name": name, "origin": origin})

    def detach_image(self, name: str) -> dict:
        return self.request("DELETE", f"/images/{self._quote(name)}")

    def images(self) -> list[dict]:
        return self.request("GET", "/images")["images"]

    def create_vm(self, name: str, image: str,
                  size: int | None = None) -> dict:
        """Create VM ``name``'s disk on ``image``, ``size`` bytes (at
        least the image's; None: the image's size)."""
        body = {"name": name, "image": image}
        if size is not None:
            body["size"] = size
        return self.request("POST", "/vms", body)

    def delete_vm(self, name: str) -> dict:
        return self.request("DELETE", f"/vms/{self._quote(name)}")

    def vms(self) -> list[dict]:
        return self.request("GET", "/vms")["vms"]

    def status(self) -> dict:
        return self.request("GET", "/status")

    def precache(self, name: str, trace: str | None = None) -> dict:
        """Start warming image ``name`` (the chunks of ``trace``, an
        absolute path, or the whole image); its progress, with
        ``started`` False when one was running already."""
        return self.request("POST", f"/images/{self._quote(name)}/precache",
                            {"trace": trace})

    def precache_progress(self, name: str) -> dict:
        return self.request("GET", f"/images/{self._quote(name)}/precache")

    def pin_image(self, name: str, pinned: bool = True) -> dict:
        """Pin (never evict) or unpin image ``name``'s cache."""
        return self.request("POST" if pinned else "DELETE",
                            f"/images/{self._quote(name)}/pin")

    def cache(self) -> dict:
        """The cache capacity and, per cache, what it holds (GET /cache)."""
        return self.request("GET", "/cache")

    def evict(self, image: str | None = None,
              all_unused: bool = False) -> dict:
        """Evict image ``image``'s cache, or every unused one."""
        body = {"all_unused": True} if all_unused else {"image": image}
        return self.request("POST", "/cache/evict", body)

    def health(self) -> tuple[bool, dict]:
        """(healthy, the body of GET /healthz: its problems and checks)."""
        try:
            return True, self.request("GET", "/healthz")
        except AgentError as exc:
            if exc.status == 503 and isinstance(exc.reply, dict):
                return False, exc.reply
            raise


# -- the `vmthunder` subcommands ----------------------------------------

COMMANDS = ("image", "vm", "status", "precache", "health", "cache")


def add_parsers(sub) -> None:
    """Add `image`, `vm` and `status` to the `vmthunder` parser."""
    def socket_arg(p):
        p.add_argument("--api-socket", metavar="PATH",
                       help="the agent's API socket (default from [agent] "
                            "api_socket, /run/vmthunder/agent.sock)")

    image = sub.add_parser(
        "image", help="attach, detach and list images on the local agent",
        description="Manage the images attached to the local "
                    "vmthunder-agent. An attached image has one "
                    "copy-on-read cache on this host, shared by its VMs.")
    isub = image.add_subparsers(dest="action", metavar="ACTION",
                                required=True)
    p = isub.add_parser("attach", help="attach an image",
                        description="Attach ORIGIN as image NAME. Attaching "
                                    "the same name and origin again changes "
                                    "nothing.")
    p.add_argument("name", help="image name (letters, digits, . _ -)")
    p.add_argument("origin", help="iscsi://[USER@]HOST[:PORT]/IQN/LUN, "
                                  "export:NAME, or a raw image file")
    socket_arg(p)
    p = isub.add_parser("detach", help="detach an image (no VMs may use it)",
                        description="Detach image NAME. Refused while VMs "
                                    "use it. Its cache stays on disk and is "
                                    "reused by a later attach.")
    p.add_argument("name")
    socket_arg(p)
    p = isub.add_parser("list", help="list attached images")
    p.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(p)
    for action, text in (("pin", "never evict the image's cache (kept "
                                 "across restarts)"),
                         ("unpin", "let the image's cache be evicted "
                                   "again")):
        p = isub.add_parser(action, help=text, description=text[0].upper()
                            + text[1:] + ". See `vmthunder cache list`.")
        p.add_argument("name")
        socket_arg(p)

    cache = sub.add_parser(
        "cache", help="what the host cache holds; evict images from it",
        description="The host cache ([cache] max_bytes, watermarks): per "
                    "image, the bytes its cache holds on disk, its last "
                    "use by a VM, its VMs, whether it is pinned. Images no "
                    "VM uses are evicted least recently used first when "
                    "the cache passes its high watermark; see "
                    "docs/design.md, \"Cache capacity\".")
    csub = cache.add_subparsers(dest="action", metavar="ACTION",
                                required=True)
    p = csub.add_parser("list", help="list the caches on this host")
    p.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(p)
    p = csub.add_parser("evict", help="evict an image's cache, or all "
                                      "unused ones",
                        description="Evict IMAGE's cache (an attached "
                                    "image no VM uses, not pinned; or a "
                                    "cache key from `vmthunder cache "
                                    "list`), or with --all-unused every "
                                    "cache no VM uses. The image stays "
                                    "attached: its chunks are fetched "
                                    "again when read.")
    p.add_argument("image", nargs="?", help="image name or cache key")
    p.add_argument("--all-unused", action="store_true",
                   help="every cache no VM uses (and not pinned)")
    socket_arg(p)

    vm = sub.add_parser(
        "vm", help="create, delete and list VM disks on the local agent",
        description="Manage VM disks: a copy-on-write snapshot of an "
                    "attached image, served to the hypervisor over NBD.")
    vsub = vm.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = vsub.add_parser("create", help="create a VM disk",
                        description="Create the disk of VM NAME on IMAGE "
                                    "and print the NBD URI the hypervisor "
                                    "opens.")
    p.add_argument("name")
    p.add_argument("--image", required=True, help="an attached image")
    p.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help="virtual size of the disk (bytes, or 20G, 512M...): "
                        "at least the image's; past the image it reads as "
                        "zeros until written (default: the image's size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(p)
    p = vsub.add_parser("delete", help="delete a VM disk and its data")
    p.add_argument("name")
    socket_arg(p)
    p = vsub.add_parser("list", help="list VM disks")
    p.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(p)

    status = sub.add_parser(
        "status", help="show the local agent's images, VMs and counters",
        description="Per image: chunks held, bytes from the origin, from "
                    "peers and served to peers; per VM: bytes read and "
                    "written.")
    status.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(status)

    p = sub.add_parser(
        "health", help="is the local agent healthy? (exit 0 yes, 1 no)",
        description="Ask the local agent's /healthz: every attached "
                    "image's origin reachable, the coordination backend "
                    "reachable (mesh peers), enough free space for caches "
                    "and state. Prints what is wrong; exit 0 when healthy, "
                    "1 otherwise (or when the agent does not answer).")
    p.add_argument("--json", action="store_true", help="print JSON")
    socket_arg(p)

    p = sub.add_parser(
        "precache", help="warm an image's cache on one or more agents",
        description="Fetch the chunks of IMAGE that the agent's cache does "
                    "not hold yet: the whole image, or (--trace) the chunks "
                    "a recorded boot read, in the order it read them. "
                    "Chunks come from peers first, the origin last, each "
                    "checked. Give --api-socket several times to warm the "
                    "image on several agents at once; progress is shown "
                    "until all are done (exit 1 if any failed).")
    p.add_argument("image", help="an image attached on each agent")
    p.add_argument("--trace", metavar="FILE",
                   help="a boot trace (vmthunder boot --trace, vmthunder "
                        "serve --trace) of this image: warm only the "
                        "chunks it read, in its order")
    p.add_argument("--api-socket", metavar="PATH", action="append",
                   help="an agent's API socket; repeat for several agents "
                        "(default from [agent] api_socket, "
                        "/run/vmthunder/agent.sock)")
    p.add_argument("--no-wait", action="store_true",
                   help="start the precache and return at once")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between progress polls (default 0.5)")


def _table(rows: list[list], header: list[str]) -> str:
    rows = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths))
                     .rstrip() for r in rows)


def _size(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _origin(text: str) -> str:
    """A local file given relative to the caller's directory is made
    absolute: the agent runs elsewhere."""
    if "://" in text or text.startswith("export:") or os.path.isabs(text):
        return text
    if os.path.exists(text):
        return os.path.abspath(text)
    return text


def run(args, conf) -> int:
    """Run `vmthunder image|vm|status`; errors as `vmthunder: error: ...`."""
    if args.command == "precache":
        return run_precache(args, conf)
    client = AgentClient(args.api_socket or conf.agent.api_socket)
    out = print
    try:
        if args.command == "image":
            if args.action == "attach":
                info = client.attach_image(args.name, _origin(args.origin))
                out(f"image {info['name']} "
                    f"{'attached' if info.get('created') else 'was attached'}"
                    f" from {info['origin']}")
            elif args.action == "detach":
                client.detach_image(args.name)
                out(f"image {args.name} detached")
            elif args.action in ("pin", "unpin"):
                client.pin_image(args.name, args.action == "pin")
                out(f"image {args.name} {args.action}ned")
            else:
                images = client.images()
                if args.json:
                    out(json.dumps(images, indent=1))
                elif images:
                    out(_table([[i["name"], i["state"], i["origin"],
                                 ",".join(i["vms"]) or "-"]
                                for i in images],
                               ["NAME", "STATE", "ORIGIN", "VMS"]))
                else:
                    out("no images attached")
        elif args.command == "vm":
            if args.action == "create":
                info = client.create_vm(args.name, args.image, args.size)
                size = (f" ({_size(info['size'])})" if "size" in info
                        else "")
                out(json.dumps(info, indent=1) if args.json
                    else f"VM {info['name']} on image {info['image']}"
                         f"{size}: {info['nbd']}")
            elif args.action == "delete":
                client.delete_vm(args.name)
                out(f"VM {args.name} deleted")
            else:
                vms = client.vms()
                if args.json:
                    out(json.dumps(vms, indent=1))
                elif vms:
                    out(_table([[v["name"], v["image"], v["state"],
                                 _size(v["size"]) if "size" in v else "-",
                                 v.get("nbd") or v.get("error")]
                                for v in vms],
                               ["NAME", "IMAGE", "STATE", "SIZE", "NBD"]))
                else:
                    out("no VMs")
        elif args.command == "cache":
            return run_cache(client, args, out)
        elif args.command == "health":
            healthy, body = client.health()
            if args.json:
                out(json.dumps(body, indent=1))
            elif healthy:
                out("healthy")
            else:
                out("unhealthy:\n" + "\n".join(
                    f"  {problem}" for problem in body.get("problems", [])))
            return 0 if healthy else 1
        else:
            status = client.status()
            if args.json:
                out(json.dumps(status, indent=1))
            else:
                out(format_status(status))
    except AgentError as exc:
        print(f"vmthunder: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_cache(client: AgentClient, args, out) -> int:
    """`vmthunder cache list|evict`."""
    if args.action == "evict":
        if (args.image is None) == (not args.all_unused):
            print("vmthunder cache evict: error: give an IMAGE or "
                  "--all-unused", file=sys.stderr)
            return 2
        reply = client.evict(args.image, args.all_unused)
        for e in reply["evicted"]:
            out(f"evicted {e['image'] or e['key']}: "
                f"{_size(e['freed_bytes'])} freed")
        if not reply["evicted"]:
            out("nothing to evict")
        out(f"cache holds {_size(reply['held_bytes'])}")
        return 0
    listing = client.cache()
    if args.json:
        out(json.dumps(listing, indent=1))
        return 0
    out(format_cache(listing))
    return 0


def format_cache(listing: dict, now: float | None = None) -> str:
    cap = listing["max_bytes"]
    head = (f"cache holds {_size(listing['held_bytes'])}"
            + (f" of {_size(cap)} (evicts above "
               f"{_size(listing['high_watermark_bytes'])} down to "
               f"{_size(listing['low_watermark_bytes'])})" if cap
               else " (no cap: [cache] max_bytes = 0)")
            + f"; evicted {listing['evicted_images']} image(s), "
              f"{listing['evicted_chunks']} chunk(s), "
              f"{_size(listing['evicted_bytes'])}")
    now = time.time() if now is None else now
    rows = []
    for c in listing["caches"]:
        age = now - c["last_use"] if c["last_use"] else None
        rows.append([c["image"] or f"({c['key']})", c["state"],
                     _size(c["held_bytes"]),
                     "-" if age is None else _ago(age),
                     ",".join(c["vms"]) or "-",
                     "yes" if c["pinned"] else "no"])
    if not rows:
        return head + "\nno caches"
    return head + "\n" + _table(rows, ["IMAGE", "STATE", "HELD",
                                       "LAST USE", "VMS", "PINNED"])


def _ago(seconds: float) -> str:
    seconds = max(0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def format_status(status: dict) -> str:
    process = status.get("process")
    lines = [f"agent up {status['uptime_s']:.0f} s"
             + (f" (CPU {process['cpu_s']:.1f} s, RSS "
                f"{_size(process['rss_bytes'])})" if process else "")
             + f"; VM disks on "
             f"{status['hypervisor_nbd']}"
             + (f"; peers on {status['peer_nbd']}" if status.get("peer_nbd")
                else "")
             + (f"; {status['stalled_reads_now']} guest read(s) stalled "
                f"now (over {status['stalled_read_seconds']:g} s)"
                if status.get("stalled_reads_now") else "")]
    upload = status.get("peer_upload")
    if status.get("peer_nbd") and upload:
        lines.append(
            f"sent to peers {_size(upload['bytes_sent'])}, upload limit "
            f"{upload['limit']}"
            + (f"; replies waited {upload['wait_s']:.1f} s for it, "
               f"{upload['refused']} read(s) refused (queue full)"
               if upload["rate"] else ""))
    background = status.get("background_fetch")
    if background and background["rate"]:
        lines.append(
            f"precache and prefetch limit {background['limit']}: "
            f"{_size(background['bytes'])} fetched under it, waited "
            f"{background['wait_s']:.1f} s for it")
    cap = status.get("cache_capacity")
    if cap:
        lines.append(
            f"cache holds {_size(cap['held_bytes'])}"
            + (f" of {_size(cap['max_bytes'])}" if cap["max_bytes"]
               else " (no cap)")
            + f"; evicted {cap['evicted_images']} image(s), "
              f"{_size(cap['evicted_bytes'])}"
            + (f"; {_size(cap['not_kept_bytes'])} fetched and not kept"
               if cap["not_kept_bytes"] else ""))
    images = status["images"].values()
    if images:
        lines.append("")
        lines.append(_table(
            [[i["name"], i["state"],
              f"{i.get('chunks_held', '-')}/{i.get('chunks_total', '-')}",
              _size(i.get("bytes_from_origin", 0)),
              _size(i.get("bytes_from_peers", 0)),
              _size(i.get("bytes_served_to_peers", 0)),
              i.get("stalled_reads", "-")] for i in images],
            ["IMAGE", "STATE", "CHUNKS", "FROM ORIGIN", "FROM PEERS",
             "TO PEERS", "STALLED"]))
        for i in images:
            line = format_prefetch(i["name"], i.get("prefetch"))
            if line:
                lines.append(line)
            line = format_boot_trace(i["name"], i.get("boot_trace"))
            if line:
                lines.append(line)
    vms = status["vms"].values()
    if vms:
        lines.append("")
        lines.append(_table(
            [[v["name"], v["image"], v["state"],
              _size(v.get("bytes_read", 0)),
              _size(v.get("bytes_written", 0))] for v in vms],
            ["VM", "IMAGE", "STATE", "READ", "WRITTEN"]))
    if not images and not vms:
        lines.append("no images, no VMs")
    return "\n".join(lines)


def format_prefetch(image: str, p: dict | None) -> str | None:
    """One line on an image's trace prefetch (agent/prefetch.py)."""
    if not p:
        return None
    if p.get("state") == "none":
        return f"image {image}: {p.get('note')}"
    ended = p["state"] != "running"
    return (f"image {image}: prefetch {p['state']}"
            + (f" ({p['stop_reason']})" if p.get("stop_reason") else "")
            + f": {p['chunks_prefetched']} of {p['trace_chunks']} trace "
            f"chunks prefetched, {p['chunks_used']} used, "
            f"{p['chunks_unused']} {'wasted' if ended else 'not yet used'}"
            f", {p['chunks_held_already']} held already, "
            f"{p['chunks_deferred']} left to their owner, "
            f"{p['promoted']} promoted")


def format_boot_trace(image: str, b: dict | None) -> str | None:
    """One line on an image's recorded boot trace
    (agent/trace_recording.py)."""
    if not b:
        return None
    parts = []
    if b.get("state") == "recording":
        parts.append(f"recording VM {b['vm']}'s boot ({b['chunks']} "
                     "chunks so far)")
    elif b.get("state") == "recorded":
        parts.append(f"recorded here ({b['chunks']} chunks, sha256 "
                     f"{b['digest'][:16]}...)")
    used = b.get("used")
    if used and used.get("source"):
        parts.append(f"last prefetch from the trace {used['source']} "
                     f"({used['chunks']} chunks)")
    elif used and used.get("refused"):
        parts.append("peers' recorded traces refused: "
                     + "; ".join(used["refused"]))
    return f"image {image}: boot trace " + ", ".join(parts) if parts \
        else None


# -- `vmthunder precache` ------------------------------------------------

MiB = 1024 * 1024
# Without a terminal, a progress line per agent this often (and at the
# end of each).
REPORT_EVERY_S = 5.0


class _Host:
    """One agent's precache, as the CLI follows it."""

    def __init__(self, socket_path: str):
        self.label = socket_path
        self.short = socket_path        # the label on a terminal
        self.client = AgentClient(socket_path, timeout=30)
        self.progress: dict | None = None
        self.error: str | None = None
        self.reported = False           # its end was printed

    @property
    def finished(self) -> bool:
        return self.error is not None or (
            self.progress is not None and self.progress["state"] != "running")

    @property
    def ok(self) -> bool:
        return self.error is None and self.progress is not None \
            and self.progress["state"] == "done"


def format_precache(label: str, p: dict | None, error: str | None = None
                    ) -> str:
    """One progress line: chunks, MiB, MiB/s, from peers/origin."""
    if p is None:
        return f"{label}: error: {error}"
    done, total = p["chunks_done"], p["chunks_total"]
    elapsed = p.get("elapsed_s") or 0.0
    rate = p["bytes_fetched"] / MiB / elapsed if elapsed > 0 else 0.0
    pct = 100.0 * done / total if total else 100.0
    line = (f"{label}: {p['image']} {p['state']} {done}/{total} chunks "
            f"({pct:.0f}%), {p['bytes_fetched'] / MiB:.1f}/"
            f"{p['bytes_total'] / MiB:.1f} MiB, {rate:.1f} MiB/s, from "
            f"peers {p['from_peers'] / MiB:.1f} MiB, origin "
            f"{p['from_origin'] / MiB:.1f} MiB, {elapsed:.1f} s")
    held = p.get("chunks_selected", total) - total
    if held > 0:
        line += f" ({held} held already)"
    if error or p.get("error"):
        line += f": {error or p['error']}"
    return line


def _fit(host: _Host, width: int) -> str:
    """The host's progress line in ``width`` columns (one terminal line,
    so the display can redraw it); a long label keeps its end."""
    label = host.short
    most = max(12, width // 3)
    if len(label) > most:
        label = "…" + label[1 - most:]
    return format_precache(label, host.progress, host.error)[:width]


def run_precache(args, conf, out=None) -> int:
    """`vmthunder precache IMAGE`: start on every agent, then follow."""
    out = out or sys.stdout
    trace = os.path.abspath(args.trace) if args.trace else None
    hosts = [_Host(path) for path in
             dict.fromkeys(args.api_socket or [conf.agent.api_socket])]
    for host in hosts:
        try:
            host.progress = host.client.precache(args.image, trace)
        except AgentError as exc:
            host.error = str(exc)
    if args.no_wait:
        for host in hosts:
            line = format_precache(host.label, host.progress, host.error)
            if host.progress is not None and not host.progress["started"]:
                line += " (was running already)"
            print(line, file=out, flush=True)
        return 1 if any(h.error for h in hosts) else 0
    tty = out.isatty()
    if len(hosts) > 1:
        # On a terminal, the sockets without their common directory.
        common = os.path.commonpath([os.path.dirname(h.label)
                                     for h in hosts])
        if len(common) > 1:
            for h in hosts:
                h.short = os.path.relpath(h.label, common)
    shown = 0                   # lines drawn (TTY)
    last_report = 0.0
    while True:
        now = time.monotonic()
        if tty:
            width = max(40, shutil.get_terminal_size().columns - 1)
            text = "".join("\r\x1b[K" + _fit(h, width) + "\n"
                           for h in hosts)
            out.write((f"\x1b[{shown}A" if shown else "") + text)
            out.flush()
            shown = len(hosts)
        else:
            due = now - last_report >= REPORT_EVERY_S
            for h in hosts:
                if (not h.finished and due) or (h.finished
                                                and not h.reported):
                    print(format_precache(h.label, h.progress, h.error),
                          file=out, flush=True)
            if due:
                last_report = now
        for h in hosts:
            if h.finished:
                h.reported = True
        if all(h.finished for h in hosts):
            break
        time.sleep(max(0.05, args.interval))
        for h in hosts:
            if not h.finished:
                try:
                    h.progress = h.client.precache_progress(args.image)
                except AgentError as exc:
                    h.error = str(exc)
    failed = [h for h in hosts if not h.ok]
    for h in failed:
        why = h.error or (h.progress or {}).get("error") or \
            (h.progress or {}).get("state")
        print(f"vmthunder: error: precache of {args.image} on {h.label}: "
              f"{why}", file=sys.stderr)
    return 1 if failed else 0
