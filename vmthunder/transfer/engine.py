"""The copy loop every transfer runs, whatever its drivers.

    extents ──▶ pieces (in order) ──▶ N workers: read ─ verify ─ write
                                            └──▶ ordered hasher

- Several requests in flight (``max_in_flight`` workers, pieces of
  ``request_size`` bytes; a streaming source is read in order, its
  writes and hashing still overlap).
- Holes the source reports (NBD base:allocation, SEEK_DATA/SEEK_HOLE) are
  neither read nor written, and blocks of zeros in what is read are not
  written (``detect_zeroes``): a fresh destination stays sparse; one that
  is not fresh (an NBD export) gets write-zeroes there.
- Every chunk is checked against the source's manifest before it is
  written; the whole image is hashed in order (holes as zeros) for the
  result's digest and checked against the source's whole-image hash,
  before anything is committed.
- An optional rate limit on bytes read; progress that only grows.
- Any failure or a cancel aborts the destination (its temporary file
  removed) and raises a TransferError naming the side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time

from vmthunder import blockdev
from vmthunder.ratelimit import RateLimit
from vmthunder.transfer.base import MiB, Destination, Extent, Source, strerror
from vmthunder.volume.manifest import ChunkMismatch
from vmthunder.transfer.errors import (DestinationError, SourceError,
                                       TransferCancelled, TransferError,
                                       VerificationError)

try:
    import blake3
except ImportError:                  # requirements.txt has it
    blake3 = None
# numpy (with matplotlib) finds zero blocks; imported on first use, so
# a process whose copies never look for zeros (the agent's precache) does
# not carry it.
np = None
_numpy_tried = False


def _numpy():
    global np, _numpy_tried
    if not _numpy_tried:
        _numpy_tried = True
        try:
            import numpy
        except ImportError:
            numpy = None
        np = numpy
    return np

LOG = logging.getLogger(__name__)

ZERO_BLOCK = 4096
# Block status asked this much at a time.
EXTENT_WINDOW = 1 << 30
# Hashing and chunk checks of pieces this large leave the event loop.
_THREAD_FROM = 256 * 1024
_ZEROES = memoryview(bytes(4 * MiB))

DEFAULT_DIGEST = "blake3" if blake3 is not None else "sha256"


def new_hash(algorithm: str):
    """A hash object for ``algorithm`` (blake3, or any hashlib name)."""
    if algorithm == "blake3":
        if blake3 is None:
            raise ValueError("digest blake3 needs the blake3 package")
        return blake3.blake3()
    try:
        return hashlib.new(algorithm)
    except (ValueError, TypeError):
        raise ValueError(f"unknown digest algorithm {algorithm!r} (blake3, "
                         "sha256, sha512, md5...)") from None


@contextlib.contextmanager
def blame(error, where: str):
    """Word any failure inside as ``error`` (SourceError or
    DestinationError) at ``where``; TransferErrors and cancellation pass
    unchanged."""
    try:
        yield
    except TransferError:
        raise
    except blockdev.BlockError as exc:
        raise error(where, strerror(exc)) from exc
    except (OSError, ValueError, EOFError, RuntimeError,
            asyncio.TimeoutError) as exc:
        reason = strerror(exc)
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            reason = "timed out"
        raise error(where, reason) from exc


_ZERO_BYTES: dict[int, bytes] = {}


def _all_zero(data, n: int) -> bool:
    """``data`` (bytes or bytearray of ``n`` bytes) is all zeros: one
    memcmp against a cached zero buffer."""
    zero = _ZERO_BYTES.get(n)
    if zero is None:
        if len(_ZERO_BYTES) > 8:
            _ZERO_BYTES.clear()
        zero = _ZERO_BYTES[n] = bytes(n)
    return data == zero


def data_runs(data, block: int = ZERO_BLOCK) -> list[tuple[int, int]]:
    """``(start, end)`` runs of ``data`` (bytes or bytearray) holding
    non-zero bytes, at ``block`` granularity (blocks of zeros left out).
    Vectorised with numpy when it is there (10 GB/s), else a loop."""
    n = len(data)
    if _all_zero(data, n):
        return []
    full = n // block
    np = _numpy()
    if np is not None and block % 8 == 0:
        arr = np.frombuffer(data, dtype=np.uint8)
        nonzero = np.empty(full + (n % block > 0), dtype=bool)
        nonzero[:full] = arr[:full * block].view(np.uint64).reshape(
            full, block // 8).any(axis=1)
        if n % block:
            nonzero[full] = arr[full * block:].any()
        if nonzero.all():
            return [(0, n)]
        edges = np.diff(np.concatenate(([False], nonzero, [False]))
                        .astype(np.int8))
        return [(int(a) * block, min(int(b) * block, n)) for a, b in zip(
            np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]
    view = memoryview(data)
    zero = _ZEROES[:block]
    runs = []
    start = None
    for pos in range(0, n, block):
        end = min(pos + block, n)
        if view[pos:end] == zero[:end - pos]:
            if start is not None:
                runs.append((start, pos))
                start = None
        elif start is None:
            start = pos
    if start is not None:
        runs.append((start, n))
    return runs


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a copy is. ``done`` of ``total`` bytes are finished (data
    written, holes and zeros skipped) and only ever grows; ``copied``
    bytes were read from the source, ``skipped`` were holes it reported;
    ``rate`` is ``done`` per second so far, ``data_rate`` ``copied`` per
    second. ``stage`` is "opening", a source's own preparation (e.g.
    "precache" on the agent, with ``stage_done``/``stage_total`` bytes),
    "copying", "committing", or the end: "done", "failed", "cancelled"."""

    done: int
    total: int
    copied: int
    skipped: int
    elapsed: float
    rate: float
    data_rate: float
    by_source: dict
    stage: str
    stage_done: int = 0
    stage_total: int = 0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished copy. ``bytes_copied`` were read from the source (holes
    it reported are not), ``bytes_written`` written (blocks of zeros are
    not), ``by_source`` where the bytes came from; ``digest`` is
    ``"ALGORITHM:HEX"`` of the whole image written (holes as zeros), and
    ``verified`` names what the source's digests checked ("manifest",
    "sha512 os_hash_value"...), None when it offered none."""

    source: str
    destination: str
    size: int
    bytes_copied: int
    bytes_written: int
    bytes_skipped: int
    seconds: float
    by_source: dict
    digest: str | None
    verified: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Item:
    seq: int
    offset: int
    length: int
    data: bool
    buffer: bytearray | None = None     # from the pool, given back after


class _BufferPool:
    """Read buffers reused from piece to piece (fresh memory costs a
    page fault per 4 KiB, more than the copy into it)."""

    def __init__(self, most: int):
        self.free: dict[int, list[bytearray]] = {}
        self.most = most

    def get(self, size: int) -> bytearray:
        free = self.free.get(size)
        return free.pop() if free else bytearray(size)

    def put(self, buffer: bytearray | None) -> None:
        if buffer is None:
            return
        free = self.free.setdefault(len(buffer), [])
        if len(free) < self.most:
            free.append(buffer)


class _OrderedHasher:
    """Hashes pieces in offset order whatever order they finish in; each
    piece hashed frees a place in the window."""

    def __init__(self, algorithm: str, window: asyncio.Semaphore):
        self.algorithm = algorithm
        self.hash = new_hash(algorithm)
        self.window = window
        self.ready: dict[int, tuple] = {}
        self.next = 0
        self.end: int | None = None       # number of pieces, once known
        self._wake = asyncio.Event()

    def put(self, seq: int, data, length: int, done=None) -> None:
        """Piece ``seq``: ``data`` (None: ``length`` zeros); ``done()``
        is called once it is hashed."""
        self.ready[seq] = (data, length, done)
        self._wake.set()

    def finish(self, count: int) -> None:
        self.end = count
        self._wake.set()

    def _update_zeroes(self, length: int) -> None:
        while length:
            n = min(length, _ZEROES.nbytes)
            self.hash.update(_ZEROES[:n])
            length -= n

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.end is None or self.next < self.end:
            if self.next not in self.ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            data, length, done = self.ready.pop(self.next)
            if data is None:
                if length >= _THREAD_FROM:
                    await loop.run_in_executor(None, self._update_zeroes,
                                               length)
                else:
                    self._update_zeroes(length)
            elif length >= _THREAD_FROM:
                await loop.run_in_executor(None, self.hash.update, data)
            else:
                self.hash.update(data)
            self.next += 1
            if done is not None:
                done()
            self.window.release()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def _check_chunks(manifest, first: int, data) -> None:
    """Raise ChunkMismatch (the first chunk that fails) unless the whole
    chunks of ``data`` from chunk ``first`` on match the manifest (a
    volume.manifest.Manifest, checking the run in one call)."""
    failed = manifest.verify_run(first, memoryview(data).cast("B"))
    if failed:
        raise failed[min(failed)]


class Copy:
    """One copy from ``source`` to ``destination`` (drivers not opened
    yet). :meth:`run` does it all and returns a :class:`Result`, or raises
    a TransferError after aborting the destination."""

    def __init__(self, source: Source, destination: Destination, *,
                 max_in_flight: int | None = None,
                 request_size: int | None = None,
                 rate_limit: float | RateLimit | None = None,
                 digest: str | None = DEFAULT_DIGEST,
                 detect_zeroes: bool = True):
        self.source = source
        self.dest = destination
        self.src_where = source.describe()
        self.dst_where = destination.describe()
        self._max_in_flight = max_in_flight
        self._request_size = request_size
        # A RateLimit is shared (the agent's one bucket for background
        # fetches); a number is this copy's own limit.
        self.limit = rate_limit if isinstance(rate_limit, RateLimit) \
            else RateLimit(rate_limit) if rate_limit else None
        if digest is not None:
            new_hash(digest)                  # unknown names fail now
        self.digest_algorithm = digest
        self.detect_zeroes = detect_zeroes
        self.size = 0
        self.done = 0
        self.copied = 0
        self.written = 0
        self.skipped = 0
        self.stage = "opening"
        self.stage_done = 0
        self.stage_total = 0
        self.t0 = time.monotonic()
        self.t1: float | None = None
        self._reported_done = 0

    # -- progress ------------------------------------------------------

    def _stage_report(self, stage: str, done: int, total: int) -> None:
        self.stage_done = max(self.stage_done, done) \
            if stage == self.stage else done
        self.stage = stage
        self.stage_total = total

    def progress(self) -> Progress:
        elapsed = (self.t1 or time.monotonic()) - self.t0
        done = max(self.done, self._reported_done)
        self._reported_done = done
        try:
            by_source = dict(self.source.bytes_by_source())
        except Exception:               # a half-open source: no figures
            by_source = {}
        return Progress(
            done=done, total=self.size, copied=self.copied,
            skipped=self.skipped, elapsed=round(elapsed, 3),
            rate=done / elapsed if elapsed > 0 else 0.0,
            data_rate=self.copied / elapsed if elapsed > 0 else 0.0,
            by_source=by_source, stage=self.stage,
            stage_done=self.stage_done, stage_total=self.stage_total)

    # -- the copy --------------------------------------------------------

    async def run(self) -> Result:
        self.t0 = time.monotonic()
        opened_dest = False
        try:
            with blame(SourceError, self.src_where):
                await self.source.open()
                self.size = self.source.size
                await self.source.prepare(self._stage_report)
            with blame(DestinationError, self.dst_where):
                opened_dest = True
                await self.dest.open(self.size)
            self.stage = "copying"
            digest = await self._copy()
            self.stage = "committing"
            with blame(DestinationError, self.dst_where):
                await self.dest.commit()
        except BaseException as exc:
            self.stage = ("cancelled" if isinstance(
                exc, (asyncio.CancelledError, TransferCancelled))
                else "failed")
            if opened_dest:
                await self._abort()
            await self._close()
            self.t1 = time.monotonic()
            if isinstance(exc, (TransferError, asyncio.CancelledError)):
                raise
            raise TransferError(None, f"internal error: {exc!r}") from exc
        await self._close()
        self.t1 = time.monotonic()
        self.stage = "done"
        verified = None
        if self.source.manifest is not None:
            verified = "manifest"
        if self.source.whole_digest is not None:
            verified = (f"{verified} and " if verified else "") + \
                f"{self.source.whole_digest[0]} of the whole image"
        return Result(
            source=self.src_where, destination=self.dst_where,
            size=self.size, bytes_copied=self.copied,
            bytes_written=self.written, bytes_skipped=self.skipped,
            seconds=round(self.t1 - self.t0, 6),
            by_source=dict(self.source.bytes_by_source()),
            digest=digest, verified=verified)

    async def _abort(self) -> None:
        try:
            await asyncio.shield(self.dest.abort())
        except asyncio.CancelledError:
            pass
        except Exception as exc:       # the first error is the one to say
            LOG.error("%s: cleaning up after a failed copy: %s",
                      self.dst_where, strerror(exc))

    async def _close(self) -> None:
        for close, where in ((self.source.close, self.src_where),
                             (self.dest.close, self.dst_where)):
            try:
                await asyncio.shield(close())
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                LOG.warning("%s: closing: %s", where, strerror(exc))

    def _geometry(self) -> tuple[int, int]:
        src = self.source
        step = self._request_size or src.request_size
        if src.manifest is not None:
            cs = src.manifest.chunk_size
            step = max(cs, step - step % cs)
        in_flight = self._max_in_flight or min(src.max_in_flight,
                                               self.dest.max_in_flight)
        return step, max(1, in_flight)

    async def _pieces(self, step: int):
        """Items in offset order: data pieces of at most ``step`` bytes
        on a grid of ``step`` (so chunk checks line up), holes whole."""
        src = self.source
        size = self.size
        pos = 0
        while pos < size:
            if src.manifest is not None or src.sequential:
                extents = [Extent(pos, size - pos, True)]
            else:
                with blame(SourceError, self.src_where):
                    extents = await src.extents(
                        pos, min(EXTENT_WINDOW, size - pos))
            if not extents:
                raise SourceError(self.src_where, f"no extents at offset "
                                  f"{pos}")
            for ext in extents:
                if ext.offset != pos or ext.length <= 0 \
                        or ext.offset + ext.length > size:
                    raise SourceError(self.src_where, f"bad extent "
                                      f"{ext} at offset {pos}")
                end = pos + ext.length
                if not ext.data:
                    yield pos, end - pos, False
                    pos = end
                    continue
                while pos < end:
                    stop = min(end, (pos // step + 1) * step)
                    yield pos, stop - pos, True
                    pos = stop

    async def _copy(self) -> str | None:
        step, in_flight = self._geometry()
        whole = self.source.whole_digest
        algorithm = whole[0] if whole else self.digest_algorithm
        window = asyncio.Semaphore(in_flight * 2)
        hasher = None
        if algorithm is not None:
            with blame(SourceError, self.src_where):
                hasher = _OrderedHasher(algorithm, window)
        queue: asyncio.Queue = asyncio.Queue(maxsize=in_flight)

        async def produce():
            seq = 0
            async for offset, length, data in self._pieces(step):
                await window.acquire()
                await queue.put(_Item(seq, offset, length, data))
                seq += 1
            if hasher is not None:
                hasher.finish(seq)
            for _ in range(in_flight):
                await queue.put(None)

        pool = _BufferPool(in_flight * 3)

        async def work():
            while True:
                item = await queue.get()
                if item is None:
                    return
                data = await self._one(item, pool)
                buffer = item.buffer
                if hasher is not None:
                    hasher.put(item.seq, data, item.length,
                               lambda b=buffer: pool.put(b))
                else:
                    pool.put(buffer)
                    window.release()

        tasks = [asyncio.ensure_future(produce())]
        tasks += [asyncio.ensure_future(work()) for _ in range(in_flight)]
        if hasher is not None:
            tasks.append(asyncio.ensure_future(hasher.run()))
        try:
            done, _ = await asyncio.wait(tasks,
                                         return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception():
                raise t.exception()
        if self.done != self.size:
            raise SourceError(self.src_where, f"copied {self.done} of "
                              f"{self.size} bytes")
        if hasher is None:
            return None
        value = hasher.hexdigest()
        if whole is not None and value.lower() != whole[1].lower():
            raise VerificationError(
                self.src_where, f"the image read does not match the "
                f"{whole[0]} digest the source gave for it: read {value}, "
                f"expected {whole[1]}; nothing was committed")
        return f"{algorithm}:{value}"

    async def _one(self, item: _Item, pool: _BufferPool):
        """Copy one piece; the bytes read (None for a hole). A read into
        a buffer of the pool sets ``item.buffer`` once it succeeded (a
        failed read's buffer may still be written to: it is dropped)."""
        offset, length = item.offset, item.length
        if not item.data:
            if not self.dest.fresh:
                with blame(DestinationError, self.dst_where):
                    await self.dest.zero(offset, length)
            self.skipped += length
            self.done += length
            return None
        if self.limit is not None:
            await self.limit.acquire(length)
        with blame(SourceError, self.src_where):
            if self.source.zero_copy:
                buffer = pool.get(length)
                data = memoryview(buffer)
                await self.source.read_into(offset, data)
                item.buffer = buffer
            else:
                data = await self.source.read(offset, length)
        got = memoryview(data).nbytes
        if got != length:
            raise SourceError(self.src_where, f"short read: {got} of "
                              f"{length} bytes at offset {offset}")
        self.copied += length
        if self.source.manifest is not None:
            await self._verify(offset, data)
        if not self.detect_zeroes:
            runs = [(0, length)]
        else:
            runs = data_runs(item.buffer if item.buffer is not None
                             else data)
        view = memoryview(data).cast("B")
        with blame(DestinationError, self.dst_where):
            pos = 0
            for start, end in runs:
                if start > pos and not self.dest.fresh:
                    await self.dest.zero(offset + pos, start - pos)
                await self.dest.write(offset + start, view[start:end])
                self.written += end - start
                pos = end
            if pos < length and not self.dest.fresh:
                await self.dest.zero(offset + pos, length - pos)
        self.done += length
        return data

    async def _verify(self, offset: int, data) -> None:
        manifest = self.source.manifest
        cs = manifest.chunk_size
        n = memoryview(data).nbytes
        first, last = offset // cs, (offset + n - 1) // cs
        try:
            await manifest.load(first, last + 1, from_origin=True)
            if n >= _THREAD_FROM:
                await asyncio.get_running_loop().run_in_executor(
                    None, _check_chunks, manifest, first, data)
            else:
                _check_chunks(manifest, first, data)
        except ChunkMismatch as exc:
            raise VerificationError(self.src_where, f"{exc}; nothing was "
                                    "committed") from None
        except blockdev.BlockError as exc:
            raise SourceError(self.src_where, "reading the manifest: "
                              f"{strerror(exc)}") from exc
