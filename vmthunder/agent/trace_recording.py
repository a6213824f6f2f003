"""Boot traces recorded by the agent, where an image's export published
none, and shared with the peers.

At a VM's create on an image with no published trace, the agent's
prefetch (agent/prefetch.py) asks :meth:`BootTraces.order_for` for a
recorded trace: its own (recorded here before), else one a peer offers
for the same image content (same image key, agent/recorded_trace.py),
fetched and checked (agent/trace_peers.py). With none, it records that
VM's boot (:meth:`BootTraces.record`): the guest's reads of the image as
chunk indices in first-touch order, read off the VM's read watch. Reads
the VM's own overlay serves are the VM's data and are not recorded, nor
is anything of its writes: only offsets of the shared base image.

A recording stops when the guest read nothing for ``idle_s``
(``[agent] prefetch_idle_seconds``), when its VM is deleted or its image
detached, when the agent stops, or at MAX_REQUESTS chunks. It is then
written (in a thread, atomically) under the agent's state directory,
kept across restarts, served to peers, and announced in the membership
capabilities as one small entry (key, chunk count, digest). One
recording per image per host.

``[agent] record_boot_traces`` false: nothing recorded, nothing offered,
no peer's recorded trace used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from vmthunder.agent import recorded_trace as rt
from vmthunder.agent import trace_peers
from vmthunder.agent.errors import message_of
from vmthunder.cache.read_watch import ReadTap

LOG = logging.getLogger(__name__)

# Peers whose recorded trace of an image is tried, at most, per VM create.
MAX_PEERS_TRIED = 3
# A recording ends this long after its start even if the guest never
# idles: a boot trace is of the boot, and a guest that reads without
# pause (a busy service) would otherwise never offer one.
MAX_RECORDING_S = 300.0


class Recording:
    """The recording of VM ``vm``'s boot of an image (see the module
    doc): ``snapshot`` is the VM's SnapshotLayer, ``chunk_size`` and
    ``chunks`` the image cache's geometry; ``on_end(recording)`` is
    called once it stops."""

    def __init__(self, image: str, vm: str, snapshot, chunk_size: int,
                 chunks: int, idle_s: float, on_end,
                 cap: int = rt.MAX_REQUESTS,
                 max_s: float = MAX_RECORDING_S):
        self.image = image
        self.vm = vm
        # The image's key (recorded_trace.image_key): names its file.
        self.key = ""
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.idle_s = idle_s
        self.cap = cap
        self.order: list[int] = []
        self._seen: set[int] = set()
        # The VM's overlay: what it holds is the VM's data, not recorded.
        self._overlay_held = snapshot.map.all_present
        self._bs = snapshot.block_size
        self._on_end = on_end
        self.active = True
        self.stop_reason: str | None = None
        self._last = self._started = time.monotonic()
        self.max_s = max_s
        self._idle = asyncio.ensure_future(self._idle_watch())

    def watch(self, inner) -> ReadTap:
        """``inner`` (the snapshot's watch) with this recording looking
        on."""
        return ReadTap(inner, self.guest_read)

    def guest_read(self, offset: int, length: int) -> None:
        if not self.active or not length:
            return
        self._last = time.monotonic()
        cs, bs = self.chunk_size, self._bs
        end = offset + length
        for i in range(offset // cs, min((end - 1) // cs + 1, self.chunks)):
            if i in self._seen:
                continue
            lo, hi = max(offset, i * cs), min(end, (i + 1) * cs)
            if self._overlay_held(lo // bs, (hi - 1) // bs + 1):
                continue            # the VM's own data
            self._seen.add(i)
            self.order.append(i)
            if len(self.order) >= self.cap:
                self.finish(f"{self.cap} chunks recorded (the cap)")
                return

    async def _idle_watch(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._started + self.max_s:
                self.finish(f"recorded for {self.max_s:g} s (the longest "
                            "boot recorded)")
                return
            if now >= self._last + self.idle_s:
                self.finish(f"no guest read for {self.idle_s:g} s")
                return
            await asyncio.sleep(min(self._last + self.idle_s,
                                    self._started + self.max_s) - now)

    def finish(self, reason: str) -> None:
        """Stop recording (once); hands the recording to ``on_end``."""
        if not self.active:
            return
        self.active = False
        self.stop_reason = reason
        if self._idle is not asyncio.current_task():
            self._idle.cancel()
        self._seen = set()
        self._on_end(self)


class BootTraces:
    """The agent's recorded boot traces (see the module doc).

    ``state_dir``: the agent's state directory (traces go to its
    ``boot-traces``); ``peering``: the agent's Peering (its membership
    and peer NBD server; either may be absent); ``announce()``: tells the
    peers what this host offers (called when that changes)."""

    def __init__(self, state_dir: str, idle_s: float, peering, announce,
                 peer_timeout: float = 2.0):
        self.files = rt.TraceFiles(os.path.join(state_dir, "boot-traces"))
        self.idle_s = idle_s
        self.peering = peering
        self._announce = announce
        self.peer_timeout = peer_timeout
        self.recordings: dict[str, Recording] = {}
        self.recorded: dict[str, rt.RecordedTrace] = {}
        # image -> what its last prefetch used of a recorded trace, or
        # why it used none.
        self.used: dict[str, dict] = {}
        # image -> its key (recorded_trace.image_key), once attached.
        self.keys: dict[str, str] = {}
        self._saving: set[asyncio.Task] = set()
        self._stopping = False

    # -- images ------------------------------------------------------------

    async def image_attached(self, image) -> None:
        """Find this host's recorded trace of ``image`` (kept from an
        earlier boot) and offer it."""
        key = self.keys[image.name] = rt.image_key(image.cache.identity())
        try:
            data = await asyncio.to_thread(self.files.load, key)
            if data is None:
                return
            order = await asyncio.to_thread(
                rt.decode, data, image.cache.chunk_size, image.cache.chunks)
        except (OSError, rt.RecordedTraceError) as exc:
            LOG.warning("image %s: the recorded boot trace %s is not "
                        "used (%s); the next boot is recorded again",
                        image.name, self.files.path(key), exc)
            return
        self._offer(image.name, rt.RecordedTrace(key, data, len(order)))

    async def image_detached(self, name: str) -> None:
        recording = self.recordings.get(name)
        if recording is not None:
            recording.finish("image detached")
        await self._saved()
        self.recordings.pop(name, None)
        self.recorded.pop(name, None)
        self.used.pop(name, None)
        self.keys.pop(name, None)
        self._unexport(name)

    async def vm_deleted(self, image: str, vm: str) -> None:
        recording = self.recordings.get(image)
        if recording is not None and recording.vm == vm:
            recording.finish("its VM was deleted")

    async def stop(self) -> None:
        self._stopping = True
        for recording in list(self.recordings.values()):
            recording.finish("agent stopped")
        await self._saved()

    async def _saved(self) -> None:
        while self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)

    # -- what peers see ----------------------------------------------------

    def capabilities(self) -> dict:
        """{image: {"key", "chunks", "digest"}}: the small entries of the
        membership capabilities (never the traces)."""
        return {name: {"key": t.key, "chunks": t.chunks,
                       "digest": t.digest}
                for name, t in sorted(self.recorded.items())}

    def _offer(self, name: str, trace: rt.RecordedTrace) -> None:
        self.recorded[name] = trace
        self._unexport(name)
        server = self.peering.server if self.peering else None
        if server is not None:
            server.add_export(
                trace_peers.export_name(name),
                trace_peers.RecordedTraceDevice(trace, name),
                read_only=True,
                description=f"recorded boot trace of image {name}")

    def _unexport(self, name: str) -> None:
        server = self.peering.server if self.peering else None
        export = trace_peers.export_name(name)
        if server is not None and export in server.exports:
            server.remove_export(export)

    def exports(self) -> None:
        """Serve the traces recorded so far (the peer server started
        after the images were restored)."""
        for name, trace in list(self.recorded.items()):
            self._offer(name, trace)

    # -- recording ---------------------------------------------------------

    def record(self, image, vm: str, snapshot) -> bool:
        """Record VM ``vm``'s boot of ``image`` (its SnapshotLayer
        ``snapshot``), unless one is recorded or recording already."""
        if image.name in self.recordings or image.cache is None:
            return False
        key = rt.image_key(image.cache.identity())
        own = self.recorded.get(image.name)
        if own is not None and own.key == key:
            return False
        recording = Recording(image.name, vm, snapshot,
                              image.cache.chunk_size, image.cache.chunks,
                              self.idle_s, self._ended)
        recording.key = key
        self.recordings[image.name] = recording
        snapshot.watch = recording.watch(snapshot.watch)
        LOG.info("image %s: no boot trace published nor offered by a "
                 "peer; recording VM %s's boot (chunk offsets only)",
                 image.name, vm)
        return True

    def _ended(self, recording: Recording) -> None:
        task = asyncio.ensure_future(self._save(recording))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _save(self, recording: Recording) -> None:
        name = recording.image
        if not recording.order:
            LOG.info("image %s: recording of VM %s's boot stopped (%s) "
                     "with nothing read; the next boot is recorded",
                     name, recording.vm, recording.stop_reason)
            if self.recordings.get(name) is recording:
                del self.recordings[name]
            return
        data = await asyncio.to_thread(rt.encode, recording.order,
                                       recording.chunk_size,
                                       recording.chunks)
        try:
            await asyncio.to_thread(self.files.save, recording.key, data)
        except OSError as exc:
            LOG.warning("image %s: cannot keep the recorded boot trace "
                        "in %s (%s); it is offered until the agent stops",
                        name, self.files.directory, exc)
        if self.recordings.get(name) is not recording:
            return                  # detached meanwhile
        self.recordings.pop(name, None)
        self._offer(name, rt.RecordedTrace(recording.key, data,
                                           len(recording.order)))
        LOG.info("image %s: recorded VM %s's boot (%s): %d chunks, offered "
                 "to peers", name, recording.vm, recording.stop_reason,
                 len(recording.order))
        if not self._stopping:
            await self._announce()

    # -- using one ---------------------------------------------------------

    async def order_for(self, image) -> tuple[list[int], str] | None:
        """A recorded trace's chunk order for ``image`` and where it came
        from: this host's own recording, else a peer's of the same image
        content (checked); None when there is none (or every one offered
        was refused: logged, and noted in the status)."""
        cache = image.cache
        key = rt.image_key(cache.identity())
        self.used.pop(image.name, None)
        own = self.recorded.get(image.name)
        if own is not None and own.key == key:
            order = await asyncio.to_thread(rt.decode, own.data,
                                            cache.chunk_size, cache.chunks)
            self.used[image.name] = {"source": "recorded here",
                                     "chunks": len(order)}
            return order, "recorded here"
        offers = self._offers(image.name, key)
        errors = []
        for member, endpoint, entry in offers[:MAX_PEERS_TRIED]:
            try:
                order = await trace_peers.fetch(
                    endpoint, image.name, entry, cache.chunk_size,
                    cache.chunks, self.peer_timeout)
            except trace_peers.PeerTraceError as exc:
                LOG.warning("image %s: the boot trace peer %s recorded is "
                            "not used: %s", image.name, member, exc)
                errors.append(f"{member}: {message_of(exc)}")
                continue
            source = f"recorded by peer {member}"
            self.used[image.name] = {"source": source, "peer": member,
                                     "chunks": len(order)}
            return order, source
        if errors:
            self.used[image.name] = {"source": None,
                                     "refused": errors}
        return None

    def _offers(self, name: str, key: str | None) -> list[tuple]:
        """(member, endpoint, entry) of the peers offering a recorded
        trace of image ``name`` with key ``key`` (from the membership's
        snapshot: no I/O)."""
        membership = self.peering.membership if self.peering else None
        if membership is None or key is None:
            return []
        return [(member, info["endpoint"], info["traces"][name])
                for member, info in membership.members().items()
                if member != membership.member_id and info["endpoint"]
                and info.get("traces", {}).get(name, {}).get("key") == key]

    def status(self, name: str) -> dict | None:
        """The image's recorded trace for `vmthunder status`: being
        recorded (chunks so far), recorded here (chunks, digest), and
        what the last prefetch used of one."""
        out: dict = {}
        recording = self.recordings.get(name)
        trace = self.recorded.get(name)
        if recording is not None:
            out.update(state="recording", vm=recording.vm,
                       chunks=len(recording.order))
        elif trace is not None:
            out.update(state="recorded", chunks=trace.chunks,
                       digest=trace.digest)
        used = self.used.get(name)
        if used is not None:
            out["used"] = dict(used)
        offers = self._offers(name, self.keys.get(name))
        if offers:
            out["offered_by"] = [member for member, _, _ in offers]
        return out or None
