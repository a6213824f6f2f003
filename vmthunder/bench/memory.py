"""Memory of `vmthunder serve` under many concurrent readers.

Serves a large pseudo-random image (default 4 GiB) from a cold cache and
has ``--clients`` (default 8) `nbdcopy URI null:` processes read the whole
export at once, then again with the cache warm. The server's resident set
(psutil's RSS) is sampled every ``--interval`` seconds, and its high-water
mark (the kernel's, getrusage's ru_maxrss, which /proc shows as VmHWM) is
taken when it is stopped and reaped. The peak must stay
under ``--limit-mib`` (150 MiB): memory must be bounded by configuration
(in-flight byte budget, pending cache writes), not grow with the image,
the clients or the data read.

Prints a few lines of figures; the last line is one JSON object:
{"peak_rss_mib", "clients", "image_bytes", "limit_mib", "ok", ...}.

    python -m vmthunder.bench.memory            # 4 GiB, 8 clients
    python -m vmthunder.bench.memory --smoke    # CI: 64 MiB, < 20 s
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
import threading
import time

import psutil

from vmthunder.bench.nbd_throughput import (
    GiB, MiB, code_state, log, make_image, missing_binaries, read_file,
    start_vmthunder)
from vmthunder.sizes import parse_size

LIMIT_MIB = 150


def rss_kib(proc: psutil.Process) -> tuple[int, int] | None:
    """(resident set in KiB, threads) of a running process; None once it
    is gone."""
    try:
        with proc.oneshot():
            return proc.memory_info().rss // 1024, proc.num_threads()
    except psutil.Error:
        return None


def stop_reaped(server, timeout: float = 20) -> int:
    """Stop ``server`` (SIGTERM, SIGKILL after ``timeout`` s) and reap it
    with wait4: its peak resident set in KiB over its whole life (the
    kernel's high-water mark, ru_maxrss; VmHWM in /proc)."""
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    server.stop()                   # reaped already: closes its pipe
    return usage.ru_maxrss


class RssSampler(threading.Thread):
    """Samples the resident set of a process every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []     # (t, KiB)
        self.threads_max = 0
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            sample = rss_kib(self.proc)
            if sample is not None:
                self.samples.append((time.monotonic() - self.t0, sample[0]))
                self.threads_max = max(self.threads_max, sample[1])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_kib(self, since: float = 0.0) -> int:
        return max((kib for t, kib in self.samples if t >= since), default=0)


def read_concurrently(uri: str, clients: int, connections: int,
                      timeout: float) -> float:
    """``clients`` nbdcopy processes reading the whole export at once."""
    argv = ["nbdcopy", "--no-extents", f"--connections={connections}",
            uri, "null:"]
    start = time.monotonic()
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for _ in range(clients)]
    try:
        failures = []
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, start + timeout
                                               - time.monotonic()))
            if p.returncode != 0:
                failures.append(f"exit {p.returncode}: "
                                f"{err.decode(errors='replace')[-500:]}")
        if failures:
            raise RuntimeError(f"{len(failures)} of {clients} nbdcopy "
                               f"clients failed: {failures[0]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.monotonic() - start


def run(args) -> dict:
    missing = missing_binaries("nbdcopy")
    if missing:
        raise SystemExit(f"missing binaries: {', '.join(missing)}")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vmthunder-membench-",
                               dir=args.workdir)
    server = None
    sampler = None
    report: dict = {}
    try:
        if args.image:
            image = os.path.abspath(args.image)
            size = os.path.getsize(image)
        else:
            image = os.path.join(workdir, "image.raw")
            size = args.size
            log(f"writing a {size / MiB:.0f} MiB pseudo-random image")
            report["image_created_s"] = round(make_image(image, size), 2)
        report["page_cache_read_s"] = round(read_file(image), 2)
        report["code"] = code_state()
        server = start_vmthunder(image, os.path.join(workdir, "cache"),
                                 "mem", workdir)
        pid = server.proc.pid
        sampler = RssSampler(pid, args.interval)
        sampler.start()
        time.sleep(max(0.3, 3 * args.interval))
        baseline = (rss_kib(sampler.proc) or (0, 0))[0]
        log(f"vmthunder serve pid {pid} at {server.uri}: {baseline / 1024:.1f}"
            f" MiB RSS idle; {args.clients} clients reading, cold cache")
        phases = {}
        for phase in ("cold", "warm"):
            t0 = time.monotonic() - sampler.t0
            seconds = read_concurrently(server.uri, args.clients,
                                        args.connections, args.timeout)
            server.check_alive()
            peak = sampler.peak_kib(since=t0)
            after = (rss_kib(sampler.proc) or (0, 0))[0]
            phases[phase] = {
                "seconds": round(seconds, 2),
                "mb_s": round(args.clients * size / seconds / 1e6, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "rss_after_mib": round(after / 1024, 1)}
            log(f"{phase}: {args.clients} x {size / MiB:.0f} MiB in "
                f"{seconds:.1f} s ({phases[phase]['mb_s']:.0f} MB/s total), "
                f"peak RSS {peak / 1024:.1f} MiB, after "
                f"{after / 1024:.1f} MiB")
        sampler.stop()
        sampled_peak = sampler.peak_kib()
        hwm = stop_reaped(server)
        peak_mib = max(sampled_peak, hwm) / 1024
        report.update({
            "peak_rss_mib": round(peak_mib, 1),
            "clients": args.clients,
            "image_bytes": size,
            "limit_mib": args.limit_mib,
            "ok": peak_mib < args.limit_mib,
            "vmhwm_mib": round(hwm / 1024, 1),
            "sampled_peak_rss_mib": round(sampled_peak / 1024, 1),
            "idle_rss_mib": round(baseline / 1024, 1),
            "threads_max": sampler.threads_max,
            "samples": len(sampler.samples),
            "interval_s": args.interval,
            "connections_per_client": args.connections,
            "phases": phases,
            "method": ("vmthunder serve (defaults) of a pseudo-random image, "
                       f"{args.clients} concurrent `nbdcopy --no-extents "
                       f"--connections={args.connections} URI null:` reading "
                       "the whole export, first with a cold cache then warm; "
                       "RSS sampled (psutil) every "
                       f"{args.interval} s, the kernel's high-water mark "
                       "(ru_maxrss = VmHWM) taken when the server is "
                       "stopped and reaped; peak_rss_mib = max(sampled, "
                       "high-water mark)"),
            "smoke": args.smoke,
        })
        return report
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.memory",
        description="Measure the peak resident memory of `vmthunder serve` "
                    "while several clients read a large image end to end "
                    "at once (cold cache, then warm), and compare it with "
                    f"the limit ({LIMIT_MIB} MiB). The last line of output "
                    "is one JSON object with peak_rss_mib, clients, "
                    "image_bytes, limit_mib and ok. Needs nbdcopy.")
    p.add_argument("--size", type=parse_size, default=4 * GiB,
                   help="size of the pseudo-random image to create "
                        "(ignored with --image); K/M/G suffixes "
                        "(default: 4G)")
    p.add_argument("--image", metavar="PATH",
                   help="serve this existing raw file instead (read only)")
    p.add_argument("--workdir", metavar="DIR",
                   help="directory under which a temporary work directory "
                        "(image, cache, logs) is made and removed at the "
                        "end; it needs about twice the image size free "
                        "(default: the system temp dir)")
    p.add_argument("--clients", type=int, default=8,
                   help="concurrent nbdcopy readers (default: 8)")
    p.add_argument("--connections", type=int, default=1,
                   help="NBD connections per nbdcopy client, like one VM "
                        "disk each (default: 1; nbdcopy's own default is 4)")
    p.add_argument("--interval", type=float, default=0.1,
                   help="seconds between RSS samples (default: 0.1)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB,
                   help=f"peak RSS limit in MiB (default: {LIMIT_MIB})")
    p.add_argument("--timeout", type=float, default=1800,
                   help="give up on a read phase after this many seconds "
                        "(default: 1800)")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 if the peak reaches the limit")
    p.add_argument("--smoke", action="store_true",
                   help="small run for CI: 64 MiB image (under 20 s); the "
                        "limit still applies to --check and to 'ok'")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.size = min(args.size, 64 * MiB)
        args.timeout = min(args.timeout, 120)
    if args.clients < 1 or args.connections < 1 or args.interval <= 0:
        raise SystemExit("--clients, --connections and --interval must be "
                         "positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args)
    print(f"image {report['image_bytes'] / MiB:.0f} MiB, "
          f"{report['clients']} clients x {args.connections} connection(s)")
    for phase, ph in report["phases"].items():
        print(f"{phase:<5} {ph['seconds']:>7.1f} s {ph['mb_s']:>8.0f} MB/s "
              f"peak RSS {ph['peak_rss_mib']:>6.1f} MiB, after "
              f"{ph['rss_after_mib']:.1f} MiB")
    print(f"peak RSS {report['peak_rss_mib']:.1f} MiB (VmHWM "
          f"{report['vmhwm_mib']:.1f}, idle {report['idle_rss_mib']:.1f}); "
          f"limit {report['limit_mib']:g} MiB: "
          f"{'ok' if report['ok'] else 'OVER THE LIMIT'}")
    print(json.dumps(report), flush=True)
    if args.check and not report["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
