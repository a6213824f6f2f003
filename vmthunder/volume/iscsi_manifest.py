"""The image's chunk manifest, read from a LUN of the image's target.

The origin's convention: the image is LUN 1, its manifest LUN 2.
:func:`read_manifest` reads the manifest's header and page digests at
attach and, for a version 2 manifest, the digest table lazily, only for
the chunks this host fetches (a version 1 manifest is read whole).
Errors are :class:`~vmthunder.blockdev.BlockError` with ``EINVAL``.
"""

from __future__ import annotations

import asyncio
import errno

from vmthunder.blockdev import BlockError
from vmthunder.volume import manifest as manifest_mod
from vmthunder.volume.iscsi_session import DEFAULT_MAX_TRANSFER, IscsiSession

# A manifest LUN larger than this is refused (a 1 TiB image with 64 KiB
# chunks has a 1.1 GB manifest; nothing sane is larger).
MAX_MANIFEST_BYTES = 1 << 30
# A header that does not parse is read this many times in all, this far
# apart, before the manifest is refused (see read_header).
HEADER_READS = 3
HEADER_REREAD_S = 0.2


async def read_manifest(session: IscsiSession, target: str,
                        lun: int) -> manifest_mod.Manifest:
    """The manifest on ``lun``: its header and page digests now and,
    for a version 2 manifest, the digest table lazily (only the pieces of
    the chunks this host fetches); a version 1 manifest is read whole."""
    where = f"manifest LUN {lun} of iSCSI target {target}"
    try:
        block_size, blocks = await session.read_capacity(lun)
    except BlockError as exc:
        raise BlockError(errno.EINVAL, f"cannot read the {where}: {exc}") \
            from None
    size = block_size * blocks
    if size > MAX_MANIFEST_BYTES:
        raise BlockError(errno.EINVAL, f"{where} is {size} bytes; a "
                         f"manifest is at most {MAX_MANIFEST_BYTES}")
    session.set_block_size(lun, block_size, blocks)

    async def read_lun(offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the LUN, widened to whole
        blocks and split into commands of at most DEFAULT_MAX_TRANSFER."""
        stop = min(offset + length, size)
        start = offset - offset % block_size
        end = -(-stop // block_size) * block_size
        buf = bytearray(end - start)
        view = memoryview(buf)
        step = max(DEFAULT_MAX_TRANSFER - DEFAULT_MAX_TRANSFER % block_size,
                   block_size)
        await asyncio.gather(*(
            session.read_into(lun, (start + pos) // block_size,
                              view[pos:pos + min(step, len(buf) - pos)],
                              f"{where} at offset {start + pos}")
            for pos in range(0, len(buf), step)))
        return bytes(view[offset - start:stop - start])

    async def read_header() -> dict | None:
        for attempt in range(HEADER_READS):
            block = await read_lun(0, min(size, manifest_mod.HEADER_BYTES))
            try:
                return manifest_mod.parse_header(block, where)
            except manifest_mod.ManifestError:
                if attempt == HEADER_READS - 1:
                    raise
                # `vmthunder trace publish` rewrites the header block in
                # place (tgtd keeps the file open): a read can catch it
                # half written. Read again a moment later.
                await asyncio.sleep(HEADER_REREAD_S)

    try:
        head = await read_header()
        if head is None:
            return manifest_mod.Manifest.from_bytes(await read_lun(0, size),
                                                    where=where)
        table_offset = head["table_offset"]
        if table_offset + head["table_bytes"] > size:
            raise manifest_mod.ManifestError(
                f"{where} is {size} bytes, too short for its digest table "
                f"({head['table_bytes']} bytes at {table_offset})")
        pages = await read_lun(head["pages_offset"], head["pages_bytes"])
        return manifest_mod.Manifest.lazy(
            head, pages, lambda off, n: read_lun(table_offset + off, n),
            where=where)
    except manifest_mod.ManifestError as exc:
        raise BlockError(errno.EINVAL, str(exc)) from None
