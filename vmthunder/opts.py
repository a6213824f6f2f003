"""oslo.config options of vmthunder, exported through list_opts().

``oslo-config-generator --namespace vmthunder`` builds the sample config in
``etc/vmthunder/vmthunder.conf.sample`` from these; command-line flags of
``vmthunder`` default to the values here, so a config file sets the defaults
of a whole host.
"""

from __future__ import annotations

import os
import socket

from oslo_config import cfg

from vmthunder import guest
from vmthunder.ratelimit import Rate

KiB = 1024
MiB = 1024 * KiB

# The cache's chunk size over a source without a manifest (a raw file, a
# LUN without one); over an export the cache takes its manifest's.
DEFAULT_CHUNK_SIZE = 256 * KiB
# Exports' manifests: small chunks, so that a boot fetches little more
# than the scattered 4 KiB blocks its guest reads (the digest table is
# read lazily and shared through peers): measured in docs/benchmarks.md.
DEFAULT_EXPORT_CHUNK_SIZE = 8 * KiB

cache_opts = [
    cfg.StrOpt(
        "cache_dir",
        default="/var/lib/vmthunder/cache",
        help="Directory holding the copy-on-read caches (one subdirectory "
             "per image) and the per-VM snapshot overlays. Survives "
             "restarts: a cache found here is reused."),
    cfg.IntOpt(
        "chunk_size",
        default=DEFAULT_CHUNK_SIZE,
        min=4 * KiB,
        max=64 * MiB,
        help="Bytes fetched from the image source per cache miss, for a "
             "source without a manifest (a raw file, a LUN without one; "
             "over an export the cache takes its manifest's chunk size, "
             "[export] chunk_size); a power of two. Smaller fetches less "
             "that the guest never reads, larger needs fewer round trips "
             "and less per-chunk work (see docs/benchmarks.md)."),
    cfg.IntOpt(
        "max_pending_writes",
        default=32,
        min=1,
        help="Fetched chunks that may wait in memory to be written to the "
             "cache, counted in units of 256 KiB when chunks are smaller; "
             "bounds memory on a cold read storm."),
    cfg.FloatOpt(
        "sync_interval",
        default=2.0,
        min=0,
        help="Seconds between fdatasyncs of a cache: chunks fetched since "
             "the last one are served from the cache file but marked "
             "present only after the next, so a crash costs at most this "
             "many seconds of refetching, never wrong data. A sync makes "
             "the kernel write back at once, taking CPU from booting VMs; "
             "0 syncs as soon as possible (group commit)."),
    cfg.IntOpt(
        "max_bytes",
        default=0,
        min=0,
        help="Most bytes the image caches under cache_dir may hold on "
             "disk together (the agent; VMs' overlays are not counted). "
             "A fetched chunk that does not fit is served, not kept. "
             "Above high_watermark, caches are evicted down to "
             "low_watermark: images no VM uses first, least recently used "
             "first; then chunks of idle images that their VMs never "
             "read. A pinned image (`vmthunder image pin`) and an image "
             "a VM read within idle_seconds never lose a chunk. 0: no "
             "cap."),
    cfg.IntOpt(
        "high_watermark",
        default=90,
        min=1,
        max=100,
        help="Percent of max_bytes above which the agent evicts."),
    cfg.IntOpt(
        "low_watermark",
        default=80,
        min=0,
        max=100,
        help="Percent of max_bytes an eviction brings the caches down to "
             "(at most high_watermark)."),
    cfg.FloatOpt(
        "idle_seconds",
        default=600.0,
        min=0,
        help="An image whose VMs read nothing for this long is idle: "
             "under pressure it loses the chunks its VMs never read "
             "(precached, prefetched, fetched for peers). An image a VM "
             "read more recently loses nothing."),
]

snapshot_opts = [
    cfg.IntOpt(
        "block_size",
        default=4 * KiB,
        min=512,
        max=1 * MiB,
        help="Copy-on-write granularity of a per-VM snapshot; a power of "
             "two. A write smaller than this costs a read of the rest of "
             "the block from below."),
]

nbd_opts = [
    cfg.StrOpt(
        "listen",
        default="tcp:127.0.0.1:10809",
        help="Where `vmthunder serve` listens: tcp:HOST:PORT or "
             "unix:PATH."),
    cfg.IntOpt(
        "max_request_bytes",
        default=32 * MiB,
        min=64 * KiB,
        help="Largest read or write one NBD request may carry; larger "
             "requests get EINVAL/EOVERFLOW (the spec's limit for "
             "well-behaved clients is 32 MiB)."),
    cfg.IntOpt(
        "max_inflight_bytes",
        default=64 * MiB,
        min=1 * MiB,
        help="Bytes of requests in progress over all NBD clients of one "
             "process (write payloads and replies included, until they "
             "have left); past it the server stops reading new requests "
             "until replies drain, so memory does not grow with clients. "
             "The server holds at most this plus max_connections x "
             "128 KiB of request data."),
    cfg.IntOpt(
        "max_inflight_per_client_bytes",
        default=16 * MiB,
        min=64 * KiB,
        help="Share of max_inflight_bytes one connection may hold; a "
             "client that does not read its replies stops at it and "
             "delays only itself (a connection with nothing in flight "
             "may still start one request of any allowed size)."),
    cfg.IntOpt(
        "max_connections",
        default=256,
        min=1,
        help="NBD connections one process accepts at once (VMs and "
             "peers); more are closed at once with a warning in the "
             "log."),
    cfg.FloatOpt(
        "write_payload_timeout",
        default=30.0,
        min=0.1,
        help="Seconds a client has to send a write's payload once the "
             "server has reserved budget for it; a client slower than "
             "that is disconnected, so that stalled writes do not hold "
             "memory others need."),
    cfg.StrOpt(
        "trace_file",
        help="Record a block trace of every NBD request (issue and "
             "completion time, op, offset, length; no data) to this file, "
             "gzip-compressed if it ends in .gz, for the boot benchmarks "
             "(python -m vmthunder.bench.replay). With several exports "
             "each gets its own file: {export} in the path is replaced by "
             "the export name, else the name is inserted before the first "
             "dot of the file name (boot.trace.gz -> boot.vm1.trace.gz). "
             "Written when `vmthunder serve` stops; until then "
             "<file>.part holds the requests up to the last second. Unset: "
             "no trace."),
]

boot_opts = [
    cfg.StrOpt(
        "guest_dir",
        default=guest.default_dir("guest"),
        sample_default="<repo>/.cache/guest",
        help="Where `vmthunder boot` keeps the small test guest (vmlinuz, "
             "initrd.img, root.img), built there on first use by the "
             "builder shipped in the package (vmthunder/guest/"
             "build-guest.sh; scripts/build-guest.sh in a checkout). "
             "Default: <repo>/.cache/guest in a source tree, "
             "~/.cache/vmthunder/guest (XDG_CACHE_HOME) when installed."),
    cfg.StrOpt(
        "qemu_binary",
        default="qemu-system-x86_64",
        help="QEMU system emulator used by `vmthunder boot`."),
    cfg.StrOpt(
        "qemu_accel",
        default="tcg",
        help="QEMU accelerator (-accel); tcg works everywhere, kvm where "
             "/dev/kvm is usable."),
    cfg.IntOpt(
        "memory_mb",
        default=512,
        min=64,
        help="Guest memory for `vmthunder boot`."),
    cfg.IntOpt(
        "boot_timeout",
        default=120,
        min=5,
        help="Seconds `vmthunder boot` waits for the guest's boot marker "
             "before it gives up."),
    cfg.StrOpt(
        "boot_marker",
        default="VMTHUNDER-BOOT-OK",
        help="Line the guest prints on its serial console once booted."),
]

export_opts = [
    cfg.StrOpt(
        "export_dir",
        default="/var/lib/vmthunder/exports",
        help="Where `vmthunder export` keeps each exported image: "
             "<export_dir>/<name>/ holds volume.raw (the LUN), "
             "manifest.bin and manifest.lun (the chunk manifest and its "
             "NUL-padded LUN copy), export.json (the record that "
             "`vmthunder exports --restore` re-creates targets from) and "
             "chap.json (mode 0600) when CHAP is on. tgtd's log is kept "
             "here too."),
    cfg.StrOpt(
        "portal",
        default="127.0.0.1:3260",
        help="iSCSI portal (HOST:PORT) tgtd listens on and the exports' "
             "URLs name. Loopback by default: set an address compute "
             "hosts can reach to export beyond this host."),
    cfg.IntOpt(
        "tgtd_control_port",
        default=0,
        min=0,
        max=32767,
        help="tgtd management channel (tgtd -C N, tgtadm -C N; the "
             "socket /var/run/tgtd/socket.N; tgt takes 0 to 32767). 0 is "
             "the tgtd default, the one Debian's tgt service uses; another "
             "number runs a tgtd of vmthunder's own beside it."),
    cfg.FloatOpt(
        "tgtd_start_timeout",
        default=10.0,
        min=0.5,
        help="Seconds to wait for a tgtd started by vmthunder to answer "
             "tgtadm."),
    cfg.StrOpt(
        "iqn_prefix",
        default="iqn.2026-11.org.vmthunder",
        help="Target names are <iqn_prefix>:<export name>. Use an IQN "
             "naming authority of your own (iqn.YYYY-MM.reversed.domain)."),
    cfg.ListOpt(
        "initiator_addresses",
        default=["ALL"],
        help="Initiator addresses allowed to log in to every export "
             "(tgtadm --initiator-address); ALL admits any initiator that "
             "reaches the portal (loopback only by default)."),
    cfg.IntOpt(
        "chunk_size",
        default=DEFAULT_EXPORT_CHUNK_SIZE,
        min=4 * KiB,
        max=64 * MiB,
        help="Chunk size of the manifest written beside each export (one "
             "digest per chunk); a power of two. A compute host's cache "
             "fetches and checks the image in chunks of this size, so it "
             "is the unit a boot fetches: small chunks fetch little that "
             "the guest does not read (see docs/benchmarks.md)."),

]

iscsi_opts = [
    cfg.IntOpt(
        "manifest_lun",
        default=2,
        min=0,
        help="LUN of the chunk manifest on an image's iSCSI target "
             "(`vmthunder export` puts it on LUN 2). Every chunk fetched "
             "from the origin is checked against it. 0 serves an iSCSI "
             "image without a manifest: nothing is verified."),
    cfg.ListOpt(
        "portals",
        default=[],
        help="More portals (HOST:PORT) of the same targets, tried in order "
             "after the URL's own at login and at every reconnect."),
    cfg.FloatOpt(
        "login_timeout",
        default=30.0,
        min=1,
        help="Seconds to wait for an iSCSI login before the attach fails "
             "with an error naming the portal."),
    cfg.FloatOpt(
        "reconnect_timeout",
        default=60.0,
        min=1,
        help="Seconds reads wait for a lost iSCSI target to come back "
             "(stalled, not failed); past it they fail with EIO."),
    cfg.StrOpt(
        "chap_user",
        help="CHAP user for iSCSI logins, when the URL names none."),
    cfg.StrOpt(
        "chap_secret_file",
        help="File holding the CHAP secret (kept out of URLs and process "
             "lists)."),
    cfg.StrOpt(
        "attach",
        default="auto",
        choices=[
            ("auto", "kernel where the host has a kernel iSCSI initiator "
                     "(iscsiadm on PATH, iscsi_tcp in the kernel) and "
                     "os-brick imports, else userspace"),
            ("userspace", "libiscsi from the vmthunder process: no kernel "
                          "support or root helper needed; reconnects "
                          "and fails over between [iscsi] portals itself"),
            ("kernel", "os-brick's iSCSI connector (as Nova attaches "
                       "Cinder volumes): iscsiadm logs in, the LUN is "
                       "read as /dev/sdX; only the URL's portal is used. "
                       "An error on a host without a kernel initiator"),
        ],
        help="How an iscsi:// (or export:NAME) image LUN is attached. "
             "The cache identity is the same either way, so switching "
             "keeps the caches."),
]

agent_opts = [
    cfg.StrOpt(
        "state_dir",
        default="/var/lib/vmthunder/agent",
        help="Where `vmthunder-agent` keeps state.json: the attached "
             "images (name, origin) and the VMs (name, image), rewritten "
             "atomically after every change. On start the agent "
             "re-attaches every image and re-creates every VM's snapshot "
             "and NBD export from it, so hypervisors reconnect to the "
             "same disks. One agent per state directory."),
    cfg.StrOpt(
        "api_socket",
        default="/run/vmthunder/agent.sock",
        help="Unix socket of the agent's local API (JSON over HTTP), "
             "used by `vmthunder image|vm|status` and the Nova driver. "
             "Created mode 0660: whoever can open it can create and "
             "delete VM disks."),
    cfg.StrOpt(
        "hypervisor_listen",
        default="unix:/run/vmthunder/nbd.sock",
        help="Where the agent serves the VMs' disks (one writable NBD "
             "export per VM, named after the VM) to the local "
             "hypervisor: unix:PATH, or tcp:127.0.0.1:PORT (keep TCP on "
             "loopback: the exports have no authentication). Use a "
             "fixed port: VMs are handed URIs that must stay valid "
             "across agent restarts."),
    cfg.StrOpt(
        "peer_listen",
        help="Where the agent serves each attached image's cache "
             "read-only to peer hosts over NBD (export name = image "
             "name): tcp:HOST:PORT or unix:PATH. Per-VM snapshots are "
             "never exported here. Unset: no peer export."),
    cfg.StrOpt(
        "cache_dir",
        help="Directory of the agent's image caches and VM snapshot "
             "overlays; unset uses [cache] cache_dir. A cache found here "
             "for the same image is reused after a restart."),
    cfg.StrOpt(
        "peer_mode",
        default="mesh",
        choices=[("mesh", "fetch a missing chunk from a peer that holds "
                          "it (found through [coordination]), else one "
                          "already fetching it, else the origin"),
                 ("tree", "read only from peer_parent (the original "
                          "VMThunder topology); no parent: the origin"),
                 ("off", "read only the origin (still export to peers)")],
        help="How an agent with peer_listen fetches the chunks it lacks. "
             "Every chunk from a peer is checked against the image's "
             "manifest; a peer that fails or sends a wrong chunk is "
             "avoided for peer_avoid_seconds."),
    cfg.StrOpt(
        "peer_parent",
        help="tree mode: tcp:HOST:PORT of this host's parent agent (its "
             "peer_listen). Unset: this host is the root and reads the "
             "origin."),
    cfg.StrOpt(
        "peer_advertise",
        help="tcp:HOST:PORT other agents dial to reach this one's "
             "peer_listen (default: peer_listen itself; set it when that "
             "is a wildcard address or behind NAT)."),
    cfg.FloatOpt(
        "peer_timeout",
        default=2.0,
        min=0.05,
        help="Seconds a peer gets to answer a block-status query or a "
             "read before the chunk is fetched elsewhere and the peer is "
             "avoided."),
    cfg.FloatOpt(
        "peer_avoid_seconds",
        default=30.0,
        min=0,
        help="How long a peer that timed out, failed or sent a wrong "
             "chunk is left out of the choice."),
    cfg.StrOpt(
        "metrics_listen",
        help="Where the agent serves Prometheus metrics (GET /metrics, "
             "text format) and its health (GET /healthz) over plain "
             "HTTP: tcp:HOST:PORT (e.g. tcp:127.0.0.1:9178; neither has "
             "authentication: keep it on loopback or a management "
             "network) or unix:PATH. Unset: not served (/healthz stays "
             "on the API socket)."),
    cfg.FloatOpt(
        "stalled_read_seconds",
        default=10.0,
        min=0,
        help="A guest read waiting this many seconds is logged once, "
             "with what it waits for (the origin, a peer, which chunks), "
             "and counted (stalled_reads in `vmthunder status`, "
             "vmthunder_stalled_reads_total). 0: no stalled-read "
             "detection."),
    cfg.IntOpt(
        "health_min_free_mib",
        default=1024,
        min=0,
        help="/healthz reports the agent unhealthy (503) when the file "
             "system of its cache_dir or state_dir has less than this "
             "many MiB free (a full cache disk gives VMs' writes "
             "ENOSPC)."),
    cfg.Opt(
        "peer_upload_rate",
        type=Rate(),
        help="Most bytes per second this host sends to all its peers "
             "together (one limit for every peer connection of the "
             "agent), so that serving other hosts leaves this host's "
             "network to its own VMs. The VMs' own disks "
             "(hypervisor_listen) are never limited. A tc rate "
             "('50mbit', '10mbps' = bytes/s) or bytes per second "
             "('6250000', '6M'); 0 or unset: no limit. Shown by "
             "`vmthunder status` with the bytes served to peers and the "
             "time they waited for the limit."),
    cfg.Opt(
        "background_fetch_rate",
        type=Rate(),
        help="Most bytes per second this host fetches for work no VM is "
             "waiting for (precache, trace prefetch), from the origin and "
             "peers together; reads of running VMs (demand reads) are "
             "never held back by it and go first. Same units as "
             "peer_upload_rate; 0 or unset: no limit."),
    cfg.BoolOpt(
        "prefetch",
        default=True,
        help="At a VM's create, when its image's export published a boot "
             "trace (`vmthunder trace publish`; checked against the "
             "image's manifest), read the trace's chunks ahead of the "
             "guest, in trace order, through the same peers and owners "
             "as the guest's reads, always behind them (a guest's read "
             "never waits behind a prefetch). One prefetch per image "
             "serves all its VMs on the host; it stops when the trace "
             "ends, when its guests read nothing for "
             "prefetch_idle_seconds, or when its VMs are deleted. "
             "Shown by `vmthunder status` (the image's prefetch: chunks "
             "prefetched, used, wasted)."),
    cfg.IntOpt(
        "prefetch_window_bytes",
        # 32 MiB: a systemd boot reads most of its ~28 MB working set in
        # its first seconds; 8 MiB left the guests waiting (standard
        # scenario 23.0 s against 21.7 s, docs/benchmarks.md).
        default=32 * 1024 * 1024,
        min=4096,
        help="How far (bytes of trace chunks, in trace order) the "
             "prefetch runs ahead of the furthest trace chunk a guest has "
             "read. Bounds what a wrong trace costs: a guest that reads "
             "nothing of the trace gets this much prefetched, no more."),
    cfg.IntOpt(
        "prefetch_run_bytes",
        default=64 * 1024,
        min=4096,
        help="Most bytes one prefetch read asks for (consecutive "
             "chunks): what a guest's read may find ahead of it on a "
             "link."),
    cfg.IntOpt(
        "prefetch_parallel",
        default=4,
        min=1,
        help="Prefetch reads in flight at once, per image."),
    cfg.FloatOpt(
        "prefetch_idle_seconds",
        default=30.0,
        min=0.1,
        help="The prefetch stops when no guest of the image read anything "
             "for this long (booted, or idle)."),
    cfg.FloatOpt(
        "prefetch_settle_seconds",
        default=1.5,
        min=0,
        help="With peers, the prefetch fetches the chunks this host owns "
             "(from the origin) only this long after it starts, and only "
             "the chunks other hosts hold before: hosts attaching an "
             "image at once learn of each other (the chunks' owners) "
             "through a membership round ([coordination] "
             "heartbeat_interval), and a host prefetching from the origin "
             "before would fetch the others' chunks too."),
    cfg.BoolOpt(
        "record_boot_traces",
        default=True,
        help="Where an image's export published no boot trace and no "
             "peer offers a recorded one, record the first boot of the "
             "image on this host (the chunk offsets of the shared base "
             "image the guest read, in first-touch order, until it reads "
             "nothing for prefetch_idle_seconds), keep it in the state "
             "directory and offer it to peers (served read-only by the "
             "peer NBD server; the membership carries only its digest "
             "and chunk count), and prefetch later boots of the image, "
             "here and on peers, from it. Only chunk offsets are shared: "
             "never data, never anything of a VM's writes; a wrong trace "
             "costs at most the prefetch window. False: nothing recorded "
             "or offered, no peer's recorded trace used."),
]

coordination_opts = [
    cfg.StrOpt(
        "backend_url",
        default="file:///var/lib/vmthunder/coordination",
        help="tooz backend through which agents find each other and the "
             "images each one caches (vmthunder/agent/membership.py). The "
             "default file:// backend is embedded (no server) and covers "
             "the agents of ONE host only. For many hosts use "
             "redis://HOST:6379 (every agent the same URL); a crashed "
             "agent is dropped membership_timeout seconds after its last "
             "heartbeat: redis://HOST:6379?timeout=5&membership_timeout=5 "
             "(left unset, vmthunder uses timeout=5 and 5 heartbeat "
             "intervals). etcd3+http://HOST:2379 works too."),
    cfg.FloatOpt(
        "heartbeat_interval",
        default=1.0,
        min=0.05,
        help="Seconds between an agent's heartbeats to the coordination "
             "backend, and between refreshes of its view of the peers. "
             "Keep it well under the backend's lease (membership_timeout "
             "of redis://, timeout of file://)."),
    cfg.StrOpt(
        "member_id",
        default=socket.gethostname(),
        sample_default="<host name>",
        help="This agent's id in the peer group; unique per host. An agent "
             "restarted under the same id replaces its old entry."),
    cfg.StrOpt(
        "group",
        default="vmthunder-peers",
        help="tooz group the agents join; agents in different groups do "
             "not share images."),
]

cinder_opts = [
    cfg.StrOpt(
        "endpoint",
        help="Cinder's volume API v3 endpoint (http://HOST:8776/v3). "
             "Needed with auth_strategy = noauth; with keystone, unset "
             "takes it from the catalog."),
    cfg.StrOpt(
        "glance_endpoint",
        help="Glance's endpoint (http://HOST:9292), for `vmthunder export "
             "glance://ID`. With --cinder: needed with auth_strategy = "
             "noauth; with keystone, unset takes it from the catalog. "
             "Without --cinder (the image fetched into a tgtd export): "
             "--glance-endpoint wins, unset falls back to "
             "$VMTHUNDER_GLANCE_ENDPOINT, a token from $OS_AUTH_TOKEN."),
    cfg.StrOpt(
        "auth_strategy",
        default="keystone",
        choices=[("keystone", "a Keystone password login (auth_url, "
                              "username, password, project_name)"),
                 ("noauth", "Cinder's noauth mode (user_id, project_id; "
                            "test and lab clouds)")],
        help="How vmthunder authenticates to Cinder and Glance."),
    cfg.StrOpt("user_id", default="vmthunder",
               help="User id sent with auth_strategy = noauth."),
    cfg.StrOpt("project_id", default="vmthunder",
               help="Project id sent with auth_strategy = noauth."),
    cfg.StrOpt("auth_url", help="Keystone's URL (auth_strategy = keystone)."),
    cfg.StrOpt("username", help="Keystone user name."),
    cfg.StrOpt("password", secret=True, help="Keystone password."),
    cfg.StrOpt("project_name", help="Keystone project of the volumes."),
    cfg.StrOpt("user_domain_name", default="Default",
               help="Keystone domain of the user."),
    cfg.StrOpt("project_domain_name", default="Default",
               help="Keystone domain of the project."),
    cfg.StrOpt("region_name", help="Region of the endpoints (catalog)."),
    cfg.StrOpt(
        "volume_type",
        default="vmthunder-multiattach",
        help="Volume type of image volumes, with the extra spec "
             "multiattach='<is> True' (made by `vmthunder export "
             "--cinder` when missing; needs a backend that reports "
             "multiattach)."),
    cfg.FloatOpt(
        "create_timeout",
        default=1800.0,
        min=1,
        help="Seconds `vmthunder export --cinder` waits for Cinder to make "
             "a volume from an image."),
    cfg.StrOpt(
        "initiator_name",
        help="iSCSI initiator name this host gives Cinder in its "
             "connector. Unset: /etc/iscsi/initiatorname.iscsi, else one "
             "made of the host name."),
    cfg.FloatOpt(
        "timeout",
        default=60.0,
        min=1,
        help="Seconds one HTTP request to Cinder or Glance may take."),
]

DEFAULT_CONFIG = "/etc/vmthunder/vmthunder.conf"


def config_files(path: str | None, prog: str) -> list[str]:
    """The config files to load: ``path`` (which must exist), else the
    default one when it exists, else none (built-in defaults)."""
    if path:
        if not os.path.exists(path):
            raise SystemExit(f"{prog}: config file {path} does not exist")
        return [path]
    return [DEFAULT_CONFIG] if os.path.exists(DEFAULT_CONFIG) else []


GROUPS = {
    "cache": cache_opts,
    "snapshot": snapshot_opts,
    "nbd": nbd_opts,
    "boot": boot_opts,
    "export": export_opts,
    "iscsi": iscsi_opts,
    "agent": agent_opts,
    "coordination": coordination_opts,
    "cinder": cinder_opts,
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts():
    """Entry point for oslo-config-generator (oslo.config.opts)."""
    return [(group, list(opts)) for group, opts in GROUPS.items()]
