"""The agent: images with their shared caches, VMs with their snapshots.

Per host, every attached image has ONE CacheLayer over its source, shared
by all VMs of that image; every VM has a SnapshotLayer over its image's
cache, served writable to the hypervisor by one NbdServer under the VM's
name. Optionally a second NbdServer serves each image's cache read-only to
peer hosts under the image's name.

Every change is recorded in the state file (state.py) before it is
answered; on start the agent re-attaches the images and re-opens the VMs'
snapshots recorded there. Their data is found again on disk: a CacheLayer
reuses its directory for the same source identity, a SnapshotLayer reopens
its overlay and map.

Refusals are the errors of agent/errors.py (api.py gives each kind its
HTTP status), with a message that says what was wrong and what to do. A
refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import socket
import time

from vmthunder import blockdev
from vmthunder import stack
from vmthunder.process_stats import process_figures
from vmthunder.ratelimit import format_rate
from vmthunder.agent import capacity as capacity_mod
from vmthunder.agent import health as health_mod
from vmthunder.agent import precache as precache_mod
from vmthunder.agent import prefetch as prefetch_mod
from vmthunder.agent.peering import Peering
from vmthunder.agent import state as state_mod
from vmthunder.agent.trace_recording import BootTraces
from vmthunder.agent.errors import (
    AgentError, AgentFailure, Conflict, InvalidRequest, NotFound,
    OriginUnavailable, message_of)
from vmthunder.cache import snapshot as snapshot_mod
from vmthunder.cache.cache_layer import CacheInUse, CacheLayer
from vmthunder.cache.read_watch import ImageReads
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.nbd.address import Address
from vmthunder.nbd.server import NbdLimits, NbdServer
from vmthunder.p2p.digest_table import (
    PeerDigestTable)
from vmthunder.p2p.export import PeerExport
from vmthunder.p2p.volume import ImageVolume
from vmthunder.redaction import redact_url

LOG = logging.getLogger(__name__)

NAME_RULE = ("use 1-128 letters, digits, '.', '_' or '-', starting with a "
             "letter or digit")


# A VM disk (its snapshot's virtual size) may have at most this many
# snapshot blocks: the snapshot keeps one byte of memory per block, so the
# largest disk (1 TiB at the default 4 KiB blocks) costs 256 MiB.
MAX_VM_BLOCKS = 1 << 28


@dataclasses.dataclass
class AgentConfig:
    state_dir: str
    api_socket: str
    hypervisor_listen: Address
    cache: stack.CacheOptions
    peer_listen: Address | None = None
    block_size: int = 4096
    nbd_limits: NbdLimits = NbdLimits()
    # [iscsi] options and the [export] settings resolving export:NAME;
    # [cinder] options reaching cinder://VOLUME_ID.
    iscsi: object = None
    exports: object = None
    cinder: object = None
    # Peers (with peer_listen): "mesh" finds holders through the
    # coordination backend; "tree" reads only from peer_parent (the
    # original VMThunder topology); "off" reads only the origin.
    peer_mode: str = "mesh"
    peer_parent: str | None = None      # nbd://HOST:PORT of the parent
    peer_advertise: str | None = None   # nbd://HOST:PORT others use
    peer_timeout: float = 2.0
    peer_avoid_s: float = 30.0
    # Bytes per second sent to all peers together (0: no limit).
    peer_upload_rate: float = 0.0
    coordination: object = None         # [coordination] options
    # Prometheus metrics and /healthz over HTTP here (None: not served;
    # /healthz is on the API socket too).
    metrics_listen: Address | None = None
    # A guest read waiting this long is logged and counted (0: never).
    stalled_read_seconds: float = 10.0
    # /healthz fails below this much free space for caches and state.
    health_min_free_bytes: int = 0
    # Trace prefetch at VM create (agent/prefetch.py).
    prefetch: prefetch_mod.PrefetchOptions = prefetch_mod.PrefetchOptions()
    # [cache] max_bytes and its watermarks (agent/capacity.py).
    capacity: capacity_mod.CapacityConfig = dataclasses.field(
        default_factory=capacity_mod.CapacityConfig)


@dataclasses.dataclass
class Image:
    name: str
    origin: str
    cache: CacheLayer | None = None
    source: blockdev.BlockDevice | None = None
    # The origin and its peers behind one source, when peers are on.
    volume: ImageVolume | None = None
    # Its cache as peers see it (PeerExport), with peer_listen set.
    peer_export: PeerExport | None = None
    # Why the image is not usable (restore failed); None when attached.
    error: str | None = None
    attached_at: float = 0.0
    # The last precache of this image (running or ended); not recorded.
    precache: precache_mod.Precache | None = None
    # Its VMs' reads: latency, hits and misses, reads in progress.
    reads: ImageReads = dataclasses.field(default_factory=ImageReads)
    # Never evicted (agent/capacity.py); recorded.
    pinned: bool = False
    # Its cache directory, recorded once attached: while its origin is
    # down after a restart (no cache open) the pin still protects it.
    cache_dir: str | None = None

    def record(self) -> dict:
        rec = {"name": self.name, "origin": self.origin}
        if self.pinned:
            rec["pinned"] = True
        if self.cache_dir:
            rec["cache_dir"] = self.cache_dir
        return rec


@dataclasses.dataclass
class Vm:
    name: str
    image: str
    snapshot: SnapshotLayer | None = None
    error: str | None = None
    # The disk's virtual size in bytes, as asked at create; None: the
    # image's size.
    size: int | None = None

    def record(self) -> dict:
        rec = {"name": self.name, "image": self.image}
        if self.size is not None:
            rec["size"] = self.size
        return rec


def check_name(kind: str, name) -> str:
    """A VM or image name (a file name and an NBD export name)."""
    if not isinstance(name, str):
        raise InvalidRequest(f"{kind} name must be a string, got "
                             f"{type(name).__name__}; {NAME_RULE}")
    try:
        return snapshot_mod.check_name(name)
    except ValueError:
        raise InvalidRequest(f"{kind} name {name!r} is not valid: "
                             f"{NAME_RULE}") from None


def _cache_directories(image) -> set[str]:
    """The cache directories an attached image holds: its own, and its
    manifest's digest table's (p2p/digest_table.py)."""
    out = set()
    if image.cache is not None:
        out.add(image.cache.directory)
    table = image.volume.digest_table if image.volume is not None else None
    if table is not None:
        out.add(table.cache.directory)
    return out


def check_origin(origin) -> stack.Origin:
    """The origin parsed, or InvalidRequest saying what is accepted."""
    try:
        return stack.Origin.parse(origin, absolute=True)
    except stack.OriginError as exc:
        raise InvalidRequest(str(exc)) from None


def socket_in_use(path: str) -> bool:
    """True when something accepts connections on unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def prepare_socket_path(path: str, what: str) -> None:
    """Make the socket's directory; remove a stale socket, refuse a live
    one (another agent)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755,
                exist_ok=True)
    if os.path.exists(path) or os.path.islink(path):
        if socket_in_use(path):
            raise state_mod.StateError(
                f"{what} socket {path} is in use by another process (another "
                "vmthunder-agent?); stop it, or choose another path")
        os.unlink(path)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.store = state_mod.StateStore(config.state_dir)
        self.images: dict[str, Image] = {}
        self.vms: dict[str, Vm] = {}
        self.hypervisor_server = NbdServer(config.nbd_limits)
        self.hypervisor_address: Address = config.hypervisor_listen
        self.peering = Peering(config, prepare_socket_path)
        # Changes (attach, detach, create, delete) happen one at a time:
        # each ends with the state file written.
        self._lock = asyncio.Lock()
        self.started = time.monotonic()
        self.stall_watch = health_mod.StallWatch(
            self.images, config.stalled_read_seconds)
        # Boot traces recorded here and offered by peers, where exports
        # published none ([agent] record_boot_traces).
        self.boot_traces = BootTraces(
            config.state_dir, config.prefetch.idle_s, self.peering,
            self._announce, peer_timeout=config.peer_timeout) \
            if config.prefetch.record and config.prefetch.enabled else None
        self.prefetches = prefetch_mod.Prefetches(config.prefetch,
                                                  self.boot_traces)
        self.capacity = capacity_mod.Capacity(self, config.capacity,
                                              config.cache.directory)
        self.health = health_mod.Health(
            self, min_free_bytes=config.health_min_free_bytes)

    # -- start and stop ---------------------------------------------------

    async def start(self) -> None:
        """Lock the state, join the peers, restore images and VMs, then
        serve NBD.

        The API (api.py) is started by the caller once this returns.
        """
        self.store.lock()
        await self.peering.start_membership()
        await self.restore()
        listen = self.config.hypervisor_listen
        if listen.kind == "unix":
            prepare_socket_path(listen.path, "hypervisor NBD")
        elif listen.port == 0:
            LOG.warning("hypervisor_listen %s picks a new port at every "
                        "start: VMs' NBD URIs will not survive a restart; "
                        "configure a fixed port", listen)
        self.hypervisor_address = await self.hypervisor_server.listen(listen)
        await self.peering.start_server(self.images.values())
        if self.boot_traces is not None:
            self.boot_traces.exports()
        await self._announce()
        self.stall_watch.start()
        self.capacity.start()

    async def stop(self) -> None:
        """Stop serving, flush and close every snapshot and cache, write
        the state (unchanged by a stop: the VMs come back at next start)."""
        await self.hypervisor_server.close()
        await self.capacity.stop()
        await self.stall_watch.stop()
        await self.prefetches.stop()
        await self.peering.stop()
        for image in self.images.values():
            if image.precache is not None:
                await image.precache.cancel()
        for vm in self.vms.values():
            if vm.snapshot is not None:
                try:
                    await vm.snapshot.close()
                except Exception as exc:      # keep closing the others
                    LOG.error("VM %s: closing its snapshot: %s", vm.name, exc)
                vm.snapshot = None
        for image in self.images.values():
            if image.cache is not None:
                try:
                    await image.cache.close()
                except Exception as exc:
                    LOG.error("image %s: closing its cache: %s", image.name,
                              exc)
                image.cache = None
        if self.store.locked:
            self._save()
            self.store.unlock()

    async def restore(self) -> None:
        """Re-attach the images and re-open the VMs of the state file.

        An image that cannot be attached now (origin unreachable) stays
        recorded, shown with its error; attaching it again with the same
        origin retries, and brings its VMs back.
        """
        state = self.store.load()
        if state["images"] or state["vms"]:
            LOG.info("restoring %d image(s) and %d VM(s) from %s",
                     len(state["images"]), len(state["vms"]),
                     self.store.path)
        self.capacity.restoring = {rec["image"] for rec in state["vms"]}
        for rec in state["images"]:
            image = Image(rec["name"], rec["origin"],
                          pinned=rec.get("pinned", False),
                          cache_dir=rec.get("cache_dir"))
            self.images[image.name] = image
            try:
                await self._open_image(image)
            except Exception as exc:
                image.error = message_of(exc)
                LOG.error("restore: image %s from %s not attached: %s",
                          image.name, redact_url(image.origin), image.error)
            else:
                LOG.info("restore: image %s attached from %s (%d of %d "
                         "chunks cached)", image.name,
                         redact_url(image.origin),
                         image.cache.map.count_present(), image.cache.chunks)
        for rec in state["vms"]:
            vm = Vm(rec["name"], rec["image"], size=rec.get("size"))
            self.vms[vm.name] = vm
            self._reopen_vm(vm)

    def _reopen_vm(self, vm: Vm) -> None:
        image = self.images.get(vm.image)
        if image is None or image.cache is None:
            vm.error = (f"its image {vm.image!r} is not attached"
                        + (f" ({image.error})" if image and image.error
                           else ""))
            LOG.error("restore: VM %s not restored: %s", vm.name, vm.error)
            return
        try:
            vm.snapshot = self._open_snapshot(image, vm.name, vm.size)
        except Exception as exc:
            vm.error = message_of(exc)
            LOG.error("restore: VM %s not restored: %s", vm.name, vm.error)
            return
        vm.error = None
        self._export_vm(vm)
        LOG.info("restore: VM %s on image %s (%d blocks written)",
                 vm.name, vm.image, vm.snapshot.map.count_present())

    # -- sources, caches, exports ------------------------------------------

    async def open_image_source(self, name: str, origin: str
                                ) -> blockdev.BlockDevice:
        """What an image's cache reads: its origin (vmthunder/stack.py),
        behind an ImageVolume that also reads peers when they are on and
        the origin has a manifest (it checks every chunk itself, whoever
        sent it)."""
        source = await stack.open_source(check_origin(origin),
                                         self.config.iscsi,
                                         self.config.exports,
                                         self.config.cinder)
        manifest = source.manifest
        if manifest is None or not self.peering.enabled:
            if self.peering.enabled:
                LOG.warning("image %s: origin %s has no manifest: it is "
                            "read from the origin only (chunks from peers "
                            "could not be checked)", name,
                            redact_url(origin))
            return source
        options = dict(peer_timeout=self.config.peer_timeout,
                       avoid_s=self.config.peer_avoid_s,
                       mode=self.config.peer_mode)
        volume = ImageVolume(source, manifest, name,
                             self.peering.directory(), **options)
        if manifest.lazy_loading:
            # Its digests come through peers too (a lazily read manifest:
            # see p2p/digest_table.py).
            try:
                volume.digest_table = PeerDigestTable(
                    manifest, name, self.peering.directory(),
                    self.config.cache.directory, **options)
            except BaseException:
                await source.close()
                raise
        return volume

    # -- peers ------------------------------------------------------------

    async def _announce(self) -> None:
        await self.peering.announce(
            (n for n, i in self.images.items() if i.cache is not None),
            self.boot_traces.capabilities() if self.boot_traces else None)

    async def _open_image(self, image: Image) -> None:
        source = await self.open_image_source(image.name, image.origin)
        volume = source if isinstance(source, ImageVolume) else None
        image.cache = await stack.open_cache(
            source, self.config.cache, checks_itself=volume is not None)
        image.source = source
        image.volume = volume
        image.cache_dir = image.cache.directory
        image.error = None
        image.attached_at = time.time()
        self.peering.export(image)
        self.capacity.attached(image)
        if self.boot_traces is not None:
            await self.boot_traces.image_attached(image)

    def _snapshot_dir(self, image: Image) -> str:
        return stack.snapshot_dir(image.cache)

    def _open_snapshot(self, image: Image, name: str,
                       size: int | None = None) -> SnapshotLayer:
        snap = stack.open_snapshot(image.cache, name,
                                   block_size=self.config.block_size,
                                   size=size)
        snap.watch = self.capacity.watch(name, image, snap)
        return snap

    @property
    def max_vm_size(self) -> int:
        return MAX_VM_BLOCKS * self.config.block_size

    def _check_vm_size(self, size) -> int | None:
        """A VM's disk size as asked (bytes, an integer; None: the image's
        size); InvalidRequest naming what is wrong."""
        if size is None:
            return None
        if isinstance(size, bool) or not isinstance(size, int):
            raise InvalidRequest(f"VM size must be an integer number of "
                                 f"bytes, not {type(size).__name__} "
                                 f"{size!r}; e.g. 21474836480 for 20 GiB, "
                                  "or no size for a disk the size of the "
                                  "image")
        if size <= 0:
            raise InvalidRequest(f"VM size {size} is not positive; give "
                                  "the disk size in bytes (at least the "
                                  "image's), or no size")
        if size > self.max_vm_size:
            raise InvalidRequest(
                f"VM size {size} bytes is above this agent's limit of "
                f"{self.max_vm_size} bytes ({MAX_VM_BLOCKS} snapshot blocks "
                f"of {self.config.block_size} bytes: a snapshot keeps one "
                "byte of memory per block; a larger [snapshot] block_size "
                "raises the limit)")
        return size

    def _export_vm(self, vm: Vm) -> None:
        self.hypervisor_server.add_export(
            vm.name, vm.snapshot, read_only=False,
            description=f"VM {vm.name} on image {vm.image}")

    def _save(self) -> None:
        self.store.save([i.record() for i in self.images.values()],
                        [v.record() for v in self.vms.values()])

    # -- API operations ---------------------------------------------------

    async def attach_image(self, name, origin) -> tuple[dict, bool]:
        """Attach ``origin`` as image ``name``; (info, created).

        The same name and origin again is a no-op (or a retry, when the
        image is in error); another origin under a known name is refused.
        """
        check_name("image", name)
        check_origin(origin)
        async with self._lock:
            image = self.images.get(name)
            if image is not None and image.origin != origin:
                raise Conflict(
                    f"image {name!r} is already attached from "
                    f"{redact_url(image.origin)}, not {redact_url(origin)}; "
                    "detach it first (DELETE /images/NAME, `vmthunder image "
                    f"detach {name}`) or attach under another name")
            if image is not None and image.cache is not None:
                return self.image_info(image), False
            for other in self.images.values():
                if other.origin == origin and other.name != name:
                    raise Conflict(
                        f"origin {redact_url(origin)} is already "
                        f"attached as image {other.name!r}; use that name "
                        "(one cache per image per host)")
            retry = image is not None
            image = image or Image(name, origin)
            try:
                await self._open_image(image)
            except AgentError:
                raise
            except CacheInUse as exc:
                # The same content under another origin (two export
                # names of one image): one cache per content and host.
                same = [o for o in self.images.values()
                        if exc.directory in _cache_directories(o)]
                if same:
                    raise Conflict(
                        f"cannot attach image {name!r}: origin "
                        f"{redact_url(origin)} holds the same content as "
                        f"image {same[0].name!r} (attached from "
                        f"{redact_url(same[0].origin)}), and a host keeps "
                        "one cache per content; use that name") from None
                raise Conflict(f"cannot attach image {name!r}: "
                               f"{exc}") from None
            except (ValueError, blockdev.BlockError, OSError) as exc:
                bad_input = isinstance(exc, ValueError) or getattr(
                    exc, "errno", None) in (errno.ENOENT, errno.EISDIR,
                                            errno.EACCES, errno.EINVAL)
                raise (InvalidRequest if bad_input else OriginUnavailable)(
                    f"cannot attach image {name!r} from {redact_url(origin)}: "
                    f"{message_of(exc)}") from None
            self.images[name] = image
            try:
                self._save()
            except OSError as exc:
                if not retry:
                    del self.images[name]
                    self.peering.unexport(image)
                    await image.cache.close()
                    image.cache = None
                raise AgentFailure(f"cannot record image {name!r} in "
                                   f"{self.store.path}: {exc}") from None
            LOG.info("image %s attached from %s: %s, %d of %d chunks cached",
                     name, redact_url(origin), image.cache.directory,
                     image.cache.map.count_present(), image.cache.chunks)
            if retry:
                for vm in self.vms.values():
                    if vm.image == name and vm.snapshot is None:
                        self._reopen_vm(vm)
            await self._announce()
            return self.image_info(image), True

    async def detach_image(self, name: str) -> dict:
        check_name("image", name)
        async with self._lock:
            image = self._image(name)
            users = sorted(v.name for v in self.vms.values()
                           if v.image == name)
            if users:
                raise Conflict(
                    f"image {name!r} is in use by VM(s) "
                    f"{', '.join(users)}; delete them first (DELETE "
                    "/vms/NAME, `vmthunder vm delete NAME`)")
            del self.images[name]
            try:
                self._save()
            except OSError as exc:
                self.images[name] = image
                raise AgentFailure(f"cannot record the detach in "
                                   f"{self.store.path}: {exc}") from None
            self.peering.unexport(image)
            if image.precache is not None:
                await image.precache.cancel()
            await self.prefetches.image_detached(name)
            if image.cache is not None:
                await image.cache.close()
                image.cache = None
            self.capacity.detached(name)
            LOG.info("image %s detached (its cache stays on disk for a "
                     "later attach)", name)
            await self._announce()
            return {"name": name, "detached": True}

    async def create_vm(self, name, image_name, size=None) -> dict:
        """Create VM ``name``'s disk on ``image_name``: ``size`` bytes
        (at least the image's; None: the image's size)."""
        check_name("VM", name)
        check_name("image", image_name)
        size = self._check_vm_size(size)
        async with self._lock:
            if name in self.vms:
                raise Conflict(
                    f"VM {name!r} exists already (on image "
                    f"{self.vms[name].image!r}); pick another name, or "
                    "delete it first")
            image = self.images.get(image_name)
            if image is None:
                raise NotFound(
                    f"image {image_name!r} is not attached (404: no "
                    "such image); attach it first with POST /images "
                    f"(`vmthunder image attach {image_name} ORIGIN`)")
            if image.cache is None:
                raise Conflict(
                    f"image {image_name!r} is recorded but not attached "
                    f"(409: {image.error}); attach it again with the same "
                    "origin to retry")
            if size is not None and size < image.cache.size:
                raise InvalidRequest(
                    f"VM size {size} bytes is smaller than image "
                    f"{image_name!r} ({image.cache.size} bytes); give at "
                    "least the image's size, or no size for a disk the "
                    "size of the image")
            # A new VM starts from the image: leftovers of an earlier VM of
            # that name (deleted while the agent was down) go.
            for path in snapshot_mod.remove_files(self._snapshot_dir(image),
                                                  name):
                LOG.warning("VM %s: removed stale %s", name, path)
            try:
                snap = self._open_snapshot(image, name, size)
            except (ValueError, blockdev.BlockError, OSError) as exc:
                raise AgentFailure(f"cannot create the snapshot of VM "
                                   f"{name!r}: {message_of(exc)}") from None
            vm = Vm(name, image_name, snap, size=size)
            self.vms[name] = vm
            try:
                self._save()
            except OSError as exc:
                del self.vms[name]
                await snap.delete()
                raise AgentFailure(f"cannot record VM {name!r} in "
                                   f"{self.store.path}: {exc}") from None
            self._export_vm(vm)
            self.prefetches.vm_created(image, name, snap)
            LOG.info("VM %s created on image %s: %s", name, image_name,
                     self.vm_uri(name))
            return self.vm_info(vm)

    async def delete_vm(self, name: str) -> dict:
        check_name("VM", name)
        async with self._lock:
            vm = self.vms.get(name)
            if vm is None:
                raise NotFound(f"no VM {name!r}; GET /vms (`vmthunder "
                                      "vm list`) lists the VMs")
            del self.vms[name]
            try:
                self._save()
            except OSError as exc:
                self.vms[name] = vm
                raise AgentFailure(f"cannot record the delete in "
                                   f"{self.store.path}: {exc}") from None
            if name in self.hypervisor_server.exports:
                self.hypervisor_server.remove_export(name)
            await self.prefetches.vm_deleted(vm.image, name)
            if vm.snapshot is not None:
                await vm.snapshot.delete()
            else:
                image = self.images.get(vm.image)
                if image is not None and image.cache is not None:
                    snapshot_mod.remove_files(self._snapshot_dir(image),
                                              name)
            LOG.info("VM %s deleted (its snapshot files removed)", name)
            return {"name": name, "deleted": True}

    async def precache(self, image_name, trace_path=None) -> tuple[dict,
                                                                   bool]:
        """Start warming image ``image_name``'s cache in the background:
        the whole image in chunk order, or the chunks a boot trace read,
        in trace order; (progress, started).

        While one runs, asking again starts nothing and answers its
        progress (started False). A refused request changes nothing.
        """
        check_name("image", image_name)
        image = self._attached(image_name)
        if image.precache is not None and image.precache.running:
            return image.precache.progress(), False
        trace_runs = None
        if trace_path is not None:
            trace_runs = await self._trace_chunks(image, trace_path)
        async with self._lock:
            # The image may have gone or changed while the trace loaded.
            image = self._attached(image_name)
            if image.precache is not None and image.precache.running:
                return image.precache.progress(), False
            cache = image.cache
            if trace_runs is None:
                order = list(range(cache.chunks))
            else:
                # Checked run by run: a trace may claim a read of an
                # exabyte, which must not be listed chunk by chunk.
                beyond = [(max(first, cache.chunks), end)
                          for first, end in trace_runs if end > cache.chunks]
                if beyond:
                    raise InvalidRequest(
                        f"trace {trace_path} reads chunk(s) "
                        f"{_run_list(beyond)} of {cache.chunk_size} bytes, "
                        f"beyond image {image_name!r} ({cache.size} bytes, "
                        f"{cache.chunks} chunks); is it a trace of this "
                        "image?")
                order = []
                for first, end in trace_runs:
                    order.extend(range(first, end))
            # [agent] background_fetch_rate: one bucket with the trace
            # prefetches'.
            run = precache_mod.Precache(
                image.name, image.cache, order, trace_path,
                rate_limit=self.prefetches.rate_limit)
            image.precache = run
            run.start()
            LOG.info("image %s: precache started%s: %d chunk(s) to fetch "
                     "(%d bytes) of %d selected", image_name,
                     f" from trace {trace_path}" if trace_path else "",
                     run.chunks_total, run.bytes_total, run.chunks_selected)
            return run.progress(), True

    async def _trace_chunks(self, image: Image, path) -> list[tuple]:
        """The chunks (of ``image``'s cache) trace ``path`` reads, in
        first-touch order, as runs (first, end); InvalidRequest naming
        what is wrong. The file is read and parsed in a thread, within
        the limits of agent/precache.py (a regular file only)."""
        if not isinstance(path, str) or not path:
            raise InvalidRequest("trace must be the absolute path of a "
                                  "trace file (or null for the whole image)")
        if not os.path.isabs(path):
            raise InvalidRequest(f"trace {path!r} is a relative path; give "
                                  "an absolute path (the agent does not run "
                                  "in your working directory)")
        try:
            return await precache_mod.trace_chunk_runs(
                path, image.cache.chunk_size)
        except precache_mod.TraceError as exc:
            raise InvalidRequest(f"cannot precache image {image.name!r} "
                                 f"from trace: {exc}") from None

    def _attached(self, name: str) -> Image:
        image = self._image(name)
        if image.cache is None:
            raise Conflict(
                f"image {name!r} is recorded but not attached (409: "
                f"{image.error}); attach it again with the same origin to "
                "retry")
        return image

    def image_detail(self, image_name: str) -> dict:
        """GET /images/NAME: the image's status (counters, precache)."""
        check_name("image", image_name)
        return self.image_status(self._image(image_name))

    def precache_progress(self, image_name: str) -> dict:
        check_name("image", image_name)
        image = self._image(image_name)
        if image.precache is None:
            raise NotFound(f"image {image_name!r} was never "
                                  "precached since it was attached; start "
                                  "with POST /images/NAME/precache "
                           f"(`vmthunder precache {image_name}`)")
        return image.precache.progress()

    # -- views -------------------------------------------------------------

    def _image(self, name: str) -> Image:
        image = self.images.get(name)
        if image is None:
            raise NotFound(f"no image {name!r} is attached; GET "
                                  "/images (`vmthunder image list`) lists "
                                  "them")
        return image

    def vm_uri(self, name: str) -> str:
        return self.hypervisor_address.nbd_uri(name)

    def image_info(self, image: Image) -> dict:
        info = {"name": image.name, "origin": redact_url(image.origin),
                "state": "attached" if image.cache else "error",
                "pinned": image.pinned,
                "vms": sorted(v.name for v in self.vms.values()
                              if v.image == image.name)}
        if image.cache is not None:
            info.update(size=image.cache.size,
                        chunk_size=image.cache.chunk_size,
                        cache_dir=image.cache.directory)
            if self.peering.address is not None:
                info["peer_nbd"] = self.peering.address.nbd_uri(image.name)
        else:
            info["error"] = image.error
        return info

    def vm_info(self, vm: Vm) -> dict:
        info = {"name": vm.name, "image": vm.image,
                "state": "ready" if vm.snapshot else "error"}
        if vm.snapshot is not None:
            info["nbd"] = self.vm_uri(vm.name)
            # The disk's virtual size (the image's unless asked larger).
            info["size"] = vm.snapshot.size
        else:
            info["error"] = vm.error
            if vm.size is not None:
                info["size"] = vm.size
        return info

    def list_images(self) -> list[dict]:
        return [self.image_info(i) for i in self.images.values()]

    def list_vms(self) -> list[dict]:
        return [self.vm_info(v) for v in self.vms.values()]

    def image_status(self, image: Image) -> dict:
        status = self.image_info(image)
        if image.cache is None:
            return status
        cache = image.cache.stats()
        source = image.cache.source.stats()
        peer = {}
        if self.peering.server is not None:
            device = self.peering.export_device(image)
            if device is not image.cache:
                peer = device.stats()
        status.update(
            chunks_held=cache["chunks_present"],
            chunks_total=cache["chunks"],
            bytes_fetched=cache["bytes_fetched"],
            # A peer-aware source reports these apart; a plain origin's
            # bytes read all came from the origin.
            bytes_from_origin=source.get("bytes_from_origin",
                                         source.get("bytes_read", 0)),
            bytes_from_peers=source.get("bytes_from_peers", 0),
            bytes_served_to_peers=peer.get("bytes_served", 0),
            # Peers' reads of owned chunks in flight that waited for the
            # fetch to reach the volume (p2p/export.py).
            peer_reads_waiting=peer.get("waits_for_owned", 0),
            # Peer health as the image's source sees it: failures by kind
            # (timeout, mismatch, io, not_held) and peers avoided now.
            peer_errors=source.get("peer_errors", {}),
            peers_avoided=source.get("avoided", []),
            # Fetches by where they went (origin, owner, peer, parent;
            # p2p/volume.py fetch_latency): how many, their chunks, their
            # seconds and, of those, the wait for the chunks' digests.
            **_fetch_figures(source.get("fetch_latency") or {}),
            bytes_read=cache["bytes_read"],
            verify_errors=cache["verify_errors"],
            fetch_errors=cache["fetch_errors"],
            # Chunks that did not match the manifest, by where they came
            # from (the cache checks them over a plain origin, the image's
            # volume when peers are on).
            verify_failures={
                "origin": cache["verify_errors"]
                + source.get("origin_mismatches", 0),
                "peer": source.get("peer_errors", {}).get("mismatch", 0)},
            cache_bytes=_held_bytes(image.cache),
            chunks_fetched=cache["chunks_fetched"],
            store_errors=cache["store_errors"],
            chunks_evicted=cache["chunks_evicted"],
            chunks_not_kept=cache["chunks_not_kept"],
            prefetch=self.prefetches.status(image.name),
            # A boot trace recorded here (recording, recorded) and what
            # the last prefetch used of one (agent/trace_recording.py).
            boot_trace=self.boot_traces.status(image.name)
            if self.boot_traces else None,
            precache=image.precache.progress() if image.precache
            else None)
        in_flight, queued = image.cache.fetch_counts()
        status.update(fetches_in_flight=in_flight, fetches_queued=queued,
                      **image.reads.stats())
        origin = image.volume.origin if image.volume else image.cache.source
        try:
            status["origin_io"] = {k: v for k, v in origin.stats().items()
                                   if isinstance(v, (int, float))}
        except Exception:             # a closed or odd source: no numbers
            status["origin_io"] = {}
        table = image.volume.digest_table if image.volume else None
        if table is not None:
            # The manifest's digests, fetched through peers like the image.
            status["digest_table"] = table.stats()
        return status

    def vm_status(self, vm: Vm) -> dict:
        status = self.vm_info(vm)
        if vm.snapshot is not None:
            s = vm.snapshot.stats()
            status.update(bytes_read=s["bytes_read"],
                          bytes_written=s["bytes_written"],
                          blocks_written=s["blocks_written"],
                          block_size=s["block_size"],
                          flushes=s["flushes"])
        return status

    def background_fetch_stats(self) -> dict:
        """What precache and trace prefetch fetched under their shared
        limit ([agent] background_fetch_rate): ``rate`` bytes/s (0:
        none), ``bytes`` let through, ``wait_s`` time waited for it,
        summed over their reads."""
        limit = self.prefetches.rate_limit
        return {"rate": limit.rate if limit else 0,
                "limit": format_rate(limit.rate if limit else 0),
                "bytes": limit.bytes if limit else 0,
                "wait_s": round(limit.waited, 3) if limit else 0.0}

    def status(self) -> dict:
        membership = self.peering.membership
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "process": process_figures(),
            "state_file": self.store.path,
            "hypervisor_nbd": str(self.hypervisor_address),
            "peer_nbd": str(self.peering.address) if self.peering.address
            else None,
            "stalled_read_seconds": self.config.stalled_read_seconds,
            "stalled_reads_now": self.stall_watch.stalled_now(),
            "cache_capacity": self.capacity.summary(),
            "peer_upload": self.peering.upload_stats(),
            "background_fetch": self.background_fetch_stats(),
            "coordination": None if membership is None else {
                "backend": redact_url(membership.backend_url),
                "healthy": membership.healthy,
                "last_error": membership.last_error,
                "members": len(membership.members())},
            "images": {i.name: self.image_status(i)
                       for i in self.images.values()},
            "vms": {v.name: self.vm_status(v) for v in self.vms.values()},
        }


def _fetch_figures(latency: dict) -> dict:
    """An image volume's fetch_latency as the status's counters by
    source (one dict per figure, as peer_errors)."""
    return {"fetches": {k: v["fetches"] for k, v in latency.items()},
            "fetch_chunks": {k: v["chunks"] for k, v in latency.items()},
            "fetch_seconds": {k: v["seconds"] for k, v in latency.items()},
            "fetch_digest_wait_seconds": {
                k: v["digest_wait_s"] for k, v in latency.items()}}


def _held_bytes(cache: CacheLayer) -> int:
    """Bytes of the image its cache holds (marked chunks; the last chunk
    may be short)."""
    held = cache.map.count_present()
    if held and cache.map.present(cache.chunks - 1):
        return held * cache.chunk_size - (cache.chunks * cache.chunk_size
                                          - cache.size)
    return held * cache.chunk_size


def _run_list(runs: list[tuple[int, int]], most: int = 5) -> str:
    """The first ``most`` chunks of ``runs`` ((first, end) each) and how
    many more, without listing them all (a run may be huge)."""
    shown = []
    for first, end in runs:
        shown.extend(range(first, min(end, first + most - len(shown))))
        if len(shown) >= most:
            break
    more = sum(end - first for first, end in runs) - len(shown)
    return ", ".join(map(str, shown)) + (f" (and {more} more)" if more
                                         else "")
