"""Replay a block trace as a "virtual VM": its I/O, with its think times.

A real boot under TCG spends most of its time on guest CPU. Replaying the
trace instead keeps the I/O pattern and the pauses between requests but
costs almost no CPU, so dozens of virtual VMs fit on a small host.

Timing model. Request i was issued at t_i and completed at c_i. Its
dependency is the request whose completion came last before t_i (see
Trace.dependencies); the gap is guest think time. In replay, i is issued
think_i / speed after its dependency's *replayed* completion, and never
before request i-1 (issue order is kept). A slower device so delays every
later request the way it would have delayed the guest, a faster one
shortens the boot; requests that overlapped in the recording overlap
again (they share a dependency). The boot marker is placed the same way:
its recorded gap after the last completion before it.

Sleeps: asyncio's timers wake with millisecond granularity; the replay
aims half a millisecond early, so the error per gap is +-0.5 ms rather
than up to 1 ms late every time.

    python -m vmthunder.bench.replay TRACE --nbd URI [--speed 1.0]

prints one JSON object: boot_s, bytes_read, bytes_written, requests,
errors, failed, error. A VM whose request failed is reported failed
(boot_s null), never as a fast boot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from vmthunder import trace as trace_mod
from vmthunder.blockdev import BlockError

# asyncio's timers fire up to 1 ms late (epoll's timeout is rounded up to
# whole milliseconds): aiming this much early makes the error +-0.5 ms
# instead of 0..1 ms late, so it does not add up along a boot's chain of
# dependent requests. Shorter gaps are not slept at all.
_TIMER_SLACK_S = 0.0005
_PATTERN = b"vmthunder replay write\n" * 64


def _payload(length: int) -> memoryview:
    """Deterministic bytes for a write: the trace keeps sizes, not data."""
    reps = -(-length // len(_PATTERN))
    return memoryview(_PATTERN * reps)[:length]


async def replay(trace: trace_mod.Trace, device, *, speed: float = 1.0,
                 skip_writes: bool = False) -> dict:
    """Replay ``trace`` against ``device``: anything with the blockdev
    methods (read, write, flush, trim, write_zeroes), e.g. an NbdClient,
    an IscsiSource or a CacheLayer. ``skip_writes`` completes W/T/Z/F at
    once without sending them (for read-only devices)."""
    if speed <= 0:
        raise ValueError(f"speed {speed}: must be > 0")
    reqs = trace.requests
    extent = max((r.offset + r.length for r in reqs), default=0)
    if extent > device.size:
        raise ValueError(f"trace reaches byte {extent} but the device is "
                         f"{device.size} bytes: replay it against its own "
                         f"image ({trace.header.get('image')})")
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in reqs]     # replayed completions
    deps = trace.dependencies()
    stats = {"bytes_read": 0, "bytes_written": 0, "requests": 0,
             "errors": 0}
    read_latency: list[float] = []
    failure: list[str] = []
    tasks = set()

    async def run_one(i: int, r: trace_mod.Request) -> None:
        try:
            if r.op == "R":
                t0 = loop.time()
                data = await device.read(r.offset, r.length)
                read_latency.append(loop.time() - t0)
                if len(data) != r.length:
                    raise OSError(f"read at {r.offset} returned {len(data)} "
                                  f"of {r.length} bytes")
                stats["bytes_read"] += r.length
            elif not skip_writes:
                if r.op == "W":
                    await device.write(r.offset, _payload(r.length))
                    stats["bytes_written"] += r.length
                elif r.op == "F":
                    await device.flush()
                elif r.op == "T":
                    await device.trim(r.offset, r.length)
                elif r.op == "Z":
                    await device.write_zeroes(r.offset, r.length)
        except Exception as exc:            # noqa: BLE001 - the VM fails
            stats["errors"] += 1
            if not failure:
                failure.append(f"request {i + 1} ({r.op} offset={r.offset} "
                               f"length={r.length}) failed: {exc}")
        finally:
            done[i].set_result(loop.time())

    start = loop.time()
    try:
        for i, r in enumerate(reqs):
            dep, think = deps[i]
            base = await done[dep] if dep >= 0 else start
            delay = base + think / speed - loop.time()
            if delay > _TIMER_SLACK_S:
                await asyncio.sleep(delay - _TIMER_SLACK_S)
            if failure:
                break               # a guest whose disk failed stops
            stats["requests"] += 1
            task = asyncio.ensure_future(run_one(i, r))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(list(tasks))
    finally:
        for task in tasks:          # cancelled from outside: stop them
            task.cancel()
    end = loop.time()

    result = {"image": trace.header.get("image"), "speed": speed,
              "skip_writes": skip_writes, **stats,
              "recorded_boot_s": trace.boot_s, "failed": bool(failure),
              # Where a slow boot waited: its reads' latencies.
              "read_wait_s": round(sum(read_latency), 6),
              "read_ms": _percentiles_ms(read_latency),
              "error": failure[0] if failure else None,
              "boot_s": None, "io_end_s": round(end - start, 6)}
    if failure:
        return result
    if trace.boot_s is None:
        # No marker recorded: the boot is over when its I/O is.
        result["boot_s"] = result["io_end_s"]
    else:
        # The marker: its recorded gap after the last completion before.
        dep, think = trace.dependencies(at=[trace.boot_s])[0]
        base = done[dep].result() if dep >= 0 else start
        result["boot_s"] = round(base + think / speed - start, 6)
    lead_in = trace.header.get("vm_start_s")
    if lead_in is not None:
        # QEMU ran this long (guest CPU) before the first request: the
        # boot as `vmthunder boot` times it.
        result["boot_from_vm_start_s"] = round(
            result["boot_s"] - lead_in / speed, 6)
    return result


async def replay_nbd(trace: trace_mod.Trace, uri: str, **kwargs) -> dict:
    """Replay against an NBD export (nbd://HOST:PORT/NAME or
    nbd+unix:///NAME?socket=PATH) over one connection, as QEMU does."""
    from vmthunder.nbd.client import open_nbd
    client = await open_nbd(uri)
    try:
        return await replay(trace, client, **kwargs)
    finally:
        await client.close()


def _percentiles_ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1,
                                 int(q * len(ordered)))] * 1e3, 3)
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(ordered[-1] * 1e3, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.replay",
        description="Replay a block trace as one virtual VM against an NBD "
                    "export; print the result as JSON.")
    parser.add_argument("trace", help="trace file (vmthunder boot --trace)")
    parser.add_argument("--nbd", required=True, metavar="URI",
                        help="export to replay against: "
                             "nbd://HOST:PORT/NAME or "
                             "nbd+unix:///NAME?socket=PATH; writes go to "
                             "it, so give a VM's snapshot export")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="divide think times by this: 2 is a guest "
                             "CPU twice as fast as the recording's "
                             "(default 1)")
    parser.add_argument("--skip-writes", action="store_true",
                        help="do not send writes, trims, flushes (for a "
                             "read-only export)")
    args = parser.parse_args(argv)
    try:
        trace = trace_mod.load(args.trace)
        result = asyncio.run(replay_nbd(trace, args.nbd, speed=args.speed,
                                        skip_writes=args.skip_writes))
    except (trace_mod.TraceError, ValueError, OSError, BlockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
