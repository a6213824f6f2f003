"""A boot trace an agent recorded itself: its encoding, its checks, its
file.

Where an image's export published no boot trace, the agent records the
first boot of the image on this host (agent/trace_recording.py) as the
image's chunk indices in first-touch order, and offers them to peers.
Only offsets of the shared base image are in it: no data, nothing of a
VM's writes. The encoding is compact, binary, little-endian::

    magic      8 bytes  b"VMTRACE1"
    chunk_size u32      the image's chunk size
    chunks     u64      the image's chunk count
    runs       u32      how many runs follow
    runs x (first u64, count u32)   consecutive chunks, in trace order

A reader checks everything (:func:`decode`): a recorded trace may come
from any peer, so a malformed one, one of another geometry, one naming
a chunk outside the image or twice, or longer than MAX_REQUESTS chunks
(published_trace.py's bound) is refused. What a wrong trace that passes
costs is bounded by the prefetch window (agent/prefetch.py).

Files: one per image content (its identity, hashed), under the agent's
state directory, written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import struct

from vmthunder.volume.published_trace import MAX_REQUESTS

MAGIC = b"VMTRACE1"
_HEADER = struct.Struct("<8sIQI")
_RUN = struct.Struct("<QI")
HEADER_BYTES = _HEADER.size
# The largest valid encoding: every chunk its own run.
MAX_BYTES = HEADER_BYTES + MAX_REQUESTS * _RUN.size
# Served to peers padded to whole sectors.
SECTOR = 512


class RecordedTraceError(ValueError):
    """A recorded trace that is malformed or not one of this image."""


def image_key(identity: str) -> str:
    """A short name of an image's content (its cache identity, e.g. the
    manifest's): equal on every host holding the same image, and names
    no path or URL of this host."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def runs_of(order: list[int]) -> list[tuple[int, int]]:
    """``order`` as (first, count) runs of consecutive chunks."""
    runs: list[list[int]] = []
    for i in order:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


def encode(order: list[int], chunk_size: int, chunks: int) -> bytes:
    runs = runs_of(order)
    return _HEADER.pack(MAGIC, chunk_size, chunks, len(runs)) + b"".join(
        _RUN.pack(a, n) for a, n in runs)


def encoded_length(head: bytes) -> int:
    """The length of the encoding whose first HEADER_BYTES are ``head``
    (what follows, e.g. sector padding, is not part of it)."""
    if len(head) < HEADER_BYTES:
        raise RecordedTraceError(f"a recorded trace has at least "
                                 f"{HEADER_BYTES} bytes, this one "
                                 f"{len(head)}")
    magic, _, _, nruns = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise RecordedTraceError(f"not a recorded trace (starts with "
                                 f"{magic!r}, expected {MAGIC!r})")
    if nruns > MAX_REQUESTS:
        raise RecordedTraceError(f"a recorded trace of {nruns} runs; at "
                                 f"most {MAX_REQUESTS}")
    return HEADER_BYTES + nruns * _RUN.size


def decode(data: bytes, chunk_size: int, chunks: int) -> list[int]:
    """The chunk order of an encoded recorded trace of an image of
    ``chunks`` chunks of ``chunk_size`` bytes; RecordedTraceError saying
    what is wrong."""
    if len(data) > MAX_BYTES:
        raise RecordedTraceError(f"a recorded trace of {len(data)} bytes; "
                                 f"at most {MAX_BYTES}")
    length = encoded_length(data)
    if len(data) != length:
        raise RecordedTraceError(f"a recorded trace of {len(data)} bytes; "
                                 f"its header says {length}")
    _, cs, n, nruns = _HEADER.unpack_from(data)
    if (cs, n) != (chunk_size, chunks):
        raise RecordedTraceError(
            f"a recorded trace of an image of {n} chunks of {cs} bytes; "
            f"this image has {chunks} chunks of {chunk_size} bytes")
    order: list[int] = []
    seen: set[int] = set()
    for k in range(nruns):
        first, count = _RUN.unpack_from(data, HEADER_BYTES + k * _RUN.size)
        if count == 0 or first + count > chunks:
            raise RecordedTraceError(
                f"run {k} of a recorded trace (chunks {first} to "
                f"{first + count - 1}) is empty or outside the image "
                f"({chunks} chunks)")
        if len(order) + count > MAX_REQUESTS:
            raise RecordedTraceError(f"a recorded trace of more than "
                                     f"{MAX_REQUESTS} chunks")
        run = range(first, first + count)
        if not seen.isdisjoint(run):
            raise RecordedTraceError(f"run {k} of a recorded trace names "
                                     "a chunk a second time")
        seen.update(run)
        order.extend(run)
    return order


@dataclasses.dataclass(frozen=True)
class RecordedTrace:
    """A recorded trace of one image: its encoding, chunk count and
    digest (what peers are told of it)."""

    key: str                    # image_key() of the image
    data: bytes
    chunks: int

    @functools.cached_property
    def digest(self) -> str:
        # Asked at every announce and status: hashed once.
        return digest(self.data)

    def padded(self) -> bytes:
        return self.data + b"\0" * (-len(self.data) % SECTOR)


class TraceFiles:
    """Recorded traces on disk, one file per image key (blocking: the
    agent calls these in a thread)."""

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.trace")

    def load(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None

    def save(self, key: str, data: bytes) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = self.path(key)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
