"""An iSCSI LUN as the bottom layer, read with a userspace initiator.

:class:`IscsiSource` is the read-only :class:`~vmthunder.blockdev.
BlockDevice` on an :class:`~vmthunder.volume.iscsi_session.IscsiSession`:
widens unaligned reads to the LUN's block size, splits large ones, and can
check the LUN against the image's chunk manifest, read from a second LUN
of the same target (:mod:`vmthunder.volume.iscsi_manifest`).

The pieces, one job each:

* :mod:`vmthunder.volume.iscsi_url`: ``iscsi://`` URLs and portals;
* :mod:`vmthunder.volume.iscsi_session`: the session (login, commands in
  flight, reconnects to a restarted target);
* :mod:`vmthunder.volume.iscsi_manifest`: the manifest LUN;
* this module: the block device.

Errors are :class:`~vmthunder.blockdev.BlockError` (see the session's for
connections and SCSI errors); ``EINVAL`` for a LUN that disagrees with its
manifest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno

from vmthunder import blockdev
from vmthunder.blockdev import BlockError
from vmthunder.volume import manifest as manifest_mod
from vmthunder.volume.iscsi_manifest import read_manifest
from vmthunder.volume.iscsi_session import (DEFAULT_COMMAND_TIMEOUT,
                                            DEFAULT_MAX_INFLIGHT,
                                            DEFAULT_MAX_TRANSFER,
                                            DEFAULT_RECONNECT_TIMEOUT,
                                            DEFAULT_TIMEOUT, IscsiSession)
from vmthunder.volume.iscsi_url import (IscsiUrl, Portal, parse_iscsi_url,
                                        parse_portal)

# read() receives into reused buffers of at most this size, this many
# bytes of them kept.
MAX_POOLED_BUFFER = 4 << 20
MAX_POOLED_BYTES = 64 << 20


class IscsiSource(blockdev.BlockDevice):
    """A read-only block layer reading one iSCSI LUN.

    Open it with :meth:`open`. Unaligned reads are widened to the LUN's
    block size; reads larger than ``max_transfer`` are split into
    commands sent concurrently. With a manifest attached
    (``manifest_lun``), the size is the manifest's image size (tgtd may
    round a LUN up to whole blocks) and :meth:`identity` names the image
    content, so two exports of one image share a cache.
    """

    capabilities = blockdev.Capabilities(writable=False)

    def __init__(self, session: IscsiSession, url: IscsiUrl,
                 block_size: int, blocks: int, *,
                 max_transfer: int = DEFAULT_MAX_TRANSFER,
                 manifest: manifest_mod.Manifest | None = None):
        self.session = session
        self.url = url
        self.target = url.target
        self.lun = url.lun
        self.block_size = block_size
        self.blocks = blocks
        self.lun_size = block_size * blocks
        self.manifest = manifest
        self.size = manifest.size if manifest is not None else self.lun_size
        step = max(max_transfer - max_transfer % block_size, block_size)
        self.max_transfer = step
        self._bytes_read = 0
        self._reads = 0
        self._closed = False
        self._buffers: dict[int, list[bytearray]] = {}
        self._pooled = 0

    @classmethod
    async def open(cls, url: str | IscsiUrl, *,
                   password: str | None = None,
                   portals: tuple | list = (),
                   manifest_lun: int | None = None,
                   timeout: float = DEFAULT_TIMEOUT,
                   reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
                   max_inflight: int = DEFAULT_MAX_INFLIGHT,
                   max_transfer: int = DEFAULT_MAX_TRANSFER,
                   command_timeout: int = DEFAULT_COMMAND_TIMEOUT,
                   header_digest: str = "none-crc32c",
                   initiator_name: str | None = None) -> IscsiSource:
        """Log in, read the capacity (and the manifest), return the layer.

        ``url`` is ``iscsi://[user[%password]@]host[:port]/IQN/LUN``;
        ``password`` overrides the URL's (keep secrets out of process
        lists). The URL's portal is tried first, then ``portals``
        (``"host[:port]"`` strings or :class:`Portal`), in order, at
        connect and at every reconnect. ``timeout`` bounds the login;
        ``reconnect_timeout`` how long reads wait for a lost target.
        """
        if isinstance(url, str):
            url = parse_iscsi_url(url, password=password)
        elif password is not None:
            url = dataclasses.replace(url, password=password)
        all_portals = [url.portal] + [
            p if isinstance(p, Portal) else parse_portal(p)
            for p in portals]
        if manifest_lun is not None and manifest_lun == url.lun:
            raise ValueError(f"manifest LUN {manifest_lun} is the image "
                             "LUN itself")
        session = IscsiSession(
            url.target, all_portals, url.lun, username=url.username,
            password=url.password, timeout=timeout,
            reconnect_timeout=reconnect_timeout, max_inflight=max_inflight,
            command_timeout=command_timeout, header_digest=header_digest,
            initiator_name=initiator_name)
        await session.connect()
        try:
            block_size, blocks = await asyncio.wait_for(
                session.read_capacity(url.lun), timeout)
            session.set_block_size(url.lun, block_size, blocks)
            manifest = None
            if manifest_lun is not None:
                manifest = await asyncio.wait_for(
                    read_manifest(session, url.target, manifest_lun),
                    timeout)
                lun_size = block_size * blocks
                if not manifest.size <= lun_size < manifest.size + 512:
                    raise BlockError(
                        errno.EINVAL,
                        f"iSCSI LUN {url.target}/{url.lun}: LUN size "
                        f"{lun_size} disagrees with its manifest "
                        f"({manifest.size}, LUN {manifest_lun}); refusing "
                        "to serve it")
        except asyncio.TimeoutError:
            await session.close(0)
            raise BlockError(errno.ETIMEDOUT,
                             f"{session.describe()}: no answer within "
                             f"{timeout:g} s after login") from None
        except BaseException:
            await session.close(0)
            raise
        return cls(session, url, block_size, blocks,
                   max_transfer=max_transfer, manifest=manifest)

    def identity(self) -> str:
        if self.manifest is not None:
            return self.manifest.identity()
        return f"iscsi:{self.target}/{self.lun}:{self.lun_size}"

    def describe(self) -> str:
        return self.session.describe()

    def stats(self) -> dict:
        s = self.session.stats
        return {"bytes_read": self._bytes_read, "reads": self._reads,
                "commands": s["commands"], "reconnects": s["reconnects"],
                "retries": s["retries"], "reissued": s["reissued"],
                "in_flight": self.session.in_flight}

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        bs = self.block_size
        start = offset - offset % bs
        stop = -(-(offset + length) // bs) * bs
        buf = self._get_buffer(stop - start)
        view = memoryview(buf)
        await self._read_blocks(start, view, offset, length)
        # Only a read that finished puts its buffer back: after an error
        # or a cancellation the target may still be writing into it.
        data = bytes(view[offset - start:offset - start + length])
        view.release()
        self._put_buffer(buf)
        return data

    def _get_buffer(self, size: int) -> bytearray:
        """A receive buffer; reused, since fresh memory costs a page
        fault per 4 KiB (more than the copy out of it)."""
        free = self._buffers.get(size)
        if free:
            self._pooled -= size
            return free.pop()
        return bytearray(size)

    def _put_buffer(self, buf: bytearray) -> None:
        size = len(buf)
        if size <= MAX_POOLED_BUFFER and \
                self._pooled + size <= MAX_POOLED_BYTES:
            self._buffers.setdefault(size, []).append(buf)
            self._pooled += size

    async def read_into(self, offset: int, buffer) -> None:
        """Fill ``buffer`` (a writable bytearray or memoryview of one)
        from ``offset``; aligned ranges land there with no copy."""
        view = memoryview(buffer).cast("B")
        length = view.nbytes
        self.check_range(offset, length)
        if length == 0:
            return
        bs = self.block_size
        if offset % bs == 0 and length % bs == 0:
            await self._read_blocks(offset, view, offset, length)
            return
        view[:] = await self.read(offset, length)

    async def _read_blocks(self, start: int, view: memoryview,
                           offset: int, length: int) -> None:
        if self._closed:
            raise BlockError(errno.EIO, f"{self.describe()} is closed")
        bs = self.block_size
        total = view.nbytes
        step = self.max_transfer
        aws = []
        for pos in range(0, total, step):
            n = min(step, total - pos)
            aws.append(self.session.read_into(
                self.lun, (start + pos) // bs, view[pos:pos + n],
                f"read at offset {start + pos} length {n}"))
        self._reads += 1
        if len(aws) == 1:
            await aws[0]
        else:
            await asyncio.gather(*aws)
        self._bytes_read += length

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffers.clear()
            self._pooled = 0
            await self.session.close()
