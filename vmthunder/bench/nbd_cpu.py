"""CPU per NBD request of the warm read path, measured in one process.

The throughput benchmark (nbd_throughput) measures what clients get, and
on a shared 2-core machine that moves with everything else running. This
one measures what a request costs the server: an ``NbdConnection`` of the
real server, negotiated like a client would, is fed batches of ``--depth``
random ``--bs`` reads (as fio at that depth sends them) straight into
``data_received``; its replies leave through the real reply writer on a
socketpair drained in the same process. The export is a warm cache
(every chunk held and durable) over a pseudo-random image, or with
``--snapshot`` a VM's snapshot over it. CPU seconds (process time, the
drain included) divided by requests; best of ``--repeat``.

    python -m vmthunder.bench.nbd_cpu                   # 4K at depth 16
    python -m vmthunder.bench.nbd_cpu --tree OLD_TREE   # another tree's
    python -m vmthunder.bench.nbd_cpu --smoke           # CI, ~1 s

The last line of output is one JSON object (``us_per_request``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

KiB, MiB = 1 << 10, 1 << 20


class _Transport:
    """What NbdConnection asks of an asyncio transport, on a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closing = False

    def get_extra_info(self, name, default=None):
        return {"socket": self.sock,
                "peername": ("127.0.0.1", 0)}.get(name, default)

    def write(self, data):
        self.sock.sendall(data)

    def writelines(self, parts):
        for part in parts:
            self.write(part)

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closing = True

    abort = close


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", 0x49484156454F5054, option, len(data)) + data


async def measure(args, workdir: str) -> dict:
    from vmthunder.bench.nbd_throughput import make_image
    from vmthunder.cache.cache_layer import CacheLayer
    from vmthunder.cache.snapshot import SnapshotLayer
    from vmthunder.nbd import constants as c
    from vmthunder.nbd import server as nbd_server
    from vmthunder.volume.file_source import FileSource

    image = os.path.join(workdir, "image.raw")
    make_image(image, args.size, seed=3)
    cache = CacheLayer(FileSource(image), os.path.join(workdir, "cache"),
                       chunk_size=256 * KiB)
    for offset in range(0, cache.size, 2 * MiB):
        await cache.read(offset, min(2 * MiB, cache.size - offset))
    while not cache.map.all_present(0, cache.chunks):
        await asyncio.sleep(0.01)            # durable and marked: warm
    device = cache
    if args.snapshot:
        device = SnapshotLayer(cache, os.path.join(workdir, "snaps"), "vm")
    server = nbd_server.NbdServer()
    server.add_export("img", device, read_only=not args.snapshot)
    mine, peer = socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    peer.setblocking(False)
    conn = nbd_server.NbdConnection(server)
    conn.connection_made(_Transport(mine))
    # Fixed newstyle, no zeroes; structured replies; go to "img".
    conn.data_received(struct.pack(">I", 3) + _option(c.OPT_STRUCTURED_REPLY)
                       + _option(c.OPT_GO, struct.pack(">I", 3) + b"img"
                                 + struct.pack(">H", 0)))
    await asyncio.sleep(0.01)

    def drain():
        try:
            while peer.recv(4 * MiB):
                pass
        except BlockingIOError:
            pass
    drain()
    rng = random.Random(1)
    blocks = device.size // args.bs
    batches, handle = [], 0
    for _ in range(max(1, args.requests // args.depth)):
        batch = b""
        for _ in range(args.depth):
            handle += 1
            batch += struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ,
                                 handle, rng.randrange(blocks) * args.bs,
                                 args.bs)
        batches.append(batch)
    samples = []
    for _ in range(args.repeat):
        start = time.process_time()
        for batch in batches:
            conn.data_received(batch)
            await asyncio.sleep(0)          # the writer's flush
            drain()
        samples.append(time.process_time() - start)
    requests = len(batches) * args.depth
    counters = device.counters
    conn.connection_lost(None)
    mine.close()
    peer.close()
    if args.snapshot:
        await device.close()
    await cache.close()
    return {"us_per_request": round(min(samples) / requests * 1e6, 3),
            "samples_us": [round(s / requests * 1e6, 3) for s in samples],
            "requests": requests, "read_requests_counted":
            counters["read_requests"]}


def build_parser() -> argparse.ArgumentParser:
    from vmthunder.sizes import parse_size
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.nbd_cpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=256 * MiB,
                   help="image size (default 256M)")
    p.add_argument("--bs", type=parse_size, default=4 * KiB,
                   help="read size (default 4K)")
    p.add_argument("--depth", type=int, default=16,
                   help="requests per batch (default 16, as fio's iodepth)")
    p.add_argument("--requests", type=int, default=200_000,
                   help="requests per repeat (default 200000)")
    p.add_argument("--repeat", type=int, default=5,
                   help="repeats; the lowest CPU counts (default 5)")
    p.add_argument("--snapshot", action="store_true",
                   help="serve a VM's snapshot over the cache")
    p.add_argument("--tree", metavar="DIR",
                   help="measure the vmthunder of another tree (runs "
                        "this module's code against it in a subprocess)")
    p.add_argument("--smoke", action="store_true",
                   help="CI mode: 16 MiB, 20000 requests, 2 repeats")
    p.add_argument("--workdir", metavar="DIR",
                   help="where the temporary work directory goes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.size, args.requests, args.repeat = 16 * MiB, 20_000, 2
    if args.tree:
        # This file, run with the other tree first on the path.
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.tree))
        forward = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = forward.index("--tree")
        del forward[i:i + 2]
        return subprocess.call([sys.executable, os.path.abspath(__file__),
                                *forward], env=env, cwd=args.tree)
    workdir = tempfile.mkdtemp(prefix="nbd-cpu-", dir=args.workdir or None)
    try:
        result = asyncio.run(measure(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import vmthunder
    result.update(tree=os.path.dirname(os.path.dirname(
        os.path.abspath(vmthunder.__file__))), bs=args.bs, depth=args.depth,
        snapshot=args.snapshot, smoke=args.smoke)
    print(f"{result['us_per_request']:.2f} us of CPU per {args.bs // KiB} "
          f"KiB read at depth {args.depth} ({result['tree']})")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
