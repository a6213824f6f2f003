"""Block traces: what a VM's boot asked of its disk, and when.

A trace is a text file, gzip-compressed when its name ends in ``.gz``.
The first line is a JSON header::

    {"format": "vmthunder-trace", "version": 1, "image_size": 268435456,
     "image": "file:/path/root.img:...", "recorded": "2026-11-25T07:00:00Z",
     "boot_s": 2.41, "vm_start_s": -1.47, ...}

``boot_s`` is seconds from the trace's time 0 (the issue of its first
request) to the guest's boot marker; null when unknown (a trace of
`vmthunder serve --trace` alone: only `vmthunder boot --trace` sees the
marker). ``vm_start_s`` is when QEMU started on the same clock (negative:
before the first request), so the boot as `vmthunder boot` times it is
``boot_s - vm_start_s``. Other keys (export, source, recorder,
origin_monotonic...) are informative.

Then one line per request, in issue order::

    ISSUE_S COMPLETE_S OP OFFSET LENGTH

seconds since time 0 with µs resolution, as the NBD server saw them
(request started, reply queued); OP is R read, W write, F flush, T trim,
Z write-zeroes. Bytes are not recorded, only extents.

    python -m vmthunder.trace info TRACE [--json]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import heapq
import io
import json
import os
import stat
import sys
import time
import typing
import zlib

from vmthunder import fileio
from vmthunder.nbd import constants as c

FORMAT = "vmthunder-trace"
VERSION = 1
OPS = "RWFTZ"
# NBD commands a trace records; the rest (cache hints, block status) are
# not guest I/O.
_OP_OF_COMMAND = {c.CMD_READ: "R", c.CMD_WRITE: "W", c.CMD_FLUSH: "F",
                  c.CMD_TRIM: "T", c.CMD_WRITE_ZEROES: "Z"}


class TraceError(ValueError):
    """A trace file is missing, unreadable or malformed."""


class TraceTooLarge(TraceError):
    """A trace file is over a limit :func:`load` was given."""


class Request(typing.NamedTuple):
    issue_s: float
    complete_s: float
    op: str
    offset: int
    length: int


class Trace:
    def __init__(self, header: dict, requests: list[Request]):
        self.header = header
        # Issue order; ties keep their recorded (completion) order.
        self.requests = sorted(requests, key=lambda r: r.issue_s)

    @property
    def image_size(self) -> int:
        return self.header["image_size"]

    @property
    def boot_s(self) -> float | None:
        return self.header.get("boot_s")

    def until_boot(self) -> Trace:
        """The part a boot needs: requests issued up to the boot marker
        (what a guest does after it, e.g. powering off, is not boot); the
        whole trace when the marker is unknown."""
        if self.boot_s is None:
            return self
        return Trace(self.header, [r for r in self.requests
                                   if r.issue_s <= self.boot_s])

    def end_s(self) -> float:
        """Last completion: where the recorded I/O ends."""
        return max((r.complete_s for r in self.requests), default=0.0)

    def reads(self):
        return (r for r in self.requests if r.op == "R")

    def read_bytes(self) -> int:
        return sum(r.length for r in self.reads())

    def written_bytes(self) -> int:
        return sum(r.length for r in self.requests if r.op == "W")

    def working_set_bytes(self) -> int:
        """Distinct bytes read (overlapping reads counted once)."""
        total = 0
        end = -1                    # end of the merged run so far
        for r in sorted(self.reads(), key=lambda r: r.offset):
            start, stop = r.offset, r.offset + r.length
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        return total

    def chunks(self, chunk_size: int) -> list[int]:
        """Indices of the chunks read, each once, in first-touch order:
        the order to precache them in."""
        order: list[int] = []
        for first, end in self.chunk_runs(chunk_size):
            order.extend(range(first, end))
        return order

    def chunk_runs(self, chunk_size: int) -> list[tuple[int, int]]:
        """:meth:`chunks` as runs ``(first, end)`` of consecutive chunks.

        Time and memory grow with the number of reads, not with their
        lengths (a read may cover a huge image): the chunk axis is cut at
        every read's edges, and each piece goes to the earliest read
        covering it (a sweep keeping the reads that cover the current
        point in a heap).
        """
        spans = [(r.offset // chunk_size,
                  (r.offset + r.length - 1) // chunk_size + 1)
                 for r in self.reads() if r.length]
        edges = sorted({edge for span in spans for edge in span})
        by_start = sorted(range(len(spans)), key=lambda i: spans[i][0])
        covering: list[tuple[int, int]] = []    # (read, end) heap
        pieces = []                             # (read, first, end)
        k = 0
        for x, nxt in zip(edges, edges[1:]):
            while k < len(by_start) and spans[by_start[k]][0] == x:
                i = by_start[k]
                heapq.heappush(covering, (i, spans[i][1]))
                k += 1
            while covering and covering[0][1] <= x:
                heapq.heappop(covering)     # ended before x
            if covering:
                pieces.append((covering[0][0], x, nxt))
        pieces.sort()
        runs: list[tuple[int, int]] = []
        for _, first, end in pieces:
            if runs and runs[-1][1] == first:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((first, end))
        return runs

    def dependencies(self, at: list[float] | None = None
                     ) -> list[tuple[int, float]]:
        """``(dependency, think_s)`` for each request (or each time in
        ``at``, in ascending order).

        A request's dependency is the request whose completion came last
        before it was issued (-1: none, i.e. the trace start); think_s is
        the gap between the two: guest CPU work the replay waits out.
        Taking the latest completion is the conservative guess: whatever
        the guest really waited for had completed by then.
        """
        times = at if at is not None else [r.issue_s for r in self.requests]
        done = sorted(range(len(self.requests)),
                      key=lambda i: self.requests[i].complete_s)
        out = []
        k = 0
        dep, dep_at = -1, 0.0
        for t in times:
            # Strictly before: a request never depends on itself.
            while k < len(done) and self.requests[done[k]].complete_s < t:
                dep = done[k]
                dep_at = self.requests[dep].complete_s
                k += 1
            out.append((dep, t - dep_at))
        return out

    def summary(self) -> dict:
        ops = {op: 0 for op in OPS}
        for r in self.requests:
            ops[r.op] += 1
        return {
            "image": self.header.get("image"),
            "image_size": self.image_size,
            "requests": len(self.requests),
            "ops": ops,
            "bytes_read": self.read_bytes(),
            "working_set_bytes": self.working_set_bytes(),
            "bytes_written": self.written_bytes(),
            "io_end_s": round(self.end_s(), 6),
            "boot_s": self.boot_s,
            "vm_start_s": self.header.get("vm_start_s"),
        }


def format_request(r: Request) -> str:
    return (f"{r.issue_s:.6f} {r.complete_s:.6f} {r.op} {r.offset} "
            f"{r.length}\n")


def save(trace: Trace, path: str) -> None:
    """Write atomically: a reader never sees half a trace."""
    text = json.dumps(trace.header, sort_keys=True) + "\n" + "".join(
        format_request(r) for r in trace.requests)
    data = text.encode()
    if path.endswith(".gz"):
        # mtime 0: the same trace gives the same bytes (traces are data
        # kept in git).
        data = gzip.compress(data, mtime=0)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, *, max_file_bytes: int | None = None,
         max_text_bytes: int | None = None,
         max_requests: int | None = None) -> Trace:
    """Read and check a trace; TraceError names the file and line.

    Only a regular file is read (opened without blocking: a FIFO or a
    device is refused, never waited on). The limits, for traces read on
    someone else's request (the agent's precache), bound what loading
    costs: the file's size, its size decompressed, and its requests;
    over one, TraceTooLarge naming the limit, and nothing more is read.
    """
    try:
        fd = _open_regular(path)
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc}") from None
    try:
        st = os.fstat(fd)
        if max_file_bytes is not None and st.st_size > max_file_bytes:
            raise TraceTooLarge(
                f"{path}: the trace file has {st.st_size} bytes; traces "
                f"of at most {max_file_bytes} bytes are read")
        raw = io.FileIO(fd, "rb", closefd=False)
        stream = _Limited(raw, max_file_bytes, lambda: TraceTooLarge(
            f"{path}: the trace file grew past {max_file_bytes} bytes "
            "while read; traces of at most that are read"))
        if path.endswith(".gz"):
            stream = _Limited(
                gzip.GzipFile(fileobj=stream, mode="rb"), max_text_bytes,
                lambda: TraceTooLarge(
                    f"{path}: more than {max_text_bytes} bytes once "
                    f"decompressed; traces of at most {max_text_bytes} "
                    "bytes decompressed are read"))
        elif max_text_bytes is not None:
            stream = _Limited(stream, max_text_bytes, lambda: TraceTooLarge(
                f"{path}: more than {max_text_bytes} bytes; traces of at "
                f"most {max_text_bytes} bytes (decompressed) are read"))
        return _parse(path, io.BufferedReader(stream), max_requests)
    except TraceError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise TraceError(f"{path}: cannot read trace: {exc}") from None
    finally:
        os.close(fd)


def loads(data: bytes, where: str, *, compressed: bool,
          max_text_bytes: int | None = None,
          max_requests: int | None = None) -> Trace:
    """A trace from the bytes of a trace file (gzip-compressed when
    ``compressed``), within the limits :func:`load` takes; ``where``
    names it in errors."""
    stream = io.BytesIO(data)
    try:
        if compressed:
            stream = _Limited(
                gzip.GzipFile(fileobj=stream, mode="rb"), max_text_bytes,
                lambda: TraceTooLarge(
                    f"{where}: more than {max_text_bytes} bytes once "
                    f"decompressed; traces of at most {max_text_bytes} "
                    "bytes decompressed are read"))
        elif max_text_bytes is not None and len(data) > max_text_bytes:
            raise TraceTooLarge(f"{where}: more than {max_text_bytes} "
                                "bytes; traces of at most that are read")
        return _parse(where, io.BufferedReader(stream)
                      if compressed else stream, max_requests)
    except TraceError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise TraceError(f"{where}: cannot read trace: {exc}") from None


def _open_regular(path: str) -> int:
    """A descriptor of regular file ``path``; TraceError otherwise.
    Checked before the open (a device is not even opened) and after it
    (the path may have changed meanwhile); O_NONBLOCK: a FIFO put there
    meanwhile does not block the open."""
    _check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = fileio.file_kind(mode) or "not a file"
        raise TraceError(f"{path}: not a regular file ({kind}); a trace "
                         "must be a regular file")


class _Limited(io.RawIOBase):
    """Reads ``inner`` and raises ``error()`` once more than ``limit``
    bytes came out of it (None: no limit)."""

    def __init__(self, inner, limit: int | None, error):
        self.inner = inner
        self.limit = limit
        self.error = error
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.limit is not None:
            # One byte past the limit is enough to know it is passed.
            buf = memoryview(buf)[:self.limit - self.count + 1]
        n = self.inner.readinto(buf)
        self.count += n or 0
        if self.limit is not None and self.count > self.limit:
            raise self.error()
        return n


def _parse(path: str, lines, max_requests: int | None) -> Trace:
    """The trace in ``lines`` (binary lines), streamed: only the parsed
    requests are kept."""
    header = None
    requests = []
    for n, line in enumerate(lines, start=1):
        text = line.decode().rstrip("\r\n")
        if header is None:
            header = _parse_header(path, text)
            size = header["image_size"]
        elif text.strip():
            if max_requests is not None and len(requests) >= max_requests:
                raise TraceTooLarge(
                    f"{path}: more than {max_requests} requests; traces "
                    f"of at most {max_requests} requests are read")
            requests.append(_parse_request(path, n, text, size))
    if header is None:
        raise TraceError(f"{path}: empty file, not a vmthunder trace")
    return Trace(header, requests)


def _parse_header(path: str, line: str) -> dict:
    try:
        header = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:1: header is not JSON ({exc}); is this "
                         "a vmthunder trace?") from None
    except RecursionError:
        raise TraceError(f"{path}:1: header is not a vmthunder trace "
                         "header (JSON nested too deeply)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError(f"{path}:1: header lacks \"format\": \"{FORMAT}\"; "
                         "not a vmthunder trace")
    if header.get("version") != VERSION:
        raise TraceError(f"{path}:1: trace version {header.get('version')!r}"
                         f"; this vmthunder reads version {VERSION}")
    size = header.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TraceError(f"{path}:1: image_size must be a byte count, not "
                         f"{size!r}")
    boot_s = header.get("boot_s")
    if boot_s is not None and (not isinstance(boot_s, (int, float))
                               or boot_s < 0):
        raise TraceError(f"{path}:1: boot_s must be seconds >= 0 or null, "
                         f"not {boot_s!r}")
    return header


def _shown(line: str, most: int = 80) -> str:
    """``line`` for an error message: quoted, cut when long."""
    if len(line) <= most:
        return repr(line)
    return f"{line[:most]!r}... ({len(line)} characters)"


def _parse_request(path: str, n: int, line: str, size: int) -> Request:
    where = f"{path}:{n}"
    fields = line.split()
    if len(fields) != 5:
        raise TraceError(f"{where}: expected 'ISSUE_S COMPLETE_S OP OFFSET "
                         f"LENGTH', got {_shown(line)}")
    try:
        issue, complete = float(fields[0]), float(fields[1])
        offset, length = int(fields[3]), int(fields[4])
    except ValueError:
        raise TraceError(f"{where}: bad number in {_shown(line)}") from None
    op = fields[2]
    if op not in OPS:
        raise TraceError(f"{where}: unknown op {op!r} (expected one of "
                         f"{', '.join(OPS)})")
    if not 0 <= issue <= complete:
        raise TraceError(f"{where}: times must satisfy 0 <= issue <= "
                         f"complete, got {issue} {complete}")
    if offset < 0 or length < 0 or offset + length > size:
        raise TraceError(f"{where}: extent offset={offset} length={length} "
                         f"is outside the image (image_size {size})")
    return Request(issue, complete, op, offset, length)


def export_trace_path(path: str, export: str, several: bool) -> str:
    """Where the trace of ``export`` goes when asked for ``path``.

    ``{export}`` in the path is replaced by the export name; otherwise,
    when the server has several exports, the name is inserted before the
    first dot of the file name (boot.trace.gz -> boot.vm1.trace.gz).
    """
    if "{export}" in path:
        return path.replace("{export}", export)
    if not several:
        return path
    directory, base = os.path.split(path)
    head, dot, rest = base.partition(".")
    return os.path.join(directory, f"{head}.{export}{dot}{rest}")


class TraceRecorder:
    """Records the requests of one NBD export; the NBD server calls it.

    Per request: :meth:`issue` when it starts, :meth:`record` when its
    reply is ready; both only take the time and append a tuple, so
    recording costs next to nothing. :meth:`flush` (`vmthunder serve`
    calls it every second) appends them to ``PATH.part`` (plain text, in
    completion order, a valid trace in itself) and forgets them, so a
    crash loses at most a second and memory does not grow with uptime;
    :meth:`close` turns the .part file into PATH.
    """

    def __init__(self, path: str, image_size: int, **header):
        self.path = path
        self.part_path = path + ".part"
        self.header = {"format": FORMAT, "version": VERSION,
                       "image_size": image_size, **header}
        self.origin: float | None = None     # time.monotonic() of time 0
        self.records: list[tuple] = []
        self._started_part = False

    def issue(self) -> float:
        now = time.monotonic()
        if self.origin is None:
            self.origin = now
        return now

    def record(self, command: int, offset: int, length: int,
               issued: float) -> None:
        op = _OP_OF_COMMAND.get(command)
        if op is not None:
            self.records.append((issued, time.monotonic(), op, offset,
                                 length if op != "F" else 0))

    def flush(self) -> None:
        if not self.records:
            return
        records, self.records = self.records, []
        o = self.origin
        lines = [format_request(Request(round(t - o, 6), round(d - o, 6),
                                        op, off, n))
                 for t, d, op, off, n in records]
        if not self._started_part:
            now = datetime.datetime.now(datetime.timezone.utc)
            header = {**self.header, "origin_monotonic": o, "partial": True,
                      "recorded": now.isoformat(timespec="seconds")}
            lines.insert(0, json.dumps(header, sort_keys=True) + "\n")
        with open(self.part_path, "a" if self._started_part else "w") as f:
            f.writelines(lines)
        self._started_part = True

    def close(self, **header) -> Trace | None:
        """Write PATH (None, and no file, if nothing was recorded)."""
        self.flush()
        if not self._started_part:
            return None
        trace = load(self.part_path)
        del trace.header["partial"]
        trace.header.update(header)
        save(trace, self.path)
        os.unlink(self.part_path)
        self._started_part = False
        return trace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmthunder.trace",
        description="Inspect vmthunder block traces.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summary of a trace")
    info.add_argument("trace")
    info.add_argument("--json", action="store_true",
                      help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        summary = load(args.trace).summary()
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    mib = 1024 * 1024
    boot = summary["boot_s"]
    ops = " ".join(f"{k}={v}" for k, v in summary["ops"].items() if v)
    print(f"trace      {args.trace}\n"
          f"image      {summary['image']} "
          f"({summary['image_size'] / mib:.0f} MiB)\n"
          f"requests   {summary['requests']} ({ops})\n"
          f"read       {summary['bytes_read'] / mib:.2f} MiB, working set "
          f"{summary['working_set_bytes'] / mib:.2f} MiB\n"
          f"written    {summary['bytes_written'] / 1024:.0f} KiB\n"
          f"I/O ends   {summary['io_end_s']:.3f} s after the first request\n"
          f"boot_s     "
          + (f"{boot:.3f} s after the first request" if boot is not None
             else "unknown (recorded without the boot marker)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
