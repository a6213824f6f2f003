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

from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdServer
from vmthunder.volume.file_source import FileSource

LOG = logging.getLogger(__name__)

# The line `vmthunder serve` prints once it accepts connections; other
# programs (vmthunder boot, tests) wait for it.
READY_PREFIX = "vmthunder: ready"


@dataclasses.dataclass
class ServeConfig:
    image: str
    listen: Address
    cache_dir: str
    export: str
    snapshots: list[str]
    chunk_size: int
    block_size: int
    max_pending_writes: int
    max_request: int
    max_inflight: int
    read_only: bool = False
    stats_file: str | None = None


def open_source(image: str):
    """The bottom layer for IMAGE; later sources (iscsi://) plug in here."""
    return FileSource(image)


class ServeJob:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.cache: CacheLayer | None = None
        self.snapshots: dict[str, SnapshotLayer] = {}
        self.server: NbdServer | None = None
        self.started = time.monotonic()

    async def start(self) -> list[Address]:
        cfg = self.config
        source = open_source(cfg.image)
        self.cache = CacheLayer(source, cfg.cache_dir,
                                chunk_size=cfg.chunk_size,
                                max_pending_writes=cfg.max_pending_writes)
        self.server = NbdServer(max_request=cfg.max_request,
                                max_inflight=cfg.max_inflight)
        self.server.add_export(cfg.export, self.cache, read_only=True,
                               description=f"cache of {cfg.image}")
        snap_dir = os.path.join(self.cache.directory, "snapshots")
        for name in cfg.snapshots:
            if name == cfg.export:
                raise ValueError(f"snapshot name {name!r} is also the export "
                                 "name of the shared cache; pick another")
            snap = SnapshotLayer(self.cache, snap_dir, name,
                                 block_size=cfg.block_size)
            self.snapshots[name] = snap
            self.server.add_export(name, snap, read_only=cfg.read_only,
                                   description=f"VM {name} on {cfg.image}")
        # The empty name (what `nbd://host:port` asks for) is the single
        # snapshot when there is one, else the shared cache.
        self.server.default_export = (cfg.snapshots[0]
                                      if len(cfg.snapshots) == 1
                                      else cfg.export)
        bound = await self.server.listen(cfg.listen)
        return [bound]

    def stats(self) -> dict:
        return {
            "image": self.config.image,
            "image_size": self.cache.size if self.cache else None,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "cache": self.cache.stats() if self.cache else {},
            "source": self.cache.source.stats() if self.cache else {},
            "snapshots": {n: s.stats() for n, s in self.snapshots.items()},
        }

    def write_stats(self) -> None:
        if not self.config.stats_file:
            return
        tmp = self.config.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f, indent=1)
        os.replace(tmp, self.config.stats_file)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        for snap in self.snapshots.values():
            await snap.close()
        if self.cache is not None:
            await self.cache.close()
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
    LOG.info("stopping: flushing snapshots and saving the cache map")
    await job.stop()
    print("vmthunder: stopped", file=sys.stderr, flush=True)
    return 0
