"""The one interface every block layer implements.

A layer is a block device of fixed size with a small async interface; it
only calls the layer below it (the nbdkit filter model, QEMU's backing
chain). Sources sit at the bottom (a raw file, an iSCSI LUN, an NBD peer),
the copy-on-read cache and the per-VM copy-on-write snapshot stack on top,
and the NBD server exports whatever layer is on top.

Errors a layer raises are :class:`BlockError` with an errno the NBD server
puts on the wire, so a failure reaches the one client whose request failed
and never the daemon.
"""

from __future__ import annotations

import abc
import dataclasses
import errno

# Context names layers answer in block_status(); the NBD server exposes them
# as meta contexts.
BASE_ALLOCATION = "base:allocation"
VMTHUNDER_CACHE = "vmthunder:cache"

# base:allocation states (the NBD values, so no translation is needed).
STATE_HOLE = 1
STATE_ZERO = 2
# vmthunder:cache state: the range is held in the local cache.
STATE_CACHED = 1
# ...with STATE_CACHED: not held yet but being fetched; a read waits for it
# (peer exports, vmthunder/p2p/export.py).
STATE_FETCHING = 2


def joined(parts: list):
    """One bytes-like object from read_parts() pieces (no copy for one)."""
    return parts[0] if len(parts) == 1 else b"".join(parts)


class BlockError(Exception):
    """An I/O request failed; ``errno`` says how (EIO, EINVAL, EPERM...)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


@dataclasses.dataclass(frozen=True)
class Capabilities:
    writable: bool = False
    # The layer answers block_status() with more than "all data".
    block_status: bool = False
    # Contexts block_status() answers; base:allocation always works.
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)


@dataclasses.dataclass(frozen=True)
class Extent:
    length: int
    flags: int


class BlockDevice(abc.ABC):
    """A fixed-size block device with an async interface.

    Offsets and lengths are in bytes and need no alignment; callers keep
    requests inside ``[0, size)`` (the NBD server checks this before a
    request reaches a layer, and layers check again with
    :meth:`check_range`).
    """

    size: int
    capabilities: Capabilities = Capabilities()
    # The chunk manifest covering this device's bytes (an exported image
    # read from its origin), or None: a cache above checks every chunk it
    # fetches against it (vmthunder/stack.py).
    manifest = None

    def identity(self) -> str | None:
        """A name of this device's content that changes whenever the
        content does: caches are kept per identity. None: it has none,
        and it cannot be cached."""
        return None

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``."""

    async def read_parts(self, offset: int, length: int) -> list:
        """Like :meth:`read`, as bytes-like pieces in order, not joined.

        The NBD server sends the pieces as they are, so a read spanning
        several chunks costs no copy to glue them together. Layers that
        assemble reads from pieces override this and derive read() from
        it.
        """
        return [await self.read(offset, length)]

    def read_now(self, offset: int, length: int):
        """The ``length`` bytes at ``offset`` if they can be had at once,
        without waiting for anything (data in the page cache); else None.

        The NBD server's fast path for small reads: a layer that answers
        here spares the request a coroutine per layer. None (the default)
        means "use read_parts()", which must give the same bytes; a layer
        counts a read it answers here as it counts read_parts().
        """
        return None

    async def read_into(self, offset: int, buffer) -> None:
        """Fill ``buffer`` (a writable bytes-like object) from ``offset``.

        The default copies a read() into it; sources that can receive
        straight into the caller's memory (iSCSI) override this.
        """
        view = memoryview(buffer).cast("B")
        view[:] = await self.read(offset, view.nbytes)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise BlockError(errno.EPERM, f"{self.describe()} is read-only")

    async def write_zeroes(self, offset: int, length: int,
                           fua: bool = False) -> None:
        raise BlockError(errno.EPERM, f"{self.describe()} is read-only")

    async def trim(self, offset: int, length: int) -> None:
        """Discard a range; a read-only layer ignores it (trim is advice)."""

    async def flush(self) -> None:
        """Make completed writes durable."""

    async def block_status(self, offset: int, length: int,
                           context: str = BASE_ALLOCATION) -> list[Extent]:
        """Extents covering ``[offset, offset+length)`` for ``context``.

        The default says "all data" for base:allocation, which is always
        true; layers that know better override it.
        """
        if context != BASE_ALLOCATION:
            raise BlockError(errno.EINVAL,
                             f"{self.describe()} has no context {context!r}")
        return [Extent(length, 0)]

    def local_extent(self, offset: int, length: int):
        """``(fd, file_offset)`` if the range can be sent from a file now.

        For zero-copy replies: a layer answers only when the whole range
        lies in one local file at ``file_offset`` and is in the page cache,
        so sendfile(2) on the event loop cannot wait for the disk, and when
        reading it through :meth:`read` would give the same bytes. None
        (the default) means "use read()".
        """
        return None

    async def close(self) -> None:
        """Release files and connections; idempotent."""

    def stats(self) -> dict:
        """Counters for status output and benchmarks."""
        return {}

    def describe(self) -> str:
        return type(self).__name__

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(
                errno.EINVAL,
                f"{self.describe()}: range offset={offset} length={length} "
                f"is outside the device (size {self.size})")
