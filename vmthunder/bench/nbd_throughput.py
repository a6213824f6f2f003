"""NBD export throughput of `vmthunder serve` (warm cache) against peers.

One run, one file, three servers on loopback: `vmthunder serve` (its cache
warmed first by reading the whole export once), `qemu-nbd` and `nbdkit
file`. Each is measured with the same clients, interleaved (A B C A B C
...) so that noise from other processes spreads over all of them, and the
best of ``--repeat`` runs is kept (noise on a shared machine only ever
slows a run down; the median is recorded too).

Measurements (all at queue depth 16, one NBD connection per client):

- ``seq``: sequential 1 MiB reads with ``qemu-img bench`` (QEMU's own NBD
  client, the one VMs use), reading the whole image ``--seq-passes``
  times.
- ``rand``: random 4 KiB reads with fio's ``nbd`` engine (libnbd), time
  based. ``qemu-img bench`` has no random mode.
- cross-checks (``--no-cross-check`` skips them): the same two patterns
  with the other client, i.e. fio sequential 1 MiB reads and ``qemu-img
  bench`` 4 KiB reads at a stride of 1 MiB + 4 KiB (scattered offsets, not
  random). A server that looks fine with one client and not the other
  shows up here.

The table goes to stdout; its last line is one JSON object with
``seq_ratio`` and ``rand_ratio`` (vmthunder divided by the faster peer),
every raw figure, the method and the parameters. Progress goes to stderr.

    python -m vmthunder.bench.nbd_throughput            # 1 GiB, ~4 min
    python -m vmthunder.bench.nbd_throughput --smoke    # CI, < 20 s
    python -m vmthunder.bench.nbd_throughput --smoke --agent  # a VM disk
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from vmthunder.sizes import parse_size

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
READY_RE = re.compile(r"^vmthunder: ready export=(\S*) uri=(\S+)$")
SEQ_TARGET = 0.8
RAND_TARGET = 0.5
# qemu-img bench 4 KiB cross-check: an odd stride that is not a multiple
# of the page or cluster size, so consecutive requests land far apart.
STRIDE = MiB + 4 * KiB


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def missing_binaries(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


# -- image -----------------------------------------------------------------

def make_image(path: str, size: int, *, seed: int = 0) -> float:
    """Write ``size`` bytes of pseudo-random data to ``path``; seconds taken.

    Fast enough for multi-GiB images (disk speed rather than RNG speed):
    every 1 MiB piece is a slice of a seeded 16 MiB random pool at a random
    offset, with a unique 16-byte header, so no two pieces are equal and
    nothing is compressible or sparse.
    """
    start = time.monotonic()
    rng = random.Random(seed)
    pool = rng.randbytes(16 * MiB + MiB)
    with open(path, "wb") as f:
        written = 0
        index = 0
        while written < size:
            n = min(MiB, size - written)
            off = rng.randrange(0, 16 * MiB)
            piece = (index.to_bytes(8, "little") + rng.randbytes(8)
                     + pool[off + 16:off + MiB])
            f.write(piece[:n])
            written += n
            index += 1
        f.flush()
        os.fsync(f.fileno())
    return time.monotonic() - start


def read_file(path: str) -> float:
    """Read a file once (into the page cache); seconds taken."""
    start = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        while f.readinto(buf):
            pass
    return time.monotonic() - start


# -- servers ----------------------------------------------------------------

def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the benchmark dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen
    host: str
    port: int
    export: str
    log_path: str

    @property
    def uri(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.export}"

    @property
    def image_opts(self) -> str:
        return (f"driver=nbd,server.type=inet,server.host={self.host},"
                f"server.port={self.port},export={self.export}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with "
                               f"{self.proc.returncode}: {self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _popen(argv, log_path, *, stdout=None, cwd=None, env=None):
    log_file = open(log_path, "w")
    try:
        return subprocess.Popen(
            argv, stdout=stdout if stdout is not None else log_file,
            stderr=log_file, stdin=subprocess.DEVNULL, text=True, cwd=cwd,
            env=env, preexec_fn=_die_with_parent)
    finally:
        log_file.close()


def _wait_port(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            with socket.create_connection((server.host, server.port), 0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} did not listen on port "
                                   f"{server.port}: {server.log_tail()}")
            time.sleep(0.05)


def _start_python(server_name: str, argv: list, log_path: str, ready,
                  port: int, export: str, host: str,
                  timeout: float) -> Server:
    """Start a vmthunder program; read its stdout until ``ready(line)``
    answers (not None): the port it serves on, or True (``port``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = _popen(argv, log_path, stdout=subprocess.PIPE, cwd=REPO, env=env)
    server = Server("vmthunder", proc, host, port, export, log_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server_name} did not get ready")
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                server.check_alive()
            got = ready(line)
            if got is not None:
                if got is not True:
                    server.port = got
                return server
    except BaseException:
        server.stop()
        raise


def start_vmthunder(image: str, cache_dir: str, export: str, log_dir: str,
                    *, host: str = "127.0.0.1", extra=(),
                    timeout: float = 60) -> Server:
    """`python -m vmthunder.cli serve`; waits for its ready line."""
    argv = [sys.executable, "-m", "vmthunder.cli", "serve", image,
            "--listen", f"tcp:{host}:0", "--cache-dir", cache_dir,
            "--export", export, *extra]

    def ready(line: str):
        m = READY_RE.match(line.strip())
        if m and m.group(1) == export:
            hostport = m.group(2).split("//", 1)[1].split("/", 1)[0]
            return int(hostport.rsplit(":", 1)[1])
        return None
    return _start_python("vmthunder serve", argv,
                         os.path.join(log_dir, "vmthunder.log"), ready, 0,
                         export, host, timeout)


def start_vmthunder_agent(image: str, export: str, work_dir: str, *,
                          host: str = "127.0.0.1",
                          timeout: float = 60) -> Server:
    """`python -m vmthunder.agent` (built-in defaults, no host config) with
    IMAGE attached and one VM named EXPORT on it: what is measured is the
    VM's disk, its copy-on-write snapshot over the image's cache, the
    path a VM's reads take through the agent."""
    from vmthunder.agent.client import AgentClient
    from vmthunder.agent.main import READY_PREFIX
    base = os.path.join(work_dir, "agent")
    os.makedirs(base, exist_ok=True)
    conf = os.path.join(base, "agent.conf")
    with open(conf, "w"):
        pass                        # empty: not /etc/vmthunder's
    api = os.path.join(base, "api.sock")
    port = free_port(host)
    argv = [sys.executable, "-m", "vmthunder.agent", "--config-file", conf,
            "--state-dir", os.path.join(base, "state"), "--api-socket", api,
            "--hypervisor-listen", f"tcp:{host}:{port}",
            "--cache-dir", os.path.join(base, "cache")]
    server = _start_python(
        "vmthunder-agent", argv,
        os.path.join(work_dir, "vmthunder-agent.log"),
        lambda line: True if line.startswith(READY_PREFIX) else None,
        port, export, host, timeout)
    try:
        client = AgentClient(api, timeout=timeout)
        client.attach_image(f"{export}-image", image)
        client.create_vm(export, f"{export}-image")
    except BaseException:
        server.stop()
        raise
    return server


def start_qemu_nbd(image: str, export: str, log_dir: str, *,
                   host: str = "127.0.0.1", timeout: float = 30) -> Server:
    """qemu-nbd, read-only, default (writeback, page cache) cache mode.

    -t keeps it alive across clients, -e 16 allows concurrent clients
    (the default is one).
    """
    port = free_port(host)
    log_path = os.path.join(log_dir, "qemu-nbd.log")
    argv = ["qemu-nbd", "-f", "raw", "-r", "-t", "-e", "16", "-x", export,
            "-b", host, "-p", str(port), image]
    server = Server("qemu-nbd", _popen(argv, log_path), host, port, export,
                    log_path)
    _wait_port(server, timeout)
    return server


def start_nbdkit(image: str, export: str, log_dir: str, *,
                 host: str = "127.0.0.1", timeout: float = 30) -> Server:
    """nbdkit's file plugin, read-only, in the foreground."""
    port = free_port(host)
    log_path = os.path.join(log_dir, "nbdkit.log")
    argv = ["nbdkit", "-f", "-r", "-i", host, "-p", str(port),
            "-e", export, "file", image]
    server = Server("nbdkit", _popen(argv, log_path), host, port, export,
                    log_path)
    _wait_port(server, timeout)
    return server


# -- clients ----------------------------------------------------------------

def nbdcopy_to_null(uri: str, *, extra=(), timeout: float | None = None
                    ) -> float:
    """Read a whole export once (--no-extents: holes are read too)."""
    start = time.monotonic()
    subprocess.run(["nbdcopy", "--no-extents", *extra, uri, "null:"],
                   check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=timeout)
    return time.monotonic() - start


_BENCH_RE = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(server: Server, *, count: int, size: int, step: int,
                   depth: int, timeout: float = 900) -> dict:
    """`qemu-img bench` reads; the time is qemu-img's own (excludes
    connecting)."""
    argv = ["qemu-img", "bench", "-c", str(count), "-d", str(depth),
            "-s", str(size), "-S", str(step), "-t", "none",
            "--image-opts", server.image_opts]
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    m = _BENCH_RE.search(out.stdout)
    if out.returncode != 0 or not m:
        server.check_alive()
        raise RuntimeError(f"qemu-img bench against {server.name} failed "
                           f"({out.returncode}): {out.stderr or out.stdout}")
    seconds = float(m.group(1))
    nbytes = count * size
    return {"seconds": seconds, "bytes": nbytes, "requests": count,
            "mb_s": nbytes / seconds / 1e6, "iops": count / seconds}


def fio_nbd(server: Server, *, rw: str, bs: int, depth: int,
            runtime: float, workdir: str) -> dict:
    """fio's nbd engine (libnbd, one connection), time based."""
    out_path = os.path.join(workdir, "fio.json")
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={server.uri}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            f"--runtime={max(1, round(runtime))}", "--time_based",
            "--norandommap", "--randrepeat=1", "--output-format=json",
            f"--output={out_path}"]
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=runtime + 120, stdin=subprocess.DEVNULL)
    try:
        with open(out_path) as f:
            text = f.read()
        # fio may print notes before the JSON document.
        data = json.loads(text[text.index("{"):])
        job = data["jobs"][0]
        read = job["read"]
    except (OSError, ValueError, KeyError, IndexError):
        server.check_alive()
        raise RuntimeError(f"fio against {server.name} failed "
                           f"({out.returncode}): {out.stderr}") from None
    if out.returncode != 0 or job.get("error"):
        raise RuntimeError(f"fio against {server.name} failed "
                           f"({out.returncode}, error {job.get('error')}): "
                           f"{out.stderr}")
    seconds = read["runtime"] / 1000
    return {"seconds": seconds, "bytes": read["io_bytes"],
            "requests": read["total_ios"], "mb_s": read["bw_bytes"] / 1e6,
            "iops": read["iops"],
            "lat_mean_us": read.get("lat_ns", {}).get("mean", 0) / 1000}


def fio_has_nbd() -> bool:
    if shutil.which("fio") is None:
        return False
    out = subprocess.run(["fio", "--enghelp"], capture_output=True,
                         text=True)
    return any(line.strip() == "nbd" for line in out.stdout.splitlines())


# -- the benchmark ----------------------------------------------------------

@dataclasses.dataclass
class Test:
    key: str            # JSON key
    label: str
    client: str         # qemu-img | fio
    metric: str         # mb_s | iops
    run: callable       # (server) -> dict
    primary: bool
    description: str


def build_tests(args, image_size: int, workdir: str) -> list[Test]:
    depth = args.depth
    seq_count = max(1, args.seq_passes * image_size // MiB)
    tests = [
        Test("seq", "seq 1M", "qemu-img", "mb_s",
             lambda s: qemu_img_bench(s, count=seq_count, size=MiB, step=MiB,
                                      depth=depth),
             True,
             f"qemu-img bench -c {seq_count} -d {depth} -s 1M -S 1M -t none "
             "--image-opts driver=nbd,...: sequential 1 MiB reads, "
             f"{args.seq_passes} pass(es) over the image"),
        Test("rand", "rand 4K", "fio", "iops",
             lambda s: fio_nbd(s, rw="randread", bs=4 * KiB, depth=depth,
                               runtime=args.runtime, workdir=workdir),
             True,
             f"fio --ioengine=nbd --rw=randread --bs=4k --iodepth={depth} "
             f"--runtime={args.runtime} --time_based --norandommap "
             "--randrepeat=1: uniformly random 4 KiB reads over the image"),
    ]
    if args.cross_check:
        tests += [
            Test("seq_fio", "seq 1M (fio)", "fio", "mb_s",
                 lambda s: fio_nbd(s, rw="read", bs=MiB, depth=depth,
                                   runtime=args.runtime, workdir=workdir),
                 False,
                 f"fio --ioengine=nbd --rw=read --bs=1m --iodepth={depth} "
                 f"--runtime={args.runtime} --time_based"),
            Test("stride_qemu_img", "stride 4K (qemu-img)", "qemu-img",
                 "iops", None, False,
                 f"qemu-img bench -d {depth} -s 4K -S {STRIDE} -t none: "
                 "4 KiB reads at a 1 MiB + 4 KiB stride (scattered, not "
                 "random); -c sized per server from a probe run to last "
                 f"about {args.runtime} s"),
        ]
    return tests


def _strided(server: Server, *, depth: int, runtime: float,
             probe_count: int, counts: dict) -> dict:
    """qemu-img bench at a stride; the count is sized per server so that
    a slow server (qemu-nbd with QEMU's client) does not run for minutes."""
    if server.name not in counts:
        probe = qemu_img_bench(server, count=probe_count, size=4 * KiB,
                               step=STRIDE, depth=depth)
        counts[server.name] = int(min(max(probe["iops"] * runtime,
                                          probe_count), 5_000_000))
    return qemu_img_bench(server, count=counts[server.name], size=4 * KiB,
                          step=STRIDE, depth=depth)


def summarize(samples: list[dict], metric: str) -> dict:
    values = [s[metric] for s in samples]
    return {"best": max(values), "median": statistics.median(values),
            "samples": [round(v, 1) for v in values]}


def ratio(results: dict, key: str, pick: str) -> tuple[float, str]:
    """vmthunder / the faster peer, with the faster peer's name."""
    peers = {name: results[name][key][pick]
             for name in ("qemu-nbd", "nbdkit")}
    faster = max(peers, key=peers.get)
    if peers[faster] <= 0:
        return 0.0, faster
    return results["vmthunder"][key][pick] / peers[faster], faster


def run_benchmark(args) -> dict:
    missing = missing_binaries("qemu-img", "qemu-nbd", "nbdkit", "nbdcopy",
                               "fio")
    if missing:
        raise SystemExit(f"missing binaries: {', '.join(missing)}")
    if not fio_has_nbd():
        raise SystemExit("this fio has no nbd engine (fio --enghelp); "
                         "install a fio built with libnbd")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vmthunder-bench-", dir=args.workdir)
    servers: list[Server] = []
    profiler = None
    report: dict = {}
    try:
        if args.image:
            image = os.path.abspath(args.image)
            image_size = os.path.getsize(image)
            report["image_created_s"] = None
        else:
            image = os.path.join(workdir, "image.raw")
            image_size = args.size
            log(f"writing a {image_size / MiB:.0f} MiB pseudo-random image")
            report["image_created_s"] = round(make_image(image, image_size),
                                              2)
        if image_size < MiB:
            raise SystemExit("the image must be at least 1 MiB")
        report["page_cache_read_s"] = round(read_file(image), 3)
        report["code"] = code_state()
        export = args.export
        cache_dir = os.path.join(workdir, "cache")
        if args.agent:
            servers.append(start_vmthunder_agent(image, export, workdir))
            log(f"vmthunder-agent VM disk at {servers[0].uri}; warming "
                "its image's cache")
        else:
            servers.append(start_vmthunder(image, cache_dir, export,
                                           workdir))
            log(f"vmthunder serve at {servers[0].uri}; warming its cache")
        warm = nbdcopy_to_null(servers[0].uri)
        report["warmup_s"] = round(warm, 3)
        report["warmup_mb_s"] = round(image_size / warm / 1e6, 1)
        log(f"warm-up (cold cache, whole export): {warm:.2f} s, "
            f"{image_size / warm / 1e6:.0f} MB/s")
        servers.append(start_qemu_nbd(image, export, workdir))
        servers.append(start_nbdkit(image, export, workdir))
        for s in servers:
            log(f"{s.name}: {s.uri} (pid {s.proc.pid})")
        if args.profile:
            profiler = start_profiler(servers[0], args.profile, workdir)

        tests = build_tests(args, image_size, workdir)
        counts: dict = {}
        for t in tests:
            if t.key == "stride_qemu_img":
                probe = 200 if args.smoke else 1000
                t.run = (lambda s, p=probe: _strided(
                    s, depth=args.depth, runtime=args.runtime,
                    probe_count=p, counts=counts))
        samples = {s.name: {t.key: [] for t in tests} for s in servers}
        for t in tests:
            for r in range(args.repeat):
                for s in servers:
                    s.check_alive()
                    res = t.run(s)
                    samples[s.name][t.key].append(res)
                    unit = "MB/s" if t.metric == "mb_s" else "IOPS"
                    log(f"{t.label:<22} run {r + 1}/{args.repeat} "
                        f"{s.name:<9} {res[t.metric]:>10.0f} {unit}")
        if profiler is not None:
            stop_profiler(profiler)
            profiler = None
        for s in servers:
            s.check_alive()

        results = {s.name: {t.key: summarize(samples[s.name][t.key],
                                             t.metric)
                            for t in tests} for s in servers}
        report.update(build_report(args, tests, results, image_size,
                                   image if args.image else None))
        now = code_state()
        if any(now.get(k) != report["code"].get(k)
               for k in ("vmthunder_tree", "changes_sha256")):
            log("warning: the vmthunder code changed during the run")
            report["code"]["changed_during_run"] = True
        report["raw"] = {name: {k: [{kk: round(vv, 3) if isinstance(vv, float)
                                     else vv for kk, vv in x.items()}
                                    for x in v]
                                for k, v in per.items()}
                         for name, per in samples.items()}
        return report
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        for s in reversed(servers):
            with contextlib.suppress(Exception):
                s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def build_report(args, tests, results, image_size, image_path) -> dict:
    pick = "best"
    seq_ratio, seq_peer = ratio(results, "seq", pick)
    rand_ratio, rand_peer = ratio(results, "rand", pick)
    report = {
        "seq_ratio": round(seq_ratio, 3),
        "rand_ratio": round(rand_ratio, 3),
        "seq_faster_peer": seq_peer,
        "rand_faster_peer": rand_peer,
        "targets": {"seq_ratio": SEQ_TARGET, "rand_ratio": RAND_TARGET},
        "targets_met": seq_ratio >= SEQ_TARGET and rand_ratio >= RAND_TARGET,
    }
    for name in ("vmthunder", "qemu-nbd", "nbdkit"):
        key = name.replace("-", "_")
        report[f"{key}_seq_mb_s"] = round(results[name]["seq"][pick], 1)
        report[f"{key}_rand_iops"] = round(results[name]["rand"][pick], 1)
    cross = {}
    for t in tests:
        if not t.primary:
            r, peer = ratio(results, t.key, pick)
            cross[f"{t.key}_ratio"] = round(r, 3)
            cross[f"{t.key}_faster_peer"] = peer
    report["cross_check"] = cross
    report["results"] = {
        name: {k: {"metric": next(t.metric for t in tests if t.key == k),
                   "best": round(v["best"], 1),
                   "median": round(v["median"], 1),
                   "samples": v["samples"]}
               for k, v in per.items()}
        for name, per in results.items()}
    report["method"] = {
        "statistic": f"best of {args.repeat} interleaved runs (median also "
                     "recorded)",
        "order": "per test, servers interleaved: vmthunder qemu-nbd nbdkit "
                 "vmthunder qemu-nbd nbdkit ...",
        "tests": {t.key: {"client": t.client, "metric": t.metric,
                          "primary": t.primary, "how": t.description}
                  for t in tests},
        "servers": {
            "vmthunder": ("python -m vmthunder.agent --hypervisor-listen "
                          "tcp:127.0.0.1:PORT ...; IMAGE attached, VM NAME "
                          "created on it; its disk (snapshot over the "
                          "cache) warmed" if args.agent else
                          "python -m vmthunder.cli serve IMAGE --listen "
                          "tcp:127.0.0.1:0 --cache-dir WORKDIR/cache "
                          "--export NAME; cache warmed")
            + " with nbdcopy --no-extents URI null: before measuring",
            "qemu-nbd": "qemu-nbd -f raw -r -t -e 16 -x NAME -b 127.0.0.1 "
                        "-p PORT IMAGE (cache=writeback, aio=threads "
                        "defaults)",
            "nbdkit": "nbdkit -f -r -i 127.0.0.1 -p PORT -e NAME file "
                      "IMAGE",
        },
        "page_cache": "the image is read once before the servers start; "
                      "all three read from the page cache (vmthunder from "
                      "its cache file, written during the warm-up)",
        "ratio": "vmthunder / the faster of qemu-nbd and nbdkit",
    }
    report["params"] = {
        "image_bytes": image_size, "image": image_path or "generated",
        "depth": args.depth, "repeat": args.repeat,
        "runtime_s": args.runtime, "seq_passes": args.seq_passes,
        "smoke": args.smoke, "agent": args.agent, "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "versions": tool_versions(),
    }
    return report


def code_state() -> dict:
    """The vmthunder code measured: commit, and whether (and how) the work
    tree differs from it, so figures can be tied to a version."""
    import hashlib

    def git(*argv):
        return subprocess.run(["git", "-C", REPO, *argv], capture_output=True,
                              text=True, timeout=30).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        tree = git("rev-parse", "HEAD:vmthunder").strip()
        diff = git("diff", "HEAD", "--", "vmthunder")
        untracked = git("ls-files", "--others", "--exclude-standard",
                        "vmthunder").split()
    except (OSError, subprocess.SubprocessError):
        return {}
    h = hashlib.sha256(diff.encode())
    for path in sorted(untracked):
        with contextlib.suppress(OSError), \
                open(os.path.join(REPO, path), "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    return {"commit": commit[:12] or None,
            "vmthunder_tree": tree[:12] or None,
            "dirty": bool(diff or untracked),
            "changes_sha256": h.hexdigest()[:12] if diff or untracked
            else None}


def tool_versions() -> dict:
    out = {}
    for name, argv in (("qemu-img", ["qemu-img", "--version"]),
                       ("nbdkit", ["nbdkit", "--version"]),
                       ("fio", ["fio", "--version"]),
                       ("nbdcopy", ["nbdcopy", "--version"])):
        with contextlib.suppress(Exception):
            text = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=10).stdout
            out[name] = text.splitlines()[0].strip()
    out["python"] = sys.version.split()[0]
    return out


# -- profiling ----------------------------------------------------------------

def start_profiler(server: Server, path: str, workdir: str):
    pyspy = shutil.which("py-spy") or os.path.join(
        os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    fmt = "raw" if path.endswith((".txt", ".folded")) else (
        "speedscope" if path.endswith(".json") else "flamegraph")
    log(f"profiling vmthunder serve (pid {server.proc.pid}) into {path} "
        f"({fmt}); figures are perturbed by the sampling")
    return _popen([pyspy, "record", "--pid", str(server.proc.pid),
                   "--rate", "200", "--format", fmt, "-o",
                   os.path.abspath(path)],
                  os.path.join(workdir, "py-spy.log"))


def stop_profiler(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- output ---------------------------------------------------------------

def print_report(report: dict, tests_keys) -> None:
    res = report["results"]
    head = f"{'server':<10} {'seq MB/s':>10} {'rand IOPS':>10}"
    extra = [k for k in tests_keys if k not in ("seq", "rand")]
    labels = {"seq_fio": "seq fio MB/s", "stride_qemu_img": "stride IOPS"}
    for k in extra:
        head += f" {labels.get(k, k):>13}"
    print(head)
    for name in ("vmthunder", "qemu-nbd", "nbdkit"):
        line = (f"{name:<10} {res[name]['seq']['best']:>10.0f} "
                f"{res[name]['rand']['best']:>10.0f}")
        for k in extra:
            line += f" {res[name][k]['best']:>13.0f}"
        print(line)
    line = (f"{'ratio':<10} {report['seq_ratio']:>10.2f} "
            f"{report['rand_ratio']:>10.2f}")
    for k in extra:
        line += f" {report['cross_check'][k + '_ratio']:>13.2f}"
    print(line)
    print(f"(best of {report['params']['repeat']}; ratio = vmthunder / "
          f"faster peer: seq vs {report['seq_faster_peer']}, rand vs "
          f"{report['rand_faster_peer']}; seq = qemu-img bench 1M, rand = "
          "fio nbd randread 4K, depth 16)")
    print(f"warm-up of the vmthunder cache: {report['warmup_s']:.2f} s "
          f"({report['warmup_mb_s']:.0f} MB/s, cold)")
    print(f"targets: seq_ratio >= {SEQ_TARGET} "
          f"{'met' if report['seq_ratio'] >= SEQ_TARGET else 'MISSED'}, "
          f"rand_ratio >= {RAND_TARGET} "
          f"{'met' if report['rand_ratio'] >= RAND_TARGET else 'MISSED'}")
    print(json.dumps(report, sort_keys=False), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmthunder.bench.nbd_throughput",
        description="Compare the NBD read throughput of `vmthunder serve` "
                    "(warm cache) with qemu-nbd and nbdkit's file plugin, "
                    "all serving the same file on loopback, measured with "
                    "the same clients: sequential 1 MiB reads with "
                    "`qemu-img bench` and random 4 KiB reads with fio's nbd "
                    "engine, both at queue depth 16. Prints a table and, "
                    "as the last line, one JSON object with seq_ratio and "
                    "rand_ratio (vmthunder / the faster peer; targets "
                    f">= {SEQ_TARGET} and >= {RAND_TARGET}) and every raw "
                    "figure. Needs qemu-img, qemu-nbd, nbdkit, nbdcopy and "
                    "fio (with the nbd engine).")
    p.add_argument("--size", type=parse_size, default=GiB,
                   help="size of the pseudo-random image to create "
                        "(ignored with --image); K/M/G suffixes "
                        "(default: 1G)")
    p.add_argument("--image", metavar="PATH",
                   help="benchmark this existing raw file instead of "
                        "creating one (it is read, never written)")
    p.add_argument("--workdir", metavar="DIR",
                   help="directory under which a temporary work directory "
                        "(image, vmthunder cache, logs) is made and removed "
                        "at the end (default: the system temp dir)")
    p.add_argument("--export", default="bench",
                   help="NBD export name used on all three servers "
                        "(default: bench)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each measurement per server, interleaved "
                        "across servers; the best is reported (default: 3)")
    p.add_argument("--runtime", type=float, default=5.0,
                   help="seconds per time-based run (fio; and the target "
                        "length of the qemu-img strided cross-check) "
                        "(default: 5)")
    p.add_argument("--seq-passes", type=int, default=2,
                   help="times the sequential qemu-img bench run reads the "
                        "whole image (default: 2)")
    p.add_argument("--depth", type=int, default=16,
                   help="requests in flight (qemu-img bench -d, fio "
                        "--iodepth) (default: 16)")
    p.add_argument("--no-cross-check", dest="cross_check",
                   action="store_false",
                   help="skip the cross-checks (fio sequential, qemu-img "
                        "strided 4K); only the two primary measurements")
    p.add_argument("--profile", metavar="FILE",
                   help="record vmthunder serve with py-spy during the "
                        "measurements (after the warm-up) into FILE: .svg "
                        "flame graph, .json speedscope, .txt collapsed "
                        "stacks; the figures of that run are perturbed")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 if a target is missed "
                        f"(seq_ratio >= {SEQ_TARGET}, rand_ratio >= "
                        f"{RAND_TARGET}); without it, only report")
    p.add_argument("--agent", action="store_true",
                   help="measure a VM disk of vmthunder-agent (the image "
                        "attached, one VM created: its copy-on-write "
                        "snapshot over the image's cache, the path VMs' "
                        "reads take) instead of `vmthunder serve`'s cache "
                        "export")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for CI (64 MiB image, 1 repeat, 1 s runs, "
                        "4 sequential passes; under 20 s): checks that the "
                        "pipeline works and the JSON is complete; no "
                        "targets enforced")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.size = min(args.size, 64 * MiB)
        args.repeat = 1
        args.runtime = 1.0
        args.seq_passes = 4
        args.check = False
    if args.repeat < 1 or args.depth < 1 or args.runtime <= 0:
        raise SystemExit("--repeat, --depth and --runtime must be positive")
    # SIGTERM ends the run through the finally clauses (servers stopped,
    # work dir removed) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_benchmark(args)
    print_report(report, list(report["results"]["vmthunder"]))
    if args.check and not report["targets_met"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
