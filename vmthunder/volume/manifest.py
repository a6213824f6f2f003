"""The chunk manifest of an exported image: size, chunk size, digests.

Written by `vmthunder export` beside the LUN; read by every compute host
that attaches the image. Each chunk a host fetches (from the origin or
from peers) is checked against it before it is stored or served, so a
wrong block from anywhere never reaches a guest.

Digest: BLAKE3 (the `blake3` package), else SHA-256. Both are strong (a
peer cannot forge a chunk). BLAKE3 is the default because every byte a
host fetches is digested on the cold path: one core here does 3.2 GB/s of
BLAKE3 against 1.5 GB/s of SHA-256 (OpenSSL with the CPU's SHA
extensions). Manifests name their algorithm; SHA-256 ones (hashlib,
always present) are still read and checked.

Format, version 2 (binary; what `vmthunder export` writes)::

    [0, 4096)       header: one JSON object, UTF-8, NUL-padded:
                    {"format": "vmthunder-manifest", "version": 2,
                     "name": ..., "size": BYTES, "chunk_size": BYTES,
                     "algorithm": "blake3"|"sha256", "digest_size": 16,
                     "page_size": 4096, "pages_offset": 4096,
                     "table_offset": BYTES, "pages_digest": "hex"}
    [pages_offset)  the page digests: one per page_size bytes of the
                    table (the last page may be short); pages_digest is
                    the full digest of all of them
    [table_offset)  the table: each chunk's digest, chunk after chunk
                    (the last chunk may be short)

Every digest is truncated to digest_size bytes.

A host reads the header and the page digests at attach (32 KiB for a
2 GiB image in 4 KiB chunks), and the table *lazily*, a page at a time,
each page checked against its page digest, only for the chunks it
fetches (:meth:`Manifest.load`): small chunks keep what a boot fetches
close to what it reads (a guest's reads are scattered 4 KiB blocks), and
their table (512 Ki digests for that image) would cost every host more
than the boot itself if read whole. A page is the smallest piece of the
table that can be checked, and no digest in it is trusted before it is:
wherever a page comes from (the origin's manifest LUN, or a table cache
filled by peers), one that does not match its page digest fails the load
(EIO) and nothing of it is kept, so a chunk forged together with its
table entry (header and page digests untouched) is neither served nor
cached. The page digests make the table an image of its own, with pages
for chunks: peers serve it like the image (the agent's table cache,
:meth:`Manifest.table_manifest`), each page checked against its digest,
so hosts need the origin neither for every page nor at all once peers
hold them. Digests are truncated to 16 bytes for the same reason: 128
bits still make forging a chunk (a second preimage) out of reach.

Version 1 (JSON with hex digests, the whole table in one object) is still
read; nothing writes it any more.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json

from vmthunder import blockdev

try:
    import blake3
except ImportError:                  # requirements.txt has it; be lenient
    blake3 = None

FORMAT = "vmthunder-manifest"
VERSION = 2
VERSIONS = (1, 2)
# name -> constructor taking the data (all release the GIL on big inputs)
HASHES = {"sha256": hashlib.sha256}
if blake3 is not None:
    HASHES["blake3"] = blake3.blake3
# What new manifests use.
ALGORITHM = "blake3" if blake3 is not None else "sha256"
DIGEST_SIZE = 16
MIN_DIGEST_SIZE = 16
HEADER_BYTES = 4096
# The table's pages (each with a digest, see the module doc).
PAGE_SIZE = 4096
# The table is loaded lazily in pieces of this many bytes, each piece
# once: whole pages (256 digests of 16 bytes), since a page is what its
# page digest checks, and nothing in a piece is trusted before that.
LOAD_UNIT = PAGE_SIZE
# Pieces of the table are checked in a worker thread from this many bytes.
_CHECK_IN_THREAD = 64 * 1024
# build_manifest reads the image this much at a time.
_READ_BYTES = 4 << 20


class ManifestError(ValueError):
    pass


class ChunkMismatch(blockdev.BlockError):
    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def _check_params(where: str, size, chunk_size, algorithm, digest_size):
    if algorithm not in HASHES:
        raise ManifestError(
            f"{where} uses digest {algorithm!r}; this vmthunder checks "
            f"{', '.join(sorted(HASHES))}"
            + ("" if blake3 is not None else
               " (pip install blake3 for BLAKE3)"))
    if not all(isinstance(v, int) and not isinstance(v, bool)
               for v in (size, chunk_size, digest_size)) or size <= 0 \
            or chunk_size <= 0 or not MIN_DIGEST_SIZE <= digest_size <= 32:
        raise ManifestError(
            f"{where} is inconsistent: size {size!r}, chunk size "
            f"{chunk_size!r}, digest size {digest_size!r} (digests are "
            f"{MIN_DIGEST_SIZE} to 32 bytes)")


class Manifest:
    """The digests of an image's chunks; all of them (``table`` given), or
    loaded on demand through ``fetch_table(offset, length)``, an async
    callable returning those bytes of the table (:meth:`lazy`).

    Version 2 manifests also carry ``pages``: the digest of each
    PAGE_SIZE bytes of the table (see the module doc)."""

    def __init__(self, name: str, size: int, chunk_size: int, *,
                 table: bytes | None = None, algorithm: str = ALGORITHM,
                 digest_size: int = DIGEST_SIZE, version: int = VERSION,
                 pages: bytes | None = None,
                 pages_digest: str | None = None, fetch_table=None,
                 where: str = "manifest", trace: dict | None = None):
        _check_params(where, size, chunk_size, algorithm, digest_size)
        # The boot trace published with the image, when there is one
        # (vmthunder/volume/published_trace.py): {"lun", "bytes",
        # "digest", "compressed"}; checked by parse_header.
        self.trace = trace
        self.name = name
        self.size = size
        self.chunk_size = chunk_size
        self.algorithm = algorithm
        self.digest_size = digest_size
        self.version = version
        self.where = where
        self.chunks = (size + chunk_size - 1) // chunk_size
        self.table_bytes = self.chunks * digest_size
        n_pages = -(-self.table_bytes // PAGE_SIZE)
        if table is not None:
            if len(table) != self.table_bytes:
                raise ManifestError(
                    f"{where} is inconsistent: {len(table)} bytes of "
                    f"digests for {self.chunks} chunks of {digest_size}")
            self._table = bytearray(table)
            self._have = None                   # everything
            computed = b"".join(
                self._hash(self._table[p:p + PAGE_SIZE])
                for p in range(0, self.table_bytes, PAGE_SIZE))
            if pages is not None and bytes(pages) != computed:
                raise ManifestError(f"{where} is damaged: its digest table "
                                    "does not match its page digests")
            pages = computed
        else:
            if fetch_table is None or pages is None:
                raise ValueError("a lazy manifest needs fetch_table and "
                                 "the page digests")
            self._table = bytearray(self.table_bytes)
            # One byte per page of the table: loaded (and checked) or not.
            self._have = bytearray(n_pages)
        if len(pages) != n_pages * digest_size:
            raise ManifestError(
                f"{where} is inconsistent: {len(pages)} bytes of page "
                f"digests for {n_pages} pages of {digest_size}")
        self.pages = bytes(pages)
        self.pages_digest = HASHES[algorithm](self.pages).hexdigest()
        if pages_digest is not None and pages_digest != self.pages_digest:
            raise ManifestError(f"{where} is damaged: its page digests do "
                                "not match pages_digest")
        self._fetch_table = fetch_table
        # Where the table comes from (the origin's manifest LUN), even once
        # it is read through a table cache (read_table_through).
        self._fetch_origin = fetch_table
        # page of the table -> future of its fetch, while one runs
        self._pending: dict[int, asyncio.Future] = {}
        self.table_bytes_loaded = 0 if self._have is not None \
            else self.table_bytes

    def _hash(self, data) -> bytes:
        return HASHES[self.algorithm](data).digest()[:self.digest_size]

    # -- what it says ----------------------------------------------------

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def identity(self) -> str:
        """Names the image content: two exports of one image share it."""
        h = hashlib.sha256()
        if self.version == 1:
            h.update(f"{self.size}:{self.chunk_size}:{self.algorithm}:"
                     .encode())
            for i in range(self.chunks):
                h.update(self._digest(i).hex().encode())
        else:
            h.update(f"v2:{self.size}:{self.chunk_size}:{self.algorithm}:"
                     f"{self.digest_size}:{self.pages_digest}".encode())
        return f"manifest:{h.hexdigest()}"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.header() == other.header()

    __hash__ = None

    def __repr__(self) -> str:
        return (f"Manifest({self.name!r}, size={self.size}, chunk_size="
                f"{self.chunk_size}, {self.algorithm}/{self.digest_size}, "
                f"v{self.version}{', lazy' if self.lazy_loading else ''})")

    @property
    def lazy_loading(self) -> bool:
        return self._have is not None

    def header(self) -> dict:
        pages_offset = HEADER_BYTES
        head = {"format": FORMAT, "version": self.version,
                "name": self.name, "size": self.size,
                "chunk_size": self.chunk_size, "algorithm": self.algorithm,
                "digest_size": self.digest_size, "page_size": PAGE_SIZE,
                "pages_offset": pages_offset,
                "table_offset": pages_offset + _pad(len(self.pages),
                                                    PAGE_SIZE),
                "pages_digest": self.pages_digest}
        if self.trace is not None:
            head["trace"] = self.trace
        return head

    # -- the table as an image of its own ----------------------------------

    def table_manifest(self) -> Manifest:
        """The manifest of the digest table seen as an image: chunks are
        its pages, their digests the page digests. What a table cache
        checks the pages it fetches against."""
        return Manifest(f"{self.name}@digests", self.table_bytes, PAGE_SIZE,
                        table=self.pages, algorithm=self.algorithm,
                        digest_size=self.digest_size, where=self.where)

    def table_device(self) -> TableDevice:
        """The table as a read-only block device read from where the
        manifest came from (the bottom of a table cache)."""
        if self._fetch_table is None:
            raise ValueError(f"{self.where} is not read lazily")
        return TableDevice(self, self._fetch_table)

    def read_table_through(self, fetch_table) -> None:
        """Load missing pages of the table with ``fetch_table(offset,
        length)`` from now on (a table cache's read). They are checked
        against the page digests like the origin's."""
        self._fetch_table = fetch_table

    # -- checking chunks -------------------------------------------------

    def _digest(self, index: int) -> bytes:
        ds = self.digest_size
        return bytes(self._table[index * ds:(index + 1) * ds])

    def _units(self, first: int, last: int) -> range:
        """The pages of the table holding the digests of chunks [first,
        last)."""
        ds = self.digest_size
        return range(first * ds // LOAD_UNIT,
                     (last * ds - 1) // LOAD_UNIT + 1)

    def loaded(self, index: int) -> bool:
        return self._have is None or all(
            self._have[u] for u in self._units(index, index + 1))

    async def load(self, first: int, last: int, *,
                   from_origin: bool = False) -> None:
        """Have the digests of chunks [first, last) at hand: fetch the
        missing pages of the table (each page once, however many ask;
        consecutive ones in one read), straight from the origin with
        ``from_origin`` (for a host reading those chunks from the origin
        anyway: one round trip, beside the data's), else through the
        table cache when there is one, and check each page against its
        page digest before any digest in it is used. Raises BlockError
        when they cannot be read, ChunkMismatch (EIO) when a page does
        not match its page digest; either way nothing of that read is
        marked loaded (a later load fetches it again)."""
        if self._have is None or first >= last:
            return
        first, last = max(first, 0), min(last, self.chunks)
        if first >= last:
            return
        units = [u for u in self._units(first, last) if not self._have[u]]
        if not units:
            return
        start = [u for u in units if u not in self._pending]
        run_start = None
        for pos, u in enumerate(start):
            if run_start is None:
                run_start = u
            if pos + 1 == len(start) or start[pos + 1] != u + 1:
                self._start_fetch(run_start, u + 1, self._fetch_origin
                                  if from_origin else self._fetch_table)
                run_start = None
        waits = [self._pending[u] for u in units if u in self._pending]
        for result in await asyncio.gather(*map(asyncio.shield, waits),
                                           return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _start_fetch(self, a: int, b: int, fetch) -> None:
        future = asyncio.get_running_loop().create_future()
        for u in range(a, b):
            self._pending[u] = future
        task = asyncio.ensure_future(self._fetch_units(a, b, future, fetch))
        # The outcome travels through ``future``; nothing to log here.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _fetch_units(self, a: int, b: int, future: asyncio.Future,
                           fetch) -> None:
        """Fetch pages [a, b) of the table in one read, check each against
        its page digest, then (only if all match) keep them."""
        start = a * LOAD_UNIT
        stop = min(b * LOAD_UNIT, len(self._table))
        try:
            data = await fetch(start, stop - start)
            if len(data) != stop - start:
                raise blockdev.BlockError(
                    errno.EIO, f"{self.where}: asked for {stop - start} "
                    f"bytes of the digest table at {start}, got "
                    f"{len(data)}")
            if stop - start >= _CHECK_IN_THREAD:
                bad = await asyncio.to_thread(self._bad_page, a, data)
            else:
                bad = self._bad_page(a, data)
            if bad is not None:
                raise self._page_mismatch(
                    bad, fetch is not self._fetch_origin)
            self._table[start:stop] = data
            for u in range(a, b):
                self._have[u] = 1
            self.table_bytes_loaded += stop - start
            future.set_result(None)
        except BaseException as exc:
            if isinstance(exc, blockdev.BlockError):
                error = exc
            else:
                error = blockdev.BlockError(
                    errno.EIO, f"{self.where}: cannot read the digest table "
                    f"at {start}: {exc!r}")
            future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            for u in range(a, b):
                if self._pending.get(u) is future:
                    del self._pending[u]

    def _bad_page(self, first: int, data) -> int | None:
        """The first page of ``data`` (page ``first`` of the table at its
        start) that does not match its page digest; None if all do."""
        ds = self.digest_size
        view = memoryview(data)
        for pos in range(0, len(view), PAGE_SIZE):
            page = first + pos // PAGE_SIZE
            if self._hash(view[pos:pos + PAGE_SIZE]) \
                    != self.pages[page * ds:(page + 1) * ds]:
                return page
        return None

    def _page_mismatch(self, page: int, through_cache: bool
                       ) -> ChunkMismatch:
        ds = self.digest_size
        per_page = PAGE_SIZE // ds
        first = page * per_page
        last = min(first + per_page, self.chunks) - 1
        source = ("through the table cache (from peers or the origin)"
                  if through_cache else "from the origin")
        return ChunkMismatch(
            f"image {self.name!r}: page {page} of the digest table of "
            f"{self.where} (the digests of chunks {first}-{last}), read "
            f"{source}, does not match its page digest: the origin's "
            "manifest or the table served for it is damaged; those chunks "
            "cannot be checked and are not served")

    def verify(self, index: int, data) -> None:
        """Raise ChunkMismatch unless ``data`` is chunk ``index`` (a lazy
        manifest must have :meth:`load`-ed it)."""
        if not 0 <= index < self.chunks:
            raise ChunkMismatch(f"image {self.name!r}: chunk {index} is not "
                                f"in the manifest ({self.chunks} chunks)")
        start, length = self.chunk_range(index)
        if len(data) != length:
            raise ChunkMismatch(
                f"image {self.name!r}: chunk {index} (offset {start}) has "
                f"{len(data)} bytes, the manifest says {length}")
        if not self.loaded(index):
            # A caller that skipped load(): refuse rather than trust.
            raise ChunkMismatch(
                f"image {self.name!r}: the digest of chunk {index} is not "
                "loaded; it cannot be checked")
        if self._hash(data) != self._digest(index):
            raise ChunkMismatch(
                f"image {self.name!r}: chunk {index} (offset {start}) does "
                "not match its manifest digest")

    def verify_run(self, first: int, data) -> dict:
        """Check the consecutive chunks of ``data`` (chunk ``first`` at
        its start, each whole): ``{index: ChunkMismatch}`` of those that
        are not what the manifest says, empty when all are.

        What :meth:`verify` does chunk by chunk, with the per-chunk work
        cut to the digest itself: the run's range, lengths and loaded
        pages are checked once, the digests go into one string compared
        with the table's slice at once. Anything unusual (a run past the
        end, a wrong length, digests not loaded) takes the chunk-by-chunk
        path, for its messages. Runs in a worker thread as well (the
        hashes release the GIL).
        """
        view = memoryview(data).cast("B")
        cs, ds = self.chunk_size, self.digest_size
        n = view.nbytes
        last = first - (-n // cs)
        if n == 0:
            return {}
        if first < 0 or last > self.chunks \
                or n != min(last * cs, self.size) - first * cs \
                or (self._have is not None and self._have.find(
                    0, first * ds // LOAD_UNIT,
                    (last * ds - 1) // LOAD_UNIT + 1) != -1):
            return self._verify_each(first, view)
        make = HASHES[self.algorithm]
        if make is hashlib.sha256:
            got = b"".join([make(view[p:p + cs]).digest()[:ds]
                            for p in range(0, n, cs)])
        else:                       # blake3: digest(length)
            got = b"".join([make(view[p:p + cs]).digest(ds)
                            for p in range(0, n, cs)])
        want = self._table[first * ds:last * ds]
        if got == want:
            return {}
        return {first + k: ChunkMismatch(
                    f"image {self.name!r}: chunk {first + k} (offset "
                    f"{(first + k) * cs}) does not match its manifest "
                    "digest")
                for k in range(last - first)
                if got[k * ds:(k + 1) * ds] != want[k * ds:(k + 1) * ds]}

    def _verify_each(self, first: int, view: memoryview) -> dict:
        failed = {}
        cs = self.chunk_size
        for pos in range(0, view.nbytes, cs):
            index = first + pos // cs
            try:
                self.verify(index, view[pos:pos + cs])
            except blockdev.BlockError as exc:
                failed[index] = exc
        return failed

    # -- bytes -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        if self._have is not None:
            raise ValueError("a lazily loaded manifest has no full table "
                             "to write")
        if self.version == 1:
            return json.dumps({
                "format": FORMAT, "version": 1, "name": self.name,
                "size": self.size, "chunk_size": self.chunk_size,
                "algorithm": self.algorithm,
                "digests": [self._digest(i).hex()
                            for i in range(self.chunks)],
            }, separators=(",", ":")).encode()
        head = self.header()
        text = json.dumps(head, separators=(",", ":")).encode()
        if len(text) > HEADER_BYTES:
            raise ManifestError(f"manifest header of {self.name!r} is "
                                f"{len(text)} bytes (at most "
                                f"{HEADER_BYTES}): use a shorter name")
        pages = self.pages + b"\0" * (head["table_offset"] - HEADER_BYTES
                                      - len(self.pages))
        return (text + b"\0" * (HEADER_BYTES - len(text)) + pages
                + bytes(self._table))

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "manifest") -> Manifest:
        """A whole manifest (either version; NUL padding after it is
        ignored)."""
        head = parse_header(raw[:HEADER_BYTES], where)
        if head is None:                         # version 1
            return _from_v1(raw, where)
        offset = head["table_offset"]
        table = raw[offset:offset + head["table_bytes"]]
        return cls(head["name"], head["size"], head["chunk_size"],
                   table=table, algorithm=head["algorithm"],
                   digest_size=head["digest_size"], version=2,
                   pages=raw[head["pages_offset"]:head["pages_offset"]
                             + head["pages_bytes"]],
                   pages_digest=head["pages_digest"], where=where,
                   trace=head.get("trace"))

    @classmethod
    def lazy(cls, head: dict, pages: bytes, fetch_table,
             where: str = "manifest") -> Manifest:
        """A version 2 manifest from its parsed header (parse_header) and
        page digests, whose table is read on demand: ``fetch_table(offset,
        length)`` returns bytes of the table (offsets from its start)."""
        return cls(head["name"], head["size"], head["chunk_size"],
                   algorithm=head["algorithm"],
                   digest_size=head["digest_size"], version=2,
                   pages=pages, pages_digest=head["pages_digest"],
                   fetch_table=fetch_table, where=where,
                   trace=head.get("trace"))


class TableDevice(blockdev.BlockDevice):
    """A manifest's digest table as a read-only block device, read with
    the manifest's own ``fetch_table`` (the origin's manifest LUN)."""

    def __init__(self, manifest: Manifest, fetch_table):
        self.manifest = manifest
        self.size = manifest.table_bytes
        self._fetch = fetch_table

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return bytes(await self._fetch(offset, length)) if length else b""

    def identity(self) -> str:
        return f"{self.manifest.identity()}:digest-table"

    def describe(self) -> str:
        return f"digest table of {self.manifest.where}"


def _pad(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def parse_header(block: bytes, where: str = "manifest") -> dict | None:
    """The header of a version 2 manifest from its first HEADER_BYTES
    bytes; None when they start a version 1 (JSON) manifest instead.
    Raises ManifestError for anything else."""
    # The header ends at its first NUL (its padding).
    text = bytes(block[:HEADER_BYTES]).split(b"\0", 1)[0]
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        # A version 1 manifest is one JSON object, usually longer than
        # the header block.
        if text.lstrip()[:1] == b"{" and b'"version":1' in text[:200]:
            return None
        raise ManifestError(f"{where} is not a vmthunder manifest "
                            "(no JSON header)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a vmthunder manifest")
    if doc.get("version") not in VERSIONS:
        raise ManifestError(
            f"{where} has manifest version {doc.get('version')!r}; this "
            f"vmthunder reads versions {', '.join(map(str, VERSIONS))}")
    if doc["version"] == 1:
        return None
    try:
        head = {"name": str(doc.get("name", "")), "size": doc["size"],
                "chunk_size": doc["chunk_size"],
                "algorithm": doc["algorithm"],
                "digest_size": doc["digest_size"],
                "page_size": doc["page_size"],
                "pages_offset": doc["pages_offset"],
                "table_offset": doc["table_offset"],
                "pages_digest": str(doc["pages_digest"])}
    except KeyError as exc:
        raise ManifestError(f"{where} is malformed: no {exc}") from None
    _check_params(where, head["size"], head["chunk_size"],
                  head["algorithm"], head["digest_size"])
    if head["page_size"] != PAGE_SIZE:
        raise ManifestError(f"{where} has pages of {head['page_size']!r} "
                            f"bytes; this vmthunder reads {PAGE_SIZE}")
    chunks = -(-head["size"] // head["chunk_size"])
    head["table_bytes"] = chunks * head["digest_size"]
    head["pages_bytes"] = (-(-head["table_bytes"] // PAGE_SIZE)
                           * head["digest_size"])
    for key in ("pages_offset", "table_offset"):
        if not isinstance(head[key], int) or isinstance(head[key], bool) \
                or head[key] < HEADER_BYTES:
            raise ManifestError(f"{where} is malformed: {key} "
                                f"{head[key]!r}")
    if head["table_offset"] < head["pages_offset"] + head["pages_bytes"]:
        raise ManifestError(f"{where} is malformed: the table must come "
                            "after the page digests")
    head["trace"] = _check_trace_ref(where, doc.get("trace"),
                                     head["algorithm"])
    return head


# A published boot trace is at most this big (the agent's precache limit
# on trace files too).
MAX_TRACE_BYTES = 16 * 1024 * 1024


def _check_trace_ref(where: str, ref, algorithm: str) -> dict | None:
    """The header's "trace" entry (the boot trace published with the
    image: its LUN, size and digest), checked; None when absent."""
    if ref is None:
        return None
    size = HASHES[algorithm]().digest_size * 2
    try:
        lun, nbytes, digest = ref["lun"], ref["bytes"], ref["digest"]
        compressed = ref.get("compressed", False)
        ok = (all(isinstance(v, int) and not isinstance(v, bool)
                  for v in (lun, nbytes))
              and 0 <= lun < 1 << 16 and 0 < nbytes <= MAX_TRACE_BYTES
              and isinstance(digest, str) and len(digest) == size
              and all(c in "0123456789abcdef" for c in digest)
              and isinstance(compressed, bool))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ManifestError(f"{where} is malformed: its trace entry "
                            f"{ref!r} is not {{\"lun\": N, \"bytes\": "
                            f"1..{MAX_TRACE_BYTES}, \"digest\": "
                            f"{size} hex digits, \"compressed\": bool}}")
    return {"lun": lun, "bytes": nbytes, "digest": digest,
            "compressed": compressed}


def _from_v1(raw: bytes, where: str) -> Manifest:
    text = bytes(raw).rstrip(b"\0")
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{where} is not a vmthunder manifest "
                            f"(not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a vmthunder manifest")
    algorithm = doc.get("algorithm")
    try:
        size, chunk_size = int(doc["size"]), int(doc["chunk_size"])
        table = b"".join(bytes.fromhex(str(d)) for d in doc["digests"])
        name = str(doc.get("name", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where} is malformed: {exc}") from None
    _check_params(where, size, chunk_size, algorithm, 32)
    return Manifest(name, size, chunk_size, table=table,
                    algorithm=algorithm, digest_size=32, version=1,
                    where=where)


def build_manifest(path: str, name: str, chunk_size: int, *,
                   algorithm: str = ALGORITHM,
                   digest_size: int = DIGEST_SIZE,
                   version: int = VERSION) -> Manifest:
    """Digest every chunk of a raw image file (blocking: run in a thread).
    ``version``/``digest_size`` other than the defaults rebuild an older
    export's manifest to compare it."""
    if version == 1:
        digest_size = 32
    digest = HASHES[algorithm]
    table = bytearray()
    size = 0
    step = max(chunk_size, _READ_BYTES - _READ_BYTES % chunk_size)
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(step)
            if not data:
                break
            view = memoryview(data)
            for pos in range(0, len(data), chunk_size):
                table += digest(view[pos:pos + chunk_size]).digest()[
                    :digest_size]
            size += len(data)
            if len(data) < step:
                break
    if size == 0:
        raise ManifestError(f"image {path} is empty")
    return Manifest(name, size, chunk_size, table=bytes(table),
                    algorithm=algorithm, digest_size=digest_size,
                    version=version)
