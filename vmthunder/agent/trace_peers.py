"""Recorded boot traces between peers: served read-only by the agent's
peer NBD server, fetched and checked by the others.

Peers learn of a recorded trace from the membership capabilities, which
carry only a small entry per image (agent/membership.py: the image's
key, the trace's chunk count and sha256 digest), never the trace. Its
bytes (agent/recorded_trace.py's encoding) are an extra export of the
peer NBD server named IMAGE + SUFFIX: '@' is in no image name
(agent/service.py check_name), so it never clashes with an image's
export (nor with its digest table's, IMAGE@digests).

A fetched trace is used only if it matches the digest its entry gives
and passes recorded_trace.decode()'s checks; anything else is an error
for that fetch (the VM boots without prefetch), never the VM's.
"""

from __future__ import annotations

import asyncio
import errno

from vmthunder import blockdev
from vmthunder.agent import recorded_trace as rt
from vmthunder.nbd.address import parse_address

SUFFIX = "@boot-trace"


def export_name(image: str) -> str:
    return image + SUFFIX


class RecordedTraceDevice(blockdev.BlockDevice):
    """A recorded trace's bytes (padded to sectors) as a read-only
    device."""

    def __init__(self, trace: rt.RecordedTrace, image: str):
        self._data = trace.padded()
        self.size = len(self._data)
        self.image = image

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return self._data[offset:offset + length]

    def describe(self) -> str:
        return f"recorded boot trace of image {self.image}"


class PeerTraceError(blockdev.BlockError):
    """A peer's recorded trace could not be read, or was refused."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


async def fetch(endpoint: str, image: str, entry: dict, chunk_size: int,
                chunks: int, timeout: float) -> list[int]:
    """The chunk order of the recorded trace of ``image`` a peer at
    ``endpoint`` offers with capability ``entry`` ({"chunks", "digest"}),
    checked; PeerTraceError saying what was wrong."""
    from vmthunder.nbd.client import open_nbd
    from vmthunder.nbd.client_events import NbdError
    uri = parse_address(endpoint).nbd_uri(export_name(image))
    try:
        data = await asyncio.wait_for(_read_all(uri, open_nbd), timeout)
    except asyncio.TimeoutError:
        raise PeerTraceError(f"reading {uri} took over {timeout:g} s") \
            from None
    except (OSError, blockdev.BlockError, NbdError, ValueError) as exc:
        raise PeerTraceError(f"cannot read {uri}: {exc}") from None
    try:
        data = data[:rt.encoded_length(data)]
        if rt.digest(data) != entry["digest"]:
            raise rt.RecordedTraceError(
                "it does not match the digest its peer announced")
        order = await asyncio.to_thread(rt.decode, data, chunk_size, chunks)
    except rt.RecordedTraceError as exc:
        raise PeerTraceError(f"{uri} refused: {exc}") from None
    if len(order) != entry["chunks"]:
        raise PeerTraceError(f"{uri} refused: {len(order)} chunks, its "
                             f"peer announced {entry['chunks']}")
    return order


async def _read_all(uri: str, open_nbd) -> bytes:
    client = await open_nbd(uri)
    try:
        size = client.size
        if size > rt.MAX_BYTES + rt.SECTOR:
            raise PeerTraceError(f"{uri} has {size} bytes; a recorded "
                                 f"trace has at most {rt.MAX_BYTES}")
        step = max(rt.SECTOR, min(client.max_request or size, 1 << 20))
        pieces = [await client.read(pos, min(step, size - pos))
                  for pos in range(0, size, step)]
    finally:
        await client.close()
    return b"".join(pieces)
