"""`vmthunder serve`: one image through its cache (and snapshots) on NBD.

Builds the chain source -> CacheLayer -> SnapshotLayer per VM, exports
the cache read-only under the export name and each snapshot writable
under its VM's name, and runs until SIGTERM/SIGINT, then closes every
layer cleanly (snapshots flushed, chunk map saved).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time

from vmthunder import stack
from vmthunder.process_stats import process_figures
from vmthunder.blockdev import BlockError
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdLimits, NbdServer

LOG = logging.getLogger(__name__)

# The line `vmthunder serve` prints once it accepts connections; other
# programs (vmthunder boot, tests) wait for it.
READY_PREFIX = "vmthunder: ready"


@dataclasses.dataclass
class ServeConfig:
    image: str
    listen: Address
    cache: stack.CacheOptions
    export: str
    snapshots: list[str]
    block_size: int
    nbd_limits: NbdLimits
    read_only: bool = False
    stats_file: str | None = None
    # [iscsi] options (oslo.config group) and the [export] settings that
    # resolve export:NAME; None serves local files only.
    iscsi: object = None
    exports: object = None
    # Record a block trace of each export here (vmthunder/trace.py names the
    # per-export files).
    trace: str | None = None
    # Virtual size of the snapshots (at least the image's); None: the
    # size each has on disk, the image's for a new one.
    snapshot_size: int | None = None
    # [cinder] options, for cinder://VOLUME_ID.
    cinder: object = None


class ServeJob:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.cache: CacheLayer | None = None
        self.snapshots: dict[str, SnapshotLayer] = {}
        self.server: NbdServer | None = None
        self.started = time.monotonic()

    async def start(self) -> list[Address]:
        cfg = self.config
        source = await stack.open_source(stack.Origin.parse(cfg.image),
                                         cfg.iscsi, cfg.exports, cfg.cinder)
        self.cache = await stack.open_cache(source, cfg.cache)
        self.server = NbdServer(cfg.nbd_limits)
        self.server.add_export(cfg.export, self.cache, read_only=True,
                               description=f"cache of {cfg.image}")
        for name in cfg.snapshots:
            if name == cfg.export:
                raise ValueError(f"snapshot name {name!r} is also the export "
                                 "name of the shared cache; pick another")
            snap = stack.open_snapshot(self.cache, name,
                                       block_size=cfg.block_size,
                                       size=cfg.snapshot_size)
            self.snapshots[name] = snap
            self.server.add_export(name, snap, read_only=cfg.read_only,
                                   description=f"VM {name} on {cfg.image}")
        # The empty name (what `nbd://host:port` asks for) is the single
        # snapshot when there is one, else the shared cache.
        self.server.default_export = (cfg.snapshots[0]
                                      if len(cfg.snapshots) == 1
                                      else cfg.export)
        if cfg.trace:
            self._start_traces()
        bound = await self.server.listen(cfg.listen)
        return [bound]

    def _start_traces(self) -> None:
        from vmthunder import trace
        identity = self.cache.source.identity()
        several = len(self.server.exports) > 1
        for name, export in self.server.exports.items():
            export.recorder = trace.TraceRecorder(
                trace.export_trace_path(self.config.trace, name, several),
                export.device.size, export=name, source=self.config.image,
                image=identity or self.config.image,
                recorder="vmthunder serve")

    def flush_traces(self) -> None:
        for export in self.server.exports.values() if self.server else ():
            if export.recorder is not None:
                try:
                    export.recorder.flush()
                except OSError as exc:
                    # That second of the trace is lost; serving goes on.
                    LOG.warning("trace of export %r: could not write %s: "
                                "%s", export.name,
                                export.recorder.part_path, exc)

    def stats(self) -> dict:
        return {
            "image": self.config.image,
            "image_size": self.cache.size if self.cache else None,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "process": process_figures(),
            "cache": self.cache.stats() if self.cache else {},
            "source": self.cache.source.stats() if self.cache else {},
            "snapshots": {n: s.stats() for n, s in self.snapshots.items()},
        }

    def write_stats(self) -> None:
        if not self.config.stats_file:
            return
        tmp = self.config.stats_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, indent=1)
            os.replace(tmp, self.config.stats_file)
        except OSError as exc:
            # The previous stats file stays whole; the next write retries.
            LOG.warning("could not write the stats file %s: %s",
                        self.config.stats_file, exc)

    async def stop(self) -> None:
        """Close everything; a part that fails (a full disk) is logged
        and the others are still closed: each layer's files stay
        consistent on their own (marks never precede their data)."""
        if self.server is not None:
            await self.server.close()
            for export in self.server.exports.values():
                if export.recorder is not None:
                    try:
                        trace = export.recorder.close()
                    except (OSError, ValueError) as exc:
                        LOG.error("trace of export %r: could not write %s: "
                                  "%s", export.name, export.recorder.path,
                                  exc)
                        continue
                    if trace is not None:
                        LOG.info("trace of export %r: %d requests in %s",
                                 export.name, len(trace.requests),
                                 export.recorder.path)
        for snap in self.snapshots.values():
            try:
                await snap.close()
            except (OSError, BlockError) as exc:
                LOG.error("snapshot %r: closing it failed: %s; what the VM "
                          "flushed before is kept, its writes since its "
                          "last flush may be lost", snap.name, exc)
        if self.cache is not None:
            try:
                await self.cache.close()
            except (OSError, BlockError) as exc:
                LOG.error("%s: closing it failed: %s", self.cache.describe(),
                          exc)
        self.write_stats()


async def run(config: ServeConfig) -> int:
    job = ServeJob(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        addresses = await job.start()
    except BaseException:
        await job.stop()
        raise
    exports = [config.export] + list(config.snapshots)
    for address in addresses:
        for name in exports:
            print(f"{READY_PREFIX} export={name} uri={address.nbd_uri(name)}",
                  flush=True)
    LOG.info("serving %s: %s", config.image, ", ".join(exports))
    # Stats are rewritten now and then so a reader need not stop us.
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            if config.stats_file:
                job.write_stats()
            job.flush_traces()
    LOG.info("stopping: flushing snapshots and saving the cache map")
    await job.stop()
    print("vmthunder: stopped", file=sys.stderr, flush=True)
    return 0
