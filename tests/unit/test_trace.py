"""vmthunder.trace and .replay: format, checks, working set, timing."""

import asyncio
import errno
import gzip
import json
import os

import pytest

from vmthunder import blockdev
from vmthunder.bench import replay
from vmthunder import trace as tr
from vmthunder.trace import Request as Rq
from vmthunder.nbd import constants as c

SIZE = 1 << 20


def make(requests, boot_s=None, **header):
    return tr.Trace({"format": tr.FORMAT, "version": tr.VERSION,
                     "image_size": SIZE, "image": "test", "boot_s": boot_s,
                     **header}, requests)


def write_lines(path, *lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


HEADER = json.dumps({"format": "vmthunder-trace", "version": 1,
                     "image_size": SIZE})


# -- format ------------------------------------------------------------

@pytest.mark.parametrize("name", ["t.trace", "t.trace.gz"])
def test_round_trip(tmp_path, name):
    t = make([Rq(0.0, 0.001234, "R", 0, 512),
              Rq(0.5, 0.6, "W", 4096, 1024),
              Rq(0.000001, 0.7, "F", 0, 0),
              Rq(0.8, 0.81, "T", 8192, 4096),
              Rq(0.9, 0.95, "Z", 0, 65536)], boot_s=1.25)
    path = str(tmp_path / name)
    tr.save(t, path)
    back = tr.load(path)
    assert back.header == t.header
    assert back.requests == t.requests        # issue order, µs kept
    assert [r.op for r in back.requests] == list("RFWTZ")
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline())["format"] == "vmthunder-trace"
        # Reproducible bytes: the committed trace does not churn.
        first = open(path, "rb").read()
        tr.save(t, path)
        assert open(path, "rb").read() == first
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_load_sorts_by_issue_time(tmp_path):
    # A .part file lists requests as they completed, not as issued.
    path = write_lines(tmp_path / "t", HEADER, "0.2 0.3 R 0 10",
                       "0.1 0.4 R 10 10")
    assert [r.issue_s for r in tr.load(path).requests] == [0.1, 0.2]


@pytest.mark.parametrize("lines, message", [
    ([], "empty file"),
    (["hello"], ":1: header is not JSON"),
    (['{"format": "qcow2"}'], ':1: header lacks "format"'),
    (['{"format": "vmthunder-trace", "version": 2, "image_size": 1}'],
     ":1: trace version 2; this vmthunder reads version 1"),
    (['{"format": "vmthunder-trace", "version": 1}'],
     ":1: image_size must be a byte count"),
    (['{"format": "vmthunder-trace", "version": 1, "image_size": 9, '
      '"boot_s": -1}'], ":1: boot_s must be seconds"),
    ([HEADER, "0 0.1 R 0 512", "0 0.1 R 0"], ":3: expected 'ISSUE_S"),
    ([HEADER, "0 x R 0 512"], ":2: bad number"),
    ([HEADER, "0 0.1 X 0 512"], ":2: unknown op 'X'"),
    ([HEADER, "0.2 0.1 R 0 512"], ":2: times must satisfy"),
    ([HEADER, "-1 0.1 R 0 512"], ":2: times must satisfy"),
    ([HEADER, f"0 0.1 R {SIZE - 1} 2"], ":2: extent offset="),
])
def test_bad_files_say_where(tmp_path, lines, message):
    path = tmp_path / "bad.trace"
    path.write_text("\n".join(lines))
    with pytest.raises(tr.TraceError) as exc:
        tr.load(str(path))
    assert str(path) in str(exc.value)
    assert message in str(exc.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(tr.TraceError, match="cannot read trace"):
        tr.load(str(tmp_path / "missing.trace"))
    plain = tmp_path / "not-gzip.trace.gz"
    plain.write_text(HEADER + "\n")
    with pytest.raises(tr.TraceError, match="cannot read trace"):
        tr.load(str(plain))


# -- figures -----------------------------------------------------------

def test_working_set_merges_overlaps():
    t = make([Rq(0, 0, "R", 0, 100),
              Rq(1, 1, "R", 50, 100),       # overlaps: +50
              Rq(2, 2, "R", 150, 10),       # adjacent: +10
              Rq(3, 3, "R", 20, 10),        # inside: +0
              Rq(4, 4, "R", 1000, 24),      # apart: +24
              Rq(5, 5, "W", 5000, 4096),    # writes do not count
              Rq(6, 6, "R", 7, 0)])         # empty read
    assert t.working_set_bytes() == 184
    assert t.read_bytes() == 244
    assert t.written_bytes() == 4096
    assert make([]).working_set_bytes() == 0


def test_chunks_in_first_touch_order():
    t = make([Rq(0, 1, "R", 5000, 100),     # chunk 1
              Rq(1, 2, "R", 100, 4000),     # chunk 0 (0..4099)
              Rq(2, 3, "W", 20000, 10),     # a write: not read
              Rq(3, 4, "R", 4000, 200),     # chunks 0 and 1 again
              Rq(4, 5, "R", 12287, 2)])     # chunks 2 and 3
    assert t.chunks(4096) == [1, 0, 2, 3]


def test_dependencies_are_the_latest_completion_before_issue():
    t = make([Rq(0.0, 1.0, "R", 0, 1),      # 0: no dependency
              Rq(0.5, 1.5, "R", 0, 1),      # 1: overlaps 0, none either
              Rq(1.2, 1.3, "R", 0, 1),      # 2: after 0 completed
              Rq(2.0, 2.1, "R", 0, 1),      # 3: 1 finished last (1.5)
              Rq(2.1, 2.2, "R", 0, 1)])     # 4: issued as 3 completes
    deps = t.dependencies()
    assert [d for d, _ in deps] == [-1, -1, 0, 1, 1]
    assert [round(s, 6) for _, s in deps] == [0.0, 0.5, 0.2, 0.5, 0.6]
    assert t.dependencies(at=[1.4, 9.0]) == [(2, pytest.approx(0.1)),
                                             (4, pytest.approx(6.8))]


def test_export_trace_path():
    p = tr.export_trace_path
    assert p("/t/boot.trace.gz", "vm1", several=False) == "/t/boot.trace.gz"
    assert p("/t/boot.trace.gz", "vm1", several=True) == \
        "/t/boot.vm1.trace.gz"
    assert p("/t/boot", "vm1", several=True) == "/t/boot.vm1"
    assert p("/t/{export}/x.gz", "vm1", several=False) == "/t/vm1/x.gz"


def test_recorder_part_file_and_close(tmp_path):
    path = str(tmp_path / "rec.trace.gz")
    rec = tr.TraceRecorder(path, SIZE, image="img", export="vm1")
    t0 = rec.issue()
    rec.record(c.CMD_READ, 0, 512, t0)
    rec.record(c.CMD_BLOCK_STATUS, 0, 512, rec.issue())    # not I/O
    rec.flush()
    rec.record(c.CMD_FLUSH, 0, 0, rec.issue())
    rec.flush()
    # A crash now keeps what was flushed, as a valid trace.
    part = tr.load(rec.part_path)
    assert part.header["partial"] is True
    assert [r.op for r in part.requests] == ["R", "F"]
    rec.record(c.CMD_WRITE, 4096, 1024, rec.issue())
    t = rec.close()
    assert not os.path.exists(rec.part_path)
    back = tr.load(path)
    assert [r.op for r in back.requests] == ["R", "F", "W"]
    assert back.requests == t.requests
    assert back.requests[0].issue_s == 0.0
    assert back.header["export"] == "vm1"
    assert back.header["origin_monotonic"] == t0
    assert "partial" not in back.header
    # Nothing recorded: no file.
    empty = tr.TraceRecorder(str(tmp_path / "none.trace"), SIZE)
    assert empty.close() is None
    assert not os.path.exists(tmp_path / "none.trace")


def test_info_cli(tmp_path, capsys):
    path = str(tmp_path / "t.trace")
    tr.save(make([Rq(0, 0.1, "R", 0, 4096)], boot_s=2.0), path)
    assert tr.main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["requests"] == 1 and info["working_set_bytes"] == 4096
    assert info["boot_s"] == 2.0
    assert tr.main(["info", path]) == 0
    assert "working set 0.00 MiB" in capsys.readouterr().out
    assert tr.main(["info", str(tmp_path / "nope")]) == 1
    assert "cannot read trace" in capsys.readouterr().err


# -- replay ------------------------------------------------------------

class SlowMemory(blockdev.BlockDevice):
    """In memory, each request taking ``delay`` seconds."""

    capabilities = blockdev.Capabilities(writable=True)

    def __init__(self, delay: float, size: int = SIZE, fail_at=None):
        self.size = size
        self.delay = delay
        self.fail_at = fail_at
        self.data = bytearray(size)
        self.log = []
        self.in_flight = self.max_in_flight = 0

    async def _io(self, what, offset):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log.append((what, offset))
        try:
            await asyncio.sleep(self.delay)
            if offset == self.fail_at:
                raise blockdev.BlockError(errno.EIO, "disk on fire")
        finally:
            self.in_flight -= 1

    async def read(self, offset, length):
        await self._io("R", offset)
        return bytes(self.data[offset:offset + length])

    async def write(self, offset, data, fua=False):
        await self._io("W", offset)
        self.data[offset:offset + len(data)] = data

    async def flush(self):
        await self._io("F", 0)


def run_replay(t, device, **kwargs):
    return asyncio.run(replay.replay(t, device, **kwargs))


def near_late(expected: float):
    """A replayed time: timers are never early but can be late on a
    loaded machine, so the bound below is tight (it shows the delays
    were applied) and the one above loose."""
    return _Between(expected - 0.01, expected + 0.15)


class _Between:
    def __init__(self, low, high):
        self.low, self.high = low, high

    def __eq__(self, value):
        return value is not None and self.low <= value <= self.high

    def __repr__(self):
        return f"a time in [{self.low:.3f}, {self.high:.3f}]"


def chain_trace():
    # A read, 0.2 s of guest CPU, a write, 0.1 s, a read; the marker 0.15
    # s after the last completion.
    return make([Rq(0.00, 0.01, "R", 0, 4096),
                 Rq(0.21, 0.22, "W", 4096, 100),
                 Rq(0.32, 0.33, "R", 8192, 512)], boot_s=0.48,
                vm_start_s=-1.0)


def test_replay_at_recorded_speed_reproduces_the_boot():
    dev = SlowMemory(0.01)
    result = run_replay(chain_trace(), dev)
    assert not result["failed"] and result["error"] is None
    assert result["boot_s"] == near_late(0.48)
    assert result["boot_from_vm_start_s"] == near_late(1.48)
    assert result["requests"] == 3 and result["errors"] == 0
    assert result["bytes_read"] == 4608 and result["bytes_written"] == 100
    assert dev.log == [("R", 0), ("W", 4096), ("R", 8192)]
    # Deterministic write bytes.
    assert bytes(dev.data[4096:4196]) == bytes(replay._payload(100))


def test_slow_device_delays_each_dependent_request():
    # 0.05 s per request instead of 0.01: each of the 3 links in the
    # chain costs 0.04 s more, the think times stay.
    result = run_replay(chain_trace(), SlowMemory(0.05))
    assert result["boot_s"] == near_late(0.48 + 3 * 0.04)


def test_speed_divides_think_times():
    result = run_replay(chain_trace(), SlowMemory(0.01), speed=2.0)
    # Think times 0.2 + 0.1 + 0.15 halve; I/O stays 3 x 0.01.
    assert result["boot_s"] == near_late(0.03 + 0.225)


def test_overlapping_requests_overlap_again():
    # Two reads in flight together, then one that waited for the later.
    t = make([Rq(0.000, 0.010, "R", 0, 512),
              Rq(0.001, 0.011, "R", 512, 512),
              Rq(0.061, 0.071, "R", 1024, 512)], boot_s=0.081)
    dev = SlowMemory(0.1)
    result = run_replay(t, dev)
    assert dev.max_in_flight == 2
    # Both first reads end at ~0.101, the third starts 0.05 later.
    assert result["boot_s"] == near_late(0.101 + 0.05 + 0.1 + 0.01)


def test_failed_request_fails_the_vm():
    dev = SlowMemory(0.001, fail_at=4096)
    result = run_replay(chain_trace(), dev)
    assert result["failed"] is True and result["boot_s"] is None
    assert "request 2 (W offset=4096 length=100) failed: disk on fire" \
        in result["error"]
    assert result["errors"] == 1
    assert [w for w, _ in dev.log] == ["R", "W"]     # the guest stopped


def test_skip_writes_for_read_only_devices():
    dev = SlowMemory(0.001)
    result = run_replay(chain_trace(), dev, skip_writes=True)
    assert not result["failed"] and result["bytes_written"] == 0
    assert [w for w, _ in dev.log] == ["R", "R"]


def test_no_marker_means_the_end_of_the_io():
    t = make([Rq(0.0, 0.01, "R", 0, 512), Rq(0.05, 0.06, "R", 0, 512)])
    result = run_replay(t, SlowMemory(0.01))
    assert result["boot_s"] == result["io_end_s"]
    assert result["boot_s"] == near_late(0.06)


def test_device_too_small_is_refused():
    with pytest.raises(ValueError, match="replay it against its own image"):
        run_replay(chain_trace(), SlowMemory(0, size=8192))


# -- chunks of huge reads; loading within limits (issue 10) ---------------

def _naive_chunks(t, cs):
    seen = {}
    for r in t.reads():
        if r.length:
            for i in range(r.offset // cs, (r.offset + r.length - 1) // cs
                           + 1):
                seen.setdefault(i, None)
    return list(seen)


def test_chunks_are_the_first_touch_order_of_the_plain_walk():
    import random
    rng = random.Random(7)
    for _ in range(300):
        reqs = []
        for n in range(rng.randint(0, 30)):
            off = rng.randrange(SIZE)
            length = rng.choice([0, 1, 512, 4096, rng.randrange(SIZE - off
                                                                + 1)])
            reqs.append(Rq(rng.random(), 1.0, rng.choice("RRRW"), off,
                           min(length, SIZE - off)))
        t = make(reqs)
        for cs in (512, 4096, 65536):
            assert t.chunks(cs) == _naive_chunks(t, cs)
            flat = [i for a, b in t.chunk_runs(cs) for i in range(a, b)]
            assert flat == t.chunks(cs)


def test_chunk_runs_of_a_huge_read_cost_nothing():
    huge = 1 << 62
    t = tr.Trace({"format": tr.FORMAT, "version": tr.VERSION,
                  "image_size": huge},
                 [Rq(0.0, 1.0, "R", 4096, huge - 4096),
                  Rq(0.5, 1.0, "R", 0, 8192)])
    assert t.chunk_runs(4096) == [(1, huge // 4096), (0, 1)]


def test_load_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "t.trace"
    os.mkfifo(fifo)
    for path, kind in ((str(fifo), "a FIFO"), (str(tmp_path), "a directory"),
                       ("/dev/zero", "a character device")):
        with pytest.raises(tr.TraceError,
                           match=f"not a regular file \\({kind}\\)"):
            tr.load(path)


def test_load_limits(tmp_path):
    good = [HEADER] + ["0 0.1 R 0 512"] * 10
    plain = write_lines(tmp_path / "t", *good)
    size = os.path.getsize(plain)
    gz = str(tmp_path / "t.gz")
    with gzip.open(gz, "wb") as f:
        f.write(("\n".join(good) + "\n").encode())
    # At the limits: read.
    assert len(tr.load(plain, max_file_bytes=size, max_text_bytes=size,
                       max_requests=10).requests) == 10
    assert len(tr.load(gz, max_text_bytes=size).requests) == 10
    for path, kwargs, message in [
            (plain, dict(max_file_bytes=size - 1),
             f"has {size} bytes; traces of at most {size - 1} bytes"),
            (plain, dict(max_text_bytes=size - 1),
             f"more than {size - 1} bytes"),
            (gz, dict(max_text_bytes=size - 1),
             f"more than {size - 1} bytes once decompressed"),
            (plain, dict(max_requests=9), "more than 9 requests")]:
        with pytest.raises(tr.TraceTooLarge, match=message):
            tr.load(path, **kwargs)


def test_long_bad_lines_are_cut_in_the_message(tmp_path):
    path = write_lines(tmp_path / "t", HEADER, "x" * 100000)
    with pytest.raises(tr.TraceError) as info:
        tr.load(path)
    assert len(str(info.value)) < 300
    assert "(100000 characters)" in str(info.value)


def test_deeply_nested_header_is_a_trace_error(tmp_path):
    path = write_lines(tmp_path / "t", "[" * 100000 + "]" * 100000)
    with pytest.raises(tr.TraceError, match="nested too deeply"):
        tr.load(path)
