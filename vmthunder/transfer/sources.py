"""Sources that are block devices of the project's own layers: a file or
block device, an NBD export, an iSCSI LUN or an export:NAME (opened
through vmthunder.stack, the one place origins are parsed and opened)."""

from __future__ import annotations

import asyncio
import os

from vmthunder import blockdev
from vmthunder import stack
from vmthunder.nbd import client as nbd_client
from vmthunder.transfer.base import Extent, Source, ThreadJobs, file_path
from vmthunder.transfer.errors import SourceError

_ZERO = blockdev.STATE_ZERO


class BlockSource(Source):
    """A :class:`~vmthunder.blockdev.BlockDevice` as a source: extents
    from its base:allocation block status (ranges it says read as zeros
    are holes), reads through its read()."""

    device: blockdev.BlockDevice | None = None

    async def open_device(self) -> blockdev.BlockDevice:
        raise NotImplementedError

    async def open(self) -> None:
        self.device = await self.open_device()
        self.size = self.device.size
        self.manifest = self.device.manifest

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self.device.capabilities.block_status:
            return [Extent(offset, length, True)]
        out: list[Extent] = []
        pos = offset
        for ext in await self.device.block_status(
                offset, length, blockdev.BASE_ALLOCATION):
            data = not ext.flags & _ZERO
            if out and out[-1].data == data:
                last = out.pop()
                out.append(Extent(last.offset, last.length + ext.length,
                                  data))
            else:
                out.append(Extent(pos, ext.length, data))
            pos += ext.length
        return out

    async def read(self, offset: int, length: int):
        data = await self.device.read(offset, length)
        self.bytes_read += length
        return data

    async def read_into(self, offset: int, view: memoryview) -> None:
        await self.device.read_into(offset, view)
        self.bytes_read += view.nbytes

    async def close(self) -> None:
        if self.device is not None:
            device, self.device = self.device, None
            await device.close()


def _preadv_full(fd: int, view: memoryview, offset: int) -> int:
    """preadv until ``view`` is full or EOF; the bytes read."""
    got = 0
    while got < view.nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class FileSource(BlockSource):
    """A raw file or block device (PATH or file:///PATH); holes from
    SEEK_DATA/SEEK_HOLE. The stack's file source checks and sizes it;
    the copy reads it through a descriptor of its own, in worker
    threads, straight into the engine's buffers."""

    zero_copy = True
    _fd: int | None = None

    def __init__(self, uri: str, options: dict):
        super().__init__(uri, options)
        self._jobs = ThreadJobs()

    async def open_device(self):
        try:
            path = file_path(self.uri)
        except ValueError as exc:
            raise SourceError(self.uri, str(exc)) from None
        device = await stack.open_source(stack.Origin("file", path))
        try:
            self._fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC
                               | os.O_NONBLOCK)
        except BaseException:
            await device.close()
            raise
        return device

    async def read_into(self, offset: int, view: memoryview) -> None:
        got = await self._jobs.run(_preadv_full, self._fd, view, offset)
        if got != view.nbytes:
            raise SourceError(self.describe(), f"the file is shorter than "
                              f"its size when the copy began ({self.size} "
                              f"bytes): {got} of {view.nbytes} bytes at "
                              f"offset {offset}; was it truncated?")
        self.bytes_read += got

    async def close(self) -> None:
        await self._jobs.drain()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        await super().close()

    def describe(self) -> str:
        try:
            return file_path(self.uri)
        except ValueError:
            return self.uri


class NbdSource(BlockSource):
    """nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; holes
    from base:allocation when the server offers it."""

    request_size = 4 << 20
    max_in_flight = 8

    zero_copy = True

    async def open_device(self):
        try:
            nbd_client.parse_nbd_uri(self.uri)
        except ValueError as exc:
            raise SourceError(self.uri, str(exc)) from None
        return await nbd_client.NbdSource.open(
            self.uri, meta_contexts=(blockdev.BASE_ALLOCATION,),
            timeout=self.options.get("timeout") or
            nbd_client.DEFAULT_TIMEOUT)

    async def read_into(self, offset: int, view: memoryview) -> None:
        """Replies land in ``view`` straight from the socket, one request
        per ``max_request`` bytes (unaligned ranges are read and copied)."""
        client = self.device.client
        align = client.min_block
        length = view.nbytes
        if offset % align or (length % align
                              and offset + length != self.size):
            view[:] = await self.device.read(offset, length)
        else:
            step = client.max_request - client.max_request % align
            await asyncio.gather(*(
                client.read_into(offset + pos, view[pos:pos + step])
                for pos in range(0, length, step)))
        self.bytes_read += length


class StackSource(BlockSource):
    """iscsi://, export:NAME or cinder://VOLUME_ID through
    vmthunder.stack: the userspace initiator (or os-brick, as [iscsi]
    attach says), CHAP from the URL or [iscsi] chap_* (from the
    attachment for cinder://), the chunk manifest from the manifest LUN
    (the manifest volume): every chunk read is checked against it."""

    request_size = 2 << 20
    max_in_flight = 8

    async def open_device(self):
        try:
            origin = stack.Origin.parse(self.uri)
        except stack.OriginError as exc:
            raise SourceError(self.describe(), str(exc)) from None
        conf = load_config(self.options)
        exports = None
        if origin.kind == "export":
            from vmthunder.volume import export as export_mod
            exports = export_mod.ExportConfig.from_conf(conf.export)
        return await stack.open_source(origin, conf.iscsi, exports,
                                       getattr(conf, "cinder", None))


def load_config(options: dict):
    """The oslo.config options the stack needs: ``config`` (a ConfigOpts
    with vmthunder's options registered and loaded, as the CLI has), else
    ``config_file`` or /etc/vmthunder/vmthunder.conf when it exists."""
    conf = options.get("config")
    if conf is not None:
        return conf
    from oslo_config import cfg
    from vmthunder import opts
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], project="vmthunder",
         default_config_files=opts.config_files(
             options.get("config_file"), "vmthunder"))
    return conf
