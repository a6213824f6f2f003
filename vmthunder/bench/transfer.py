"""vmthunder.transfer against the well-known tool of each transport.

One run, one image (raw, part random data, part holes, part allocated
zeros), every copy to a file in the work directory, source warm in the
page cache:

====== ====================================== ==============================
driver vmthunder.transfer.copy(SRC, DST)      peers (the faster one counts)
====== ====================================== ==============================
file   PATH -> file                           cp --sparse=always;
                                              qemu-img convert -O raw
nbd    qemu-nbd (unix socket) -> file         nbdcopy
iscsi  export:NAME on tgtd, manifest checked  qemu-img convert from
                                              iscsi:// (no check)
http   aiohttp web server (ranges) -> file    curl
====== ====================================== ==============================

Every copy ends durable: ours fdatasyncs before its rename, so each
peer's time includes ``sync FILE`` of its output (nbdcopy: ``--flush``).
Ours is timed in this process (what a library caller waits), the peers
as processes; ours is also timed without the digest of what was written
(``digest=None``, the peers compute none), beside, not in the ratio.
Runs are interleaved (ours, peer, peer, ours, ...) and the best of
``--repeat`` is kept; every output is compared with the image
once. The table goes to stdout, its last line one JSON object: per
driver our seconds, each peer's, and ``DRIVER_ratio`` (ours over the
faster peer; the target is at most 1.1). iscsi needs root and tgtd, and
is left out (said so) without them.

    python -m vmthunder.bench.transfer             # 1 GiB
    python -m vmthunder.bench.transfer --smoke     # CI: 32 MiB, one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from vmthunder.sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30
TARGET = 1.1
# Ours again without the digest of what was written (digest=None): what
# the digest costs (the peers compute none). The ratio is the default's.
NO_DIGEST = "vmthunder, no digest"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
IQN_PREFIX = "iqn.2026-12.org.vmthunder.bench"

HTTP_SERVER = """
import sys
from aiohttp import web
path, port = sys.argv[1], int(sys.argv[2])
async def image(request):
    return web.FileResponse(path)
app = web.Application()
app.router.add_get("/image", image)
web.run_app(app, host="127.0.0.1", port=port, print=None,
            access_log=None)
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_image(path: str, size: int, seed: int = 7) -> None:
    """Per 8 MiB: 4 MiB random data, 1 MiB of written zeros, 3 MiB
    hole (the last piece cut to ``size``)."""
    rng = random.Random(seed)
    pool = rng.randbytes(17 * MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for base in range(0, size, 8 * MiB):
            f.seek(base)
            for i in range(4):
                if base + (i + 1) * MiB > size:
                    break
                off = rng.randrange(0, 16 * MiB)
                f.write(pool[off:off + MiB])
            if base + 5 * MiB <= size:
                f.write(bytes(MiB))
        f.flush()
        os.fsync(f.fileno())


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        while f.readinto(buf):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(address, proc, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        with socket.socket(family) as s:
            try:
                s.connect(address)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen in {timeout:g} s")
        time.sleep(0.05)


def same_files(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- one copy ---------------------------------------------------------------

def ours(src: str, dst: str, options: dict) -> float:
    from vmthunder import transfer
    remove(dst)
    t0 = time.monotonic()
    transfer.copy(src, dst, **options).wait()
    return time.monotonic() - t0


def peer(argv: list[str], dst: str, sync: bool = True) -> float:
    remove(dst)
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-500:]}")
    if sync:
        subprocess.run(["sync", dst], check=True)
    return time.monotonic() - t0


class Driver:
    """One transport: our copy and its peers' commands."""

    def __init__(self, name: str, src_uri: str, peers: dict,
                 options: dict | None = None):
        self.name = name
        self.src_uri = src_uri
        self.peers = peers          # label -> (argv with DST, sync)
        self.options = options or {}


def measure(driver: Driver, image: str, workdir: str, repeat: int
            ) -> dict:
    dst = os.path.join(workdir, f"out-{driver.name}.raw")
    times = {"vmthunder": [], NO_DIGEST: []}
    for label in driver.peers:
        times[label] = []
    checked = set()
    for r in range(repeat):
        order = ["vmthunder", *driver.peers, NO_DIGEST]
        if r % 2:
            order.reverse()
        for who in order:
            if who == "vmthunder":
                seconds = ours(driver.src_uri, dst, driver.options)
            elif who == NO_DIGEST:
                seconds = ours(driver.src_uri, dst,
                               dict(driver.options, digest=None))
            else:
                argv, sync = driver.peers[who]
                seconds = peer([a.replace("{dst}", dst) for a in argv],
                               dst, sync)
            times[who].append(seconds)
            if who not in checked:
                if not same_files(image, dst):
                    raise RuntimeError(f"{driver.name}: {who}'s copy "
                                       "differs from the image")
                checked.add(who)
            remove(dst)
    best = {who: min(ts) for who, ts in times.items()}
    fastest = min(driver.peers, key=lambda p: best[p])
    return {"vmthunder_s": round(best["vmthunder"], 4),
            "vmthunder_no_digest_s": round(best[NO_DIGEST], 4),
            "ratio_no_digest": round(best[NO_DIGEST] / best[fastest], 3),
            "peers_s": {p: round(best[p], 4) for p in driver.peers},
            "faster_peer": fastest,
            "ratio": round(best["vmthunder"] / best[fastest], 3),
            "runs_s": {w: [round(t, 4) for t in ts]
                       for w, ts in times.items()}}


# -- the transports -------------------------------------------------------

class Servers(contextlib.ExitStack):
    """Servers started for the run; all stopped at exit."""

    def popen(self, argv: list[str], log_path: str, **kw
              ) -> subprocess.Popen:
        with open(log_path, "w") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err,
                                    start_new_session=True, **kw)

        def stop():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

        self.callback(stop)
        return proc


def file_driver(image: str) -> Driver:
    peers = {"cp --sparse=always": (["cp", "--sparse=always", image,
                                     "{dst}"], True)}
    if shutil.which("qemu-img"):
        peers["qemu-img convert"] = (["qemu-img", "convert", "-f", "raw",
                                      "-O", "raw", image, "{dst}"], True)
    return Driver("file", image, peers)


def nbd_driver(image: str, workdir: str, servers: Servers) -> Driver:
    sock = os.path.join(workdir, "qemu-nbd.sock")
    proc = servers.popen(["qemu-nbd", "-f", "raw", "-r", "-x", "img",
                          "--persistent", "--shared=32", "-k", sock, image],
                         os.path.join(workdir, "qemu-nbd.log"))
    wait_listening(sock, proc, "qemu-nbd")
    uri = f"nbd+unix:///img?socket={sock}"
    return Driver("nbd", uri, {"nbdcopy": (["nbdcopy", "--flush", uri,
                                            "{dst}"], False)})


def http_driver(image: str, workdir: str, servers: Servers) -> Driver:
    port = free_port()
    proc = servers.popen([sys.executable, "-c", HTTP_SERVER, image,
                          str(port)], os.path.join(workdir, "http.log"))
    wait_listening(("127.0.0.1", port), proc, "aiohttp web server")
    url = f"http://127.0.0.1:{port}/image"
    return Driver("http", url, {"curl": (["curl", "-sSf", "-o", "{dst}",
                                          url], True)})


def iscsi_driver(image: str, workdir: str, servers: Servers) -> Driver:
    from vmthunder.volume import tgt as tgt_mod
    export_dir = os.path.join(workdir, "exports")
    portal = f"127.0.0.1:{free_port()}"
    while True:
        control = random.randrange(20000, 32768)
        if not os.path.exists(f"/var/run/tgtd/socket.{control}"):
            break
    conf = os.path.join(workdir, "vmthunder.conf")
    with open(conf, "w") as f:
        f.write(f"[export]\nexport_dir = {export_dir}\nportal = {portal}\n"
                f"tgtd_control_port = {control}\n"
                f"iqn_prefix = {IQN_PREFIX}\n")

    def stop_tgtd():
        with contextlib.suppress(Exception):
            tgt_mod.Tgt(control, portal, export_dir).stop()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{control}{suffix}")

    servers.callback(stop_tgtd)
    proc = subprocess.run([sys.executable, "-m", "vmthunder.cli",
                           "--config-file", conf, "export", image,
                           "--name", "bench"], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"vmthunder export failed: {proc.stderr}")
    url = f"iscsi://{portal}/{IQN_PREFIX}:bench/1"
    return Driver("iscsi", "export:bench",
                  {"qemu-img convert": (["qemu-img", "convert", "-f", "raw",
                                         "-O", "raw", url, "{dst}"], True)},
                  {"config_file": conf})


# -- main -------------------------------------------------------------------

def run(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="transfer-bench-",
                               dir=args.workdir)
    import vmthunder.transfer.task  # noqa: F401  (imports are not timed)
    report: dict = {"size": args.size, "repeat": args.repeat,
                    "target_ratio": TARGET, "skipped": {}}
    try:
        image = os.path.join(workdir, "image.raw")
        log(f"image: {args.size // MiB} MiB (half data, 1/8 zeros, 3/8 "
            "holes)")
        make_image(image, args.size)
        warm(image)
        with Servers() as servers:
            drivers = [file_driver(image)]
            for name, need, make in (
                    ("nbd", ("qemu-nbd", "nbdcopy"), nbd_driver),
                    ("http", ("curl",), http_driver),
                    ("iscsi", ("tgtd", "tgtadm", "qemu-img"),
                     iscsi_driver)):
                missing = [b for b in need if shutil.which(b) is None]
                if name == "iscsi" and os.geteuid() != 0:
                    missing.append("root")
                if name not in args.drivers:
                    continue
                if missing:
                    report["skipped"][name] = "needs " + ", ".join(missing)
                    log(f"{name}: skipped ({report['skipped'][name]})")
                    continue
                drivers.append(make(image, workdir, servers))
            for driver in drivers:
                if driver.name not in args.drivers:
                    continue
                log(f"{driver.name}: {args.repeat} run(s) each")
                figures = measure(driver, image, workdir, args.repeat)
                report[driver.name] = figures
                report[f"{driver.name}_ratio"] = figures["ratio"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {k: v for k, v in report.items() if k.endswith("_ratio")
              and k != "target_ratio"}
    report["worst_ratio"] = max(ratios.values()) if ratios else None
    report["meets_target"] = all(r <= TARGET for r in ratios.values())
    return report


def print_table(report: dict) -> None:
    size = report["size"]
    print(f"{'driver':7} {'vmthunder':>10} {'peer':>18} {'peer s':>8} "
          f"{'ratio':>6}  MiB/s (ours)  no digest (ratio)")
    for name in ("file", "nbd", "iscsi", "http"):
        if name not in report:
            if name in report["skipped"]:
                print(f"{name:7} skipped: {report['skipped'][name]}")
            continue
        f = report[name]
        peer = f["faster_peer"]
        print(f"{name:7} {f['vmthunder_s']:>9.3f}s {peer:>18} "
              f"{f['peers_s'][peer]:>7.3f}s {f['ratio']:>6.2f}  "
              f"{size / MiB / f['vmthunder_s']:>12.0f}  "
              f"{f['vmthunder_no_digest_s']:.3f}s "
              f"({f['ratio_no_digest']:.2f})")
        for other, seconds in f["peers_s"].items():
            if other != peer:
                print(f"{'':7} {'':>10} {other:>18} {seconds:>7.3f}s")
    verdict = "meets" if report["meets_target"] else "misses"
    print(f"worst ratio {report['worst_ratio']} ({verdict} the target "
          f"<= {TARGET})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.transfer",
        description="Copy time of each vmthunder.transfer driver against "
                    "the usual tool for its transport (cp/qemu-img, "
                    "nbdcopy, qemu-img from iscsi://, curl), one image, "
                    "one run; a table and a last line of JSON.")
    p.add_argument("--size", type=parse_size, default=GiB,
                   help="image size (default 1G)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per tool, best kept (default 3)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where the image and copies go (a temporary "
                        "directory inside it, removed at the end)")
    p.add_argument("--drivers", default="file,nbd,iscsi,http",
                   help="comma-separated subset (default all)")
    p.add_argument("--smoke", action="store_true",
                   help="32 MiB, one run: for CI")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.size, args.repeat = 32 * MiB, 1
    args.size -= args.size % MiB
    args.drivers = [d.strip() for d in args.drivers.split(",")]
    report = run(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
