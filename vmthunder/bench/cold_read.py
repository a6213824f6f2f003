"""Cold verified whole-image read: `vmthunder serve` vs QEMU's libiscsi.

One run, one private tgtd on a free loopback port, one export made as
`vmthunder export` makes it (LUN 1 the image, LUN 2 its manifest) with the
export's default chunk size (``[export] chunk_size``, 8 KiB). The backing
files are read once first, so tgtd serves both contenders from the page
cache.

- **qemu**: ``qemu-img convert -n -f raw iscsi://... --target-image-opts
  driver=null-co,size=N`` (QEMU's own libiscsi driver, no cache, nothing
  verified).
- **vmthunder**: ``vmthunder serve iscsi://...`` with a fresh, empty cache
  directory every time; the same ``qemu-img convert`` (or ``nbdcopy
  --no-extents``, ``--client nbdcopy``) reads its NBD export on loopback
  TCP. Every chunk is fetched from tgtd, checked against its manifest
  digest and stored in the cache; the run fails unless exactly the
  image's bytes were fetched, with no verify error.

Timed: the client run only (`serve` is logged in and ready before; its
start-up is reported apart). Contenders take turns within each repeat and
the best of ``--repeat`` counts (noise on a shared machine only ever slows
a run down); medians and samples are in the JSON. The CPU seconds of
every process on each path (client, tgtd, serve) are reported too: on
this many cores no schedule can finish before their sum / cores
(``cpu_floor_ratio``).

``cold_read_ratio`` = vmthunder / qemu, target <= 1.25. The last line of
output is one JSON object.

    python -m vmthunder.bench.cold_read               # 512 MiB, ~30 s
    python -m vmthunder.bench.cold_read --smoke       # CI: 32 MiB, ~5 s
    python -m vmthunder.bench.cold_read --profile p.txt   # + py-spy run

Needs root, tgt and qemu-img (and nbdcopy for ``--client nbdcopy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from vmthunder import opts as opts_mod
from vmthunder.bench import iscsi_origin as io
from vmthunder.bench.nbd_throughput import code_state, make_image
from vmthunder.sizes import parse_size

KiB, MiB = 1 << 10, 1 << 20
TARGET = 1.25


def log(msg: str) -> None:
    print(f"[cold_read] {msg}", file=sys.stderr, flush=True)


def recycle_page_cache(size: int, workdir: str) -> None:
    """Write ``size`` bytes to a file and delete it, so that the next
    page-cache writes reuse the pages just freed.

    This machine is a VM that gives free memory back to its host a few
    seconds after it is freed (virtio_balloon free page reporting). The
    first write to such a page costs a fault in the host (and a large
    page-cache folio a fresh, unfragmented block): the cache's writes of
    a cold read into never-used memory cost ~2.4 CPU-s per GiB here,
    against ~0.2 into recycled page cache (docs/benchmarks.md). A host
    that has been running keeps its memory as page cache and recycles
    it; this puts each read in that state, whatever ran before.
    """
    if size <= 0:
        return
    path = os.path.join(workdir, "recycle.tmp")
    piece = bytes(2 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, size, len(piece)):
            os.pwrite(fd, piece, off)
    finally:
        os.close(fd)
        os.unlink(path)


def client_argv(client: str, src: str, size: int) -> list[str]:
    if client == "nbdcopy":
        return ["nbdcopy", "--no-extents", src, "null:"]
    return ["qemu-img", "convert", "-n", "-f", "raw", src,
            "--target-image-opts", f"driver=null-co,size={size}"]


def _attach(kind: str, path: str, workdir: str):
    """attach(pid) for cold_read_vmthunder: perf record -g or strace -c
    of serve for the read."""
    if kind == "perf":
        argv = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g",
                "-o", os.path.abspath(path), "-p"]
    else:                                 # strace -c: syscall counts
        argv = ["strace", "-c", "-f", "-o", os.path.abspath(path), "-p"]

    def attach(pid: int) -> subprocess.Popen:
        log(f"{kind} on vmthunder serve (pid {pid}) into {path}")
        with open(os.path.join(workdir, f"{kind}.log"), "w") as out:
            proc = subprocess.Popen(argv + [str(pid)], stdout=out,
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        time.sleep(1.0)                   # let it attach
        return proc
    return attach


def read_vmthunder(url: str, size: int, workdir: str, conf: str, tag: str,
                   client: str, tgtd_pid, profile=None,
                   repo: str = io.REPO) -> dict:
    """One cold read through a fresh `vmthunder serve` (of the tree
    ``repo``); ``profile``: (kind, path) of a profiler to attach to serve
    for the read (py-spy, perf or strace)."""
    kind, path = profile or (None, None)
    return io.cold_read_vmthunder(
        url, size, workdir, conf, tag, tgtd_pid,
        profile=path if kind == "py-spy" else None, repo=repo,
        read=lambda uri, n: io.run_timed(client_argv(client, uri, n)),
        attach=_attach(kind, path, workdir) if kind in ("perf", "strace")
        else None)


def run_benchmark(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="cold-read-", dir=args.workdir or None)
    origin = None
    try:
        conf = os.path.join(workdir, "vmthunder.conf")
        with open(conf, "w") as f:
            f.write("[iscsi]\nmanifest_lun = 2\n")
        image = os.path.join(workdir, "image.raw")
        log(f"making a {args.size} byte pseudo-random image")
        make_image(image, args.size, seed=1)
        origin = io.Origin(workdir)
        log(f"exporting it with {args.chunk_size} byte chunks")
        url = origin.export(image, "cold", args.chunk_size)
        os.unlink(image)                   # the export holds a copy
        runs = {"qemu": [], "vmthunder": []}
        if args.baseline:
            runs["baseline"] = []
        trees = {"vmthunder": io.REPO}
        if args.baseline:
            trees["baseline"] = args.baseline
        for r in range(args.repeat):
            recycle_page_cache(args.recycle, workdir)
            runs["qemu"].append(io.cold_read_qemu(url, args.size,
                                                  origin.tgtd_pid()))
            # The two serves change places every repeat: the one that
            # runs right after the other's cache was deleted gets its
            # freed page cache (see recycle_page_cache).
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for who in order:
                recycle_page_cache(args.recycle, workdir)
                runs[who].append(read_vmthunder(
                    url, args.size, workdir, conf, f"{who}{r}",
                    args.client, origin.tgtd_pid(), repo=trees[who]))
            log(f"repeat {r + 1}: " + ", ".join(
                f"{who} {samples[-1]['seconds']:.3f} s"
                for who, samples in runs.items()))
        profiles = {}
        for kind, path in (("py-spy", args.profile), ("perf", args.perf),
                           ("strace", args.strace)):
            if path:
                res = read_vmthunder(url, args.size, workdir, conf, kind,
                                     args.client, origin.tgtd_pid(),
                                     profile=(kind, path))
                profiles[kind] = {"file": os.path.abspath(path),
                                  "cold_read_s_while_profiled":
                                  res["seconds"],
                                  "cpu_s_while_profiled": res["cpu_s"]}
                if kind == "py-spy":
                    profiles[kind]["top_leaf_frames"] = \
                        io.summarize_profile(path)
        return build_report(args, runs, profiles)
    finally:
        if origin is not None:
            origin.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def build_report(args, runs: dict, profiles: dict) -> dict:
    qemu, vm = io.summary(runs["qemu"]), io.summary(runs["vmthunder"])
    best = {who: min(samples, key=lambda s: s["seconds"])
            for who, samples in runs.items()}
    cores = os.cpu_count() or 1
    vm_cpu = best["vmthunder"]["cpu_s"]["total"]
    gib = args.size / (1 << 30)
    ratio = round(vm["best"] / qemu["best"], 4)
    serve_cpu = best["vmthunder"]["cpu_s"]["serve"]
    chunks = -(-args.size // args.chunk_size)
    report = {
        "cold_read_ratio": ratio,
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "qemu_cold_read_s": qemu["best"],
        "vmthunder_cold_read_s": vm["best"],
        "qemu_mb_s": round(args.size / qemu["best"] / 1e6, 1),
        "vmthunder_mb_s": round(args.size / vm["best"] / 1e6, 1),
        "cpu_s": {"qemu": best["qemu"]["cpu_s"],
                  "vmthunder": best["vmthunder"]["cpu_s"], "cores": cores},
        # No schedule beats the CPU all processes need / the cores.
        "cpu_floor_ratio": round(vm_cpu / cores / qemu["best"], 3),
        "serve_cpu_s_per_gib": round(serve_cpu / gib, 3),
        "serve_cpu_us_per_chunk": round(serve_cpu / chunks * 1e6, 2),
        "serve_threads_cpu_s": best["vmthunder"]["serve_threads_cpu_s"],
        "serve_start_s": min(s["serve_start_s"] for s in runs["vmthunder"]),
        "chunk_size": args.chunk_size,
        "chunks": chunks,
        "source_reads": best["vmthunder"]["source_reads"],
        "source_commands": best["vmthunder"]["source_commands"],
        "raw": {"qemu": runs["qemu"], "vmthunder": runs["vmthunder"],
                "summary": {"qemu": qemu, "vmthunder": vm}},
        "method": {
            "pick": "best of repeats (lowest time); median in raw",
            "qemu": "qemu-img convert -n -f raw iscsi://... "
                    "--target-image-opts driver=null-co,size=N",
            "vmthunder": " ".join(client_argv(args.client, "NBD-URI",
                                              args.size))
            + " against vmthunder serve iscsi://... (fresh cache; every "
              "chunk fetched, verified, stored)",
            "timed": "client run only; serve ready before",
            "origin": "private tgtd on loopback; backing file in page "
                      "cache",
        },
        "params": {"size": args.size, "chunk_size": args.chunk_size,
                   "repeat": args.repeat, "client": args.client,
                   "recycle": args.recycle, "smoke": args.smoke},
        "code": code_state(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if "baseline" in runs:
        base = io.summary(runs["baseline"])
        b = min(runs["baseline"], key=lambda s: s["seconds"])
        report["baseline"] = {
            "tree": os.path.abspath(args.baseline),
            "cold_read_s": base["best"],
            "cold_read_ratio": round(base["best"] / qemu["best"], 4),
            "cpu_s": b["cpu_s"],
            "serve_cpu_s_per_gib": round(b["cpu_s"]["serve"] / gib, 3)}
        report["raw"]["baseline"] = runs["baseline"]
        report["raw"]["summary"]["baseline"] = base
    if profiles:
        report["profiles"] = profiles
    return report


def print_table(report: dict) -> None:
    p = report["params"]
    cpu = report["cpu_s"]
    print(f"cold verified read of {p['size'] / MiB:.0f} MiB in "
          f"{p['chunk_size'] // KiB} KiB chunks ({p['client']} through "
          f"vmthunder serve; qemu-img from iscsi://), best of {p['repeat']}")
    print(f"{'':10} {'seconds':>8} {'MB/s':>7} {'CPU s':>6}  (client, "
          "tgtd, serve)")
    for who in ("qemu", "vmthunder"):
        c = cpu[who]
        print(f"{who:10} {report[who + '_cold_read_s']:8.3f} "
              f"{report[who + '_mb_s']:7.0f} {c['total']:6.2f}  "
              f"({c['client']:.2f}, {c['tgtd']:.2f}, "
              f"{c.get('serve', 0):.2f})")
    if "baseline" in report:
        b = report["baseline"]
        c = b["cpu_s"]
        print(f"{'baseline':10} {b['cold_read_s']:8.3f} "
              f"{p['size'] / b['cold_read_s'] / 1e6:7.0f} "
              f"{c['total']:6.2f}  ({c['client']:.2f}, {c['tgtd']:.2f}, "
              f"{c['serve']:.2f})  ratio {b['cold_read_ratio']:.2f}: "
              f"{b['tree']}")
    t = report["serve_threads_cpu_s"]
    print(f"serve's CPU: event loop {t['loop']:.2f} s, other threads "
          f"{t['workers']:.2f} s")
    print(f"ratio {report['cold_read_ratio']:.2f} (target <= {TARGET}; "
          f"met: {report['target_met']}); on {cpu['cores']} cores the CPU "
          f"alone allows {report['cpu_floor_ratio']:.2f}; serve "
          f"{report['serve_cpu_s_per_gib']:.2f} CPU-s/GiB, "
          f"{report['serve_cpu_us_per_chunk']:.1f} us/chunk")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.cold_read",
        description=__doc__.split("\n\n")[0],
        epilog="The last line of output is one JSON object "
               "(cold_read_ratio, target 1.25).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=512 * MiB,
                   help="image size (default 512M)")
    p.add_argument("--chunk-size", type=parse_size,
                   default=opts_mod.DEFAULT_EXPORT_CHUNK_SIZE,
                   help="the export's chunk size (default: [export] "
                        "chunk_size's default, 8K)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per contender, interleaved; best counts "
                        "(default 3)")
    p.add_argument("--client", choices=("qemu-img", "nbdcopy"),
                   default="qemu-img",
                   help="what reads vmthunder's NBD export (default "
                        "qemu-img convert, the same client as QEMU's side)")
    p.add_argument("--baseline", metavar="TREE",
                   help="also measure the vmthunder of another tree (a "
                        "checkout or `git archive` of an older commit) in "
                        "the same run, taking turns: before/after figures")
    p.add_argument("--recycle", type=parse_size, default=0,
                   metavar="SIZE",
                   help="write and delete a file of SIZE right before each "
                        "read (default 0: not), so that the page cache a "
                        "cold read fills is recycled memory, not memory "
                        "this VM's host must fault in again (see "
                        "recycle_page_cache)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where the temporary work directory goes; removed "
                        "at the end")
    p.add_argument("--profile", metavar="FILE",
                   help="one more vmthunder read under py-spy (--native, "
                        "raw/folded) into FILE")
    p.add_argument("--perf", metavar="FILE",
                   help="one more vmthunder read under perf record -g "
                        "(cpu-clock) of serve into FILE")
    p.add_argument("--strace", metavar="FILE",
                   help="one more vmthunder read under strace -c -f of "
                        "serve into FILE (syscall counts)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the target is missed")
    p.add_argument("--smoke", action="store_true",
                   help="CI mode: 32 MiB, one repeat")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, io._terminate)
    if args.smoke:
        args.size = min(args.size, 32 * MiB)
        args.repeat = 1
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    cs = args.chunk_size
    if cs < 4 * KiB or cs & (cs - 1):
        raise SystemExit(f"chunk size {cs} is not a power of two >= 4K")
    if os.geteuid() != 0 or shutil.which("tgtd") is None:
        raise SystemExit("needs root and tgtd (Debian package tgt)")
    needed = ["qemu-img"] + (["nbdcopy"] if args.client == "nbdcopy"
                             else [])
    needed += [t for t, f in (("perf", args.perf), ("strace", args.strace))
               if f]
    missing = [b for b in needed if shutil.which(b) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}")
    report = run_benchmark(args)
    print_table(report)
    print(json.dumps(report), flush=True)
    if args.check and not report["target_met"]:
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
