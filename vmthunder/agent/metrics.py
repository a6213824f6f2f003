"""The agent's Prometheus metrics (GET /metrics) and health (GET
/healthz), over plain HTTP on ``[agent] metrics_listen``.

Nothing is counted for the metrics. At each scrape, :class:`AgentCollector`
reads what the agent keeps anyway: the counters of ``vmthunder status``
(Agent.status(): every number in it is a metric here, the tables below
say which), and each image's guest-read latency histogram
(vmthunder/cache/read_watch.py). The text is made by prometheus_client
(its own encoder, text format 0.0.4 or OpenMetrics as the scraper asks),
on the event loop, in an aiohttp handler: a scrape reads a few hundred
numbers and counts the present chunks of each image's map (C speed), so
it takes well under a millisecond per image.

Labels: ``image`` on image metrics, ``vm`` and ``image`` on VM metrics.
Counters end in ``_total``; sizes are in bytes, times in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vmthunder.nbd.address import Address

LOG = logging.getLogger(__name__)

P = "vmthunder_"

# Image status key -> (metric name without prefix and _total, help).
IMAGE_COUNTERS = {
    "bytes_read": ("cache_read_bytes",
                   "Bytes read from the image's cache: its VMs' reads of "
                   "blocks they did not write, precache, peers' reads."),
    "bytes_fetched": ("cache_fetched_bytes",
                      "Bytes the cache fetched (origin or peers), checked "
                      "against the manifest."),
    "chunks_fetched": ("cache_fetched_chunks",
                       "Chunks the cache fetched: its misses, chunk by "
                       "chunk (VMs' reads, precache and peers)."),
    "bytes_from_origin": ("origin_read_bytes",
                          "Bytes read from the image's origin."),
    "bytes_from_peers": ("peer_read_bytes",
                         "Bytes read from peer hosts' caches."),
    "bytes_served_to_peers": ("peer_served_bytes",
                              "Bytes this host's cache of the image served "
                              "to peer hosts."),
    "verify_errors": ("cache_verify_errors",
                      "Chunks the cache found not matching the manifest "
                      "(over a plain origin; with peers the image's volume "
                      "checks: see chunk_verify_failures)."),
    "fetch_errors": ("cache_fetch_errors",
                     "Fetches (or chunks of one) that failed: their readers "
                     "got an error."),
    "store_errors": ("cache_store_errors",
                     "Fetched chunks the cache could not write or sync to "
                     "its file (served, fetched again later)."),
    "read_hits": ("guest_read_hits",
                  "Guest reads whose blocks were all in the VM's overlay or "
                  "held in the cache as they arrived."),
    "read_misses": ("guest_read_misses",
                    "Guest reads that started or joined a fetch."),
    "chunks_evicted": ("cache_evicted_chunks",
                       "Chunks evicted from the image's cache (host cache "
                       "capacity, or asked: vmthunder cache evict)."),
    "chunks_not_kept": ("cache_not_kept_chunks",
                        "Fetched chunks served but not kept: the host "
                        "cache was at [cache] max_bytes."),
    "stalled_reads": ("stalled_reads",
                      "Guest reads that waited [agent] stalled_read_seconds "
                      "or longer (each logged once)."),
    "peer_reads_waiting": ("peer_reads_waiting",
                           "Peers' reads of a chunk this host owns that "
                           "waited for its fetch here to begin reading."),
}
# Image status key -> (metric name without prefix, help).
IMAGE_GAUGES = {
    "size": ("image_size_bytes", "The image's size."),
    "chunk_size": ("cache_chunk_size_bytes", "The cache's chunk size."),
    "chunks_held": ("cache_chunks_held", "Chunks the cache holds."),
    "chunks_total": ("cache_chunks", "Chunks of the image."),
    "cache_bytes": ("cache_bytes", "Bytes of the image the cache holds."),
    "fetches_in_flight": ("fetches_in_flight",
                          "Fetches reading from the origin or peers now."),
    "fetches_queued": ("fetches_queued",
                       "Fetches waiting for memory for their chunks."),
    "reads_in_progress": ("guest_reads_in_progress",
                          "Guest reads of the image's VMs in progress."),
}
# Image status keys holding a dict of numbers: (metric, help, label).
IMAGE_LABELLED_COUNTERS = {
    "peer_errors": ("peer_errors",
                    "Failures of peers, by kind (timeout, mismatch, io, "
                    "not_held); a failing peer is avoided for a while.",
                    "kind"),
    "verify_failures": ("chunk_verify_failures",
                        "Chunks that did not match the manifest, by where "
                        "they came from (never stored nor served).",
                        "source"),
    "fetches": ("fetches",
                "Reads of the image's volume from one source (origin, "
                "owner, peer, parent) that brought their chunks.",
                "source"),
    "fetch_chunks": ("fetch_chunks", "Chunks those fetches brought.",
                     "source"),
    "fetch_seconds": ("fetch_seconds",
                      "Seconds those fetches took, queue to checked data "
                      "(an owner's or parent's own fetch included).",
                      "source"),
    "fetch_digest_wait_seconds": (
        "fetch_digest_wait_seconds",
        "Of fetch_seconds: the data there, waiting for the chunks' "
        "manifest digests.", "source"),
}
# The origin source's own numbers (origin_io): gauges among them.
ORIGIN_GAUGES = {"in_flight"}
# The precache progress (of the last one, running or ended).
PRECACHE_GAUGES = ("chunks_total", "chunks_done", "bytes_total",
                   "bytes_fetched", "from_peers", "from_origin",
                   "chunks_selected", "chunk_size", "elapsed_s",
                   "started_at", "rate_limit")
# VM status key -> (metric name, help, counter?).
VM_METRICS = {
    "bytes_read": ("vm_read_bytes", "Bytes the VM read.", True),
    "bytes_written": ("vm_written_bytes", "Bytes the VM wrote.", True),
    "flushes": ("vm_flushes", "Flushes the VM asked for.", True),
    "blocks_written": ("vm_blocks_written",
                       "Blocks of the VM's disk in its own overlay.", False),
    "size": ("vm_size_bytes", "The VM disk's virtual size.", False),
    "block_size": ("vm_block_size_bytes",
                   "The copy-on-write block size of the VM's snapshot.",
                   False),
}
# Agent status key -> (metric name, help).
AGENT_GAUGES = {
    "uptime_s": ("agent_uptime_seconds", "Seconds since the agent started."),
    "stalled_reads_now": ("guest_reads_stalled",
                          "Guest reads waiting stalled_read_seconds or "
                          "longer now."),
    "stalled_read_seconds": ("stalled_read_threshold_seconds",
                             "[agent] stalled_read_seconds (0: off)."),
}
# The agent's uploads to peers (status "peer_upload"): key -> (metric
# name without prefix, help, counter?).
PEER_UPLOAD = {
    "rate": ("peer_upload_limit_bytes_per_second",
             "[agent] peer_upload_rate: most bytes per second sent to all "
             "peers together (0: no limit).", False),
    "bytes_sent": ("peer_upload_sent_bytes",
                   "Bytes of read replies sent to peers (images and digest "
                   "tables), host-wide.", True),
    "wait_s": ("peer_upload_wait_seconds",
               "Time replies to peers waited for the upload limit, summed "
               "over replies.", True),
    "refused": ("peer_upload_refused_reads",
                "Peer reads refused because the upload limit's queue was "
                "full (the peer read elsewhere).", True),
    "queued_s": ("peer_upload_queued_seconds",
                 "How long a reply to a peer would wait for the upload "
                 "limit now.", False),
}

# Precache and prefetch under their shared limit (status
# "background_fetch"): key -> (metric name without prefix, help, counter?).
BACKGROUND_FETCH = {
    "rate": ("background_fetch_limit_bytes_per_second",
             "[agent] background_fetch_rate: most bytes per second precache "
             "and trace prefetch fetch together (0: no limit).", False),
    "bytes": ("background_fetch_limited_bytes",
              "Bytes precache and prefetch read under that limit (counted "
              "only with a limit).", True),
    "wait_s": ("background_fetch_wait_seconds",
               "Time precache and prefetch reads waited for that limit, "
               "summed over reads.", True),
}

# The host cache's capacity (status "cache_capacity", agent/capacity.py):
# key -> (metric name without prefix, help, counter?).
CACHE_CAPACITY = {
    "held_bytes": ("cache_host_bytes",
                   "Bytes the image caches hold on disk together (their "
                   "allocated blocks, plus writes in progress).", False),
    "max_bytes": ("cache_max_bytes",
                  "[cache] max_bytes: most bytes the caches may hold (0: "
                  "no cap).", False),
    "high_watermark_bytes": ("cache_high_watermark_bytes",
                             "Eviction starts above this many bytes.",
                             False),
    "low_watermark_bytes": ("cache_low_watermark_bytes",
                            "Eviction stops at this many bytes.", False),
    "evicted_images": ("cache_evictions",
                       "Caches of images evicted whole (unused images, "
                       "least recently used first, or asked).", True),
    "evicted_chunks": ("cache_host_evicted_chunks",
                       "Chunks evicted from all caches (whole images and "
                       "idle images' unread chunks).", True),
    "evicted_bytes": ("cache_evicted_bytes",
                      "Bytes on disk freed by evictions.", True),
    "not_kept_bytes": ("cache_not_kept_bytes",
                       "Bytes of fetched chunks served but not kept: no "
                       "room under max_bytes.", True),
}


def _name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Families:
    """Metric families made as they are first needed, in that order."""

    def __init__(self):
        self.families: dict[str, object] = {}

    def add(self, kind, name: str, help_text: str, labels: dict,
            value) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = kind(P + name, help_text,
                                                labels=list(labels))
        family.add_metric(list(labels.values()), value)


class AgentCollector(Collector):
    """Reads an Agent's counters at scrape time."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []                       # checked at scrape, not at register

    def collect(self):
        agent = self.agent
        status = agent.status()
        out = _Families()
        for key, (name, help_text) in AGENT_GAUGES.items():
            if _number(status.get(key)):
                out.add(GaugeMetricFamily, name, help_text, {}, status[key])
        out.add(GaugeMetricFamily, "agent_images",
                "Images recorded (attached or in error).", {},
                len(status["images"]))
        out.add(GaugeMetricFamily, "agent_vms", "VMs recorded.", {},
                len(status["vms"]))
        for key, (name, help_text, counter) in PEER_UPLOAD.items():
            value = (status.get("peer_upload") or {}).get(key)
            if _number(value):
                out.add(CounterMetricFamily if counter else
                        GaugeMetricFamily, name, help_text, {}, value)
        for key, (name, help_text, counter) in BACKGROUND_FETCH.items():
            value = (status.get("background_fetch") or {}).get(key)
            if _number(value):
                out.add(CounterMetricFamily if counter else
                        GaugeMetricFamily, name, help_text, {}, value)
        for key, (name, help_text, counter) in CACHE_CAPACITY.items():
            value = (status.get("cache_capacity") or {}).get(key)
            if _number(value):
                out.add(CounterMetricFamily if counter else
                        GaugeMetricFamily, name, help_text, {}, value)
        coord = status.get("coordination")
        if coord is not None:
            out.add(GaugeMetricFamily, "coordination_healthy",
                    "1 when the coordination backend answered the last "
                    "heartbeat.", {}, int(coord["healthy"]))
            out.add(GaugeMetricFamily, "coordination_members",
                    "Members of the peer group (this one included).", {},
                    coord["members"])
        for name, image in status["images"].items():
            self._image(out, name, image)
        for name, vm in status["vms"].items():
            labels = {"vm": name, "image": vm["image"]}
            out.add(GaugeMetricFamily, "vm_ready",
                    "1 when the VM's disk is served, 0 when in error.",
                    labels, int(vm["state"] == "ready"))
            for key, (metric, help_text, counter) in VM_METRICS.items():
                if _number(vm.get(key)):
                    out.add(CounterMetricFamily if counter
                            else GaugeMetricFamily, metric, help_text,
                            labels, vm[key])
        yield from out.families.values()
        yield from self._latency()

    def _image(self, out: _Families, name: str, image: dict) -> None:
        labels = {"image": name}
        out.add(GaugeMetricFamily, "image_attached",
                "1 when the image is attached, 0 when recorded in error.",
                labels, int(image["state"] == "attached"))
        out.add(GaugeMetricFamily, "image_vms", "VMs on the image.", labels,
                len(image["vms"]))
        if image["state"] != "attached":
            return
        for key, (metric, help_text) in IMAGE_COUNTERS.items():
            out.add(CounterMetricFamily, metric, help_text, labels,
                    image[key])
        for key, (metric, help_text) in IMAGE_GAUGES.items():
            out.add(GaugeMetricFamily, metric, help_text, labels,
                    image[key])
        for key, (metric, help_text, label) in \
                IMAGE_LABELLED_COUNTERS.items():
            for sub, value in sorted(image[key].items()):
                out.add(CounterMetricFamily, metric, help_text,
                        {**labels, label: sub}, value)
        out.add(GaugeMetricFamily, "peers_avoided",
                "Peers avoided now after failing (for peer_avoid_seconds).",
                labels, len(image["peers_avoided"]))
        for key, value in sorted(image["origin_io"].items()):
            if key in ORIGIN_GAUGES:
                out.add(GaugeMetricFamily, f"origin_{_name(key)}",
                        f"The origin source's {key} now.", labels, value)
            else:
                out.add(CounterMetricFamily, f"origin_io_{_name(key)}",
                        f"The origin source's {key} counter (for iSCSI: "
                        "reads, commands, reconnects, retries...).",
                        labels, value)
        table = image.get("digest_table")
        if table:
            for key, value in sorted(table.items()):
                if key in ("pages", "pages_held"):
                    out.add(GaugeMetricFamily, f"digest_table_{key}",
                            f"The manifest's digest table: {key}.", labels,
                            value)
                elif _number(value):
                    out.add(CounterMetricFamily,
                            f"digest_table_{_name(key)}",
                            f"The manifest's digest table: {key}.", labels,
                            value)
        precache = image.get("precache")
        if precache:
            out.add(GaugeMetricFamily, "precache_running",
                    "1 while a precache of the image runs.", labels,
                    int(precache["state"] == "running"))
            for key in PRECACHE_GAUGES:
                if _number(precache.get(key)):
                    out.add(GaugeMetricFamily, f"precache_{key}",
                            f"The image's last precache: {key}.", labels,
                            precache[key])
        prefetch = image.get("prefetch")
        if prefetch:
            # The image's trace prefetch (agent/prefetch.py): every number
            # of its status, as gauges of the current (or last) one.
            out.add(GaugeMetricFamily, "prefetch_running",
                    "1 while a trace prefetch of the image runs.", labels,
                    int(prefetch.get("state") == "running"))
            for key, value in sorted(prefetch.items()):
                if _number(value):
                    out.add(GaugeMetricFamily, f"prefetch_{_name(key)}",
                            f"The image's trace prefetch: {key}.", labels,
                            value)
        boot_trace = image.get("boot_trace")
        if boot_trace:
            # The boot trace recorded here (agent/trace_recording.py).
            out.add(GaugeMetricFamily, "boot_trace_recording",
                    "1 while the agent records a boot of the image.",
                    labels, int(boot_trace.get("state") == "recording"))
            if _number(boot_trace.get("chunks")):
                out.add(GaugeMetricFamily, "boot_trace_chunks",
                        "Chunks of the image's boot trace recorded here "
                        "(so far, while recording).", labels,
                        boot_trace["chunks"])
            used = boot_trace.get("used") or {}
            if _number(used.get("chunks")):
                out.add(GaugeMetricFamily, "boot_trace_used_chunks",
                        "Chunks of the recorded boot trace (this host's "
                        "or a peer's) the image's last prefetch used.",
                        labels, used["chunks"])

    def _latency(self):
        family = HistogramMetricFamily(
            P + "guest_read_latency_seconds",
            "Time from a guest read's arrival at its VM's disk to its "
            "data, per image (reads sent straight from the page cache "
            "count as 0).", labels=["image"])
        for name, image in self.agent.images.items():
            hist = image.reads.histogram()
            family.add_metric(
                [name], [(floatToGoString(bound), count)
                         for bound, count in hist["buckets"]],
                hist["sum"])
        yield family


def make_registry(agent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    # The agent process's CPU, memory and descriptors (from /proc).
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """GET /metrics and /healthz on ``address`` (None: not served)."""

    def __init__(self, agent, address: Address | None):
        self.agent = agent
        self.listen = address
        self.address: Address | None = None
        self.registry = make_registry(agent)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        from vmthunder.agent.api import healthz
        app = web.Application()

        async def metrics(request):
            encoder, content_type = choose_encoder(
                request.headers.get("Accept", ""))
            return web.Response(body=encoder(self.registry),
                                headers={"Content-Type": content_type})

        async def index(request):
            return web.Response(text="vmthunder-agent: /metrics "
                                     "(Prometheus), /healthz\n")

        app.router.add_get("/metrics", metrics)
        async def health(request):
            return await healthz(self.agent)

        app.router.add_get("/healthz", health)
        app.router.add_get("/", index)
        return app

    async def start(self) -> None:
        if self.listen is None:
            return
        from vmthunder.agent.service import prepare_socket_path
        self._runner = web.AppRunner(self.app(), access_log=None,
                                     handle_signals=False)
        await self._runner.setup()
        listen = self.listen
        if listen.kind == "unix":
            prepare_socket_path(listen.path, "metrics")
            site = web.UnixSite(self._runner, listen.path)
            await site.start()
            self.address = listen
        else:
            site = web.TCPSite(self._runner, listen.host, listen.port)
            await site.start()
            port = self._runner.addresses[0][1]
            self.address = Address("tcp", host=listen.host, port=port)
        LOG.info("metrics and health on %s (GET /metrics, /healthz)",
                 self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            if self.listen.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.listen.path)
