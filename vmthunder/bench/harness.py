"""`vmthunder bench`: N VMs on M hosts, every boot strategy, one run.

For each strategy in turn: fresh hosts state, precache (if the strategy
has one; timed apart), then the clock starts, every host attaches the
image its strategy's way and boots its VMs at once; the run for that
strategy ends when every VM has booted or failed. Hosts and the origin
are network namespaces on this machine (vmthunder.bench.topology), with
their uplinks shaped by tc tbf. VMs are virtual (a recorded boot trace
replayed with its think times, vmthunder.bench.replay) or real (QEMU
under TCG, for small N).

Measured per strategy: per-VM boot times (from the clock start: a VM
waiting for its host's copy is booting), time until all booted, bytes
the origin sent (its uplink counter), bytes hosts sent (peers; also
their TCP acks), peak origin throughput (0.25 s samples), precache time.
Also, once per run: working_set_bytes (distinct bytes one boot reads,
from the trace) and single_local_boot_s (one VM, image already local).
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

from vmthunder import guest as guest_mod
from vmthunder import opts as opts_mod
from vmthunder import sizes
from vmthunder.bench import strategies as strat_mod
from vmthunder.bench import topology as topo_mod
from vmthunder import trace as trace_mod
from vmthunder.bench import vmhost

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TRACES = os.path.join(REPO, "vmthunder", "bench", "traces")
GUESTS = {
    # name: (guest dir name, builder in vmthunder.guest, shipped trace)
    "small": ("guest", guest_mod.SMALL, "busybox-small.trace.gz"),
    "debian": ("guest-debian", guest_mod.DEBIAN, "debian-systemd.trace.gz"),
}
STORE_PORT = 10809
ISCSI_PORT = 3260
REDIS_PORT = 6379
# Strategies whose agents find each other through a coordination backend.
NEEDS_REDIS = {"vmthunder", "vmthunder-prefetch"}
SAMPLE_S = 0.25


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# -- the origin ---------------------------------------------------------------

class OriginHost:
    """tgtd (the image LUN) and nbdkit (the image store) on the origin."""

    def __init__(self, topo, workdir: str, image: str, chunk_size: int,
                 trace: str | None = None):
        from vmthunder.volume import export as export_mod
        self.topo = topo
        self.host = topo.origin
        self.cfg = export_mod.ExportConfig(
            export_dir=os.path.join(workdir, "exports"),
            portal=f"{self.host.address}:{ISCSI_PORT}",
            control_port=_free_control_port(),
            iqn_prefix="iqn.2026-11.org.vmthunder.bench",
            chunk_size=chunk_size, netns=self.host.netns)
        self.image = image
        self.store = None
        self.redis = None
        self.coordination: str | None = None
        result = export_mod.export_image(self.cfg, image, "image",
                                         chunk_size=chunk_size,
                                         out=lambda text: None)
        self.iscsi_url = result.record.url(1)
        if trace is not None:
            # The boot trace, data of the image: hosts whose agents
            # prefetch (vmthunder-prefetch) read it at VM create.
            from vmthunder.volume import published_trace
            published_trace.publish(self.cfg, "image", trace,
                                    out=lambda text: None)
        self.store = self.host.popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--readonly",
             "-i", self.host.address, "-p", str(STORE_PORT), "file", image],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(workdir, "store.log"), "w"))
        self.store_uri = f"nbd://{self.host.address}:{STORE_PORT}"
        _wait_port(self.host, self.host.address, STORE_PORT, self.store)

    def start_redis(self, workdir: str) -> str:
        """Redis on the origin host for the agents' membership (tooz);
        its few KB/s of heartbeats count in the origin's bytes."""
        self.redis = self.host.popen(
            ["redis-server", "--port", str(REDIS_PORT), "--bind",
             self.host.address, "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdin=subprocess.DEVNULL, stdout=open(
                os.path.join(workdir, "redis.log"), "w"),
            stderr=subprocess.STDOUT)
        _wait_port(self.host, self.host.address, REDIS_PORT, self.redis)
        return (f"redis://{self.host.address}:{REDIS_PORT}"
                "?timeout=2&membership_timeout=3")

    def coordination_sent(self) -> int | None:
        """Bytes Redis has sent so far (its INFO counter; None without
        Redis): the part of the origin's bytes that is the agents'
        membership, not the image."""
        if self.redis is None or self.redis.poll() is not None:
            return None
        try:
            proc = self.host.run(
                ["redis-cli", "-h", self.host.address, "-p",
                 str(REDIS_PORT), "info", "stats"], capture_output=True,
                text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"cannot read Redis's counters: {exc}")
            return None
        for line in proc.stdout.splitlines():
            if line.startswith("total_net_output_bytes:"):
                return int(line.split(":", 1)[1])
        return None

    def stop(self) -> None:
        for proc in (self.store, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        with contextlib.suppress(Exception):
            self.cfg.tgt().stop()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{self.cfg.control_port}"
                          f"{suffix}")


def _free_control_port() -> int:
    import random
    while True:
        port = random.randrange(20000, 32768)        # tgtd: -C < 2**15
        if not os.path.exists(f"/var/run/tgtd/socket.{port}"):
            return port


def _wait_port(host, address: str, port: int, proc, timeout=20.0) -> None:
    probe = (f"import socket,sys;s=socket.socket();s.settimeout(1);"
             f"sys.exit(s.connect_ex(({address!r},{port})))")
    strat_mod.wait_listening(
        proc, lambda: host.run([sys.executable, "-c", probe]).returncode == 0,
        f"{address}:{port}", "a server on the origin", timeout, 0.1)


# -- sampling the origin's uplink ---------------------------------------------

class OriginSampler(threading.Thread):
    def __init__(self, topo):
        super().__init__(daemon=True)
        self.topo = topo
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_S)

    def sample(self) -> None:
        with contextlib.suppress(Exception):
            stats = self.topo.link_bytes()
            self.samples.append((time.monotonic(),
                                 stats["origin"]["tx_bytes"]))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def series(self, t0: float) -> list[tuple[float, float]]:
        """(seconds since t0, origin bytes/s over the previous sample)."""
        out = []
        for (ta, ba), (tb, bb) in zip(self.samples, self.samples[1:]):
            if tb > ta and tb >= t0:
                out.append((round(tb - t0, 3), (bb - ba) / (tb - ta)))
        return out


# -- one strategy -------------------------------------------------------------

class Progress:
    def __init__(self, strategy: str, total: int):
        self.strategy = strategy
        self.total = total
        self.booted = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, event: str, vm: str, detail: str = "") -> None:
        with self.lock:
            if event == "booted":
                self.booted += 1
            elif event == "failed":
                self.failed += 1
            line = (f"[bench] {self.strategy}: {self.booted}/{self.total} "
                    f"booted, {self.failed} failed, "
                    f"{time.monotonic() - self.t0:6.1f} s")
            if self.tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            if event == "failed" or not self.tty:
                print(("\n" if self.tty else "") + line
                      + (f" ({vm} {event}{': ' + detail if detail else ''})"),
                      file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def run_strategy(args, topo, origin: OriginHost, name: str, workdir: str,
                 workload: dict) -> dict:
    strategy = strat_mod.STRATEGIES[name](strat_mod.Origin(
        iscsi_url=origin.iscsi_url, store_uri=origin.store_uri,
        image_size=os.path.getsize(origin.image),
        config_file=args.conf_file, coordination_url=origin.coordination,
        addresses={h.name: h.address for h in topo.hosts},
        tree_degree=args.tree_degree))
    hosts = topo.hosts
    vms = {h.name: [f"{h.name}-vm{i}" for i in range(args.vms_per_host)]
           for h in hosts}
    results: dict[str, dict] = {}
    host_errors: dict[str, str] = {}
    attach_s: dict[str, float] = {}     # clock time each host's VMs began
    lock = threading.Lock()
    drivers: list[subprocess.Popen] = []

    def each_host(fn):
        threads = [threading.Thread(target=fn, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def do_prepare(host):
        try:
            strategy.prepare(host, os.path.join(workdir, name, host.name))
        except Exception as exc:                # noqa: BLE001
            host_errors[host.name] = f"prepare: {exc}"

    each_host(do_prepare)
    precache: dict[str, float | None] = {}

    def do_precache(host):
        if host.name in host_errors:
            return
        try:
            precache[host.name] = strategy.precache(
                host, os.path.join(workdir, name, host.name))
        except Exception as exc:                # noqa: BLE001
            host_errors[host.name] = f"precache: {exc}"

    t_pre = time.monotonic()
    pre_bytes = topo.link_bytes()["origin"]["tx_bytes"]
    each_host(do_precache)
    precache_s = (round(time.monotonic() - t_pre, 3)
                  if any(v is not None for v in precache.values()) else None)
    if precache_s is not None:
        log(f"{name}: precache took {precache_s:.1f} s")

    profiler = _start_profiler(args, strategy, hosts, name)
    progress = Progress(name, sum(len(v) for v in vms.values()))
    before = topo.link_bytes()
    coord_before = origin.coordination_sent()
    precache_bytes = before["origin"]["tx_bytes"] - pre_bytes
    sampler = OriginSampler(topo)
    sampler.start()
    t0 = time.monotonic()

    def do_boot(host):
        mine = vms[host.name]
        try:
            if host.name in host_errors:
                raise RuntimeError(host_errors[host.name])
            disks = strategy.attach(host, os.path.join(workdir, name,
                                                       host.name), mine)
            with lock:
                attach_s[host.name] = round(time.monotonic() - t0, 3)
            spec = {"vms": disks, "workload": workload["kind"],
                    "trace": workload.get("trace"),
                    "guest_dir": workload.get("guest_dir"),
                    "timeout_s": args.vm_timeout}
            spec_path = os.path.join(workdir, name, host.name, "vms.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            proc = host.popen([sys.executable, "-m", "vmthunder.bench.vmhost",
                               spec_path], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, cwd=REPO)
            with lock:
                drivers.append(proc)
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["t_s"] = round(event.pop("t") - t0, 3)
                with lock:
                    results[event["vm"]] = dict(event, host=host.name)
                progress.update(event["event"], event["vm"],
                                event.get("error", ""))
            proc.wait()
        except Exception as exc:                # noqa: BLE001
            host_errors[host.name] = str(exc)
        # Any VM without an answer failed (never reported as fast).
        for vm in mine:
            with lock:
                if vm not in results:
                    results[vm] = {"vm": vm, "host": host.name,
                                   "event": "failed",
                                   "error": host_errors.get(
                                       host.name, "no result from the VM")}
                    progress.update("failed", vm, results[vm]["error"])

    try:
        each_host(do_boot)
    finally:
        sampler.stop()
        _stop_profiler(profiler)
        progress.done()
        for proc in drivers:
            if proc.poll() is None:
                proc.kill()
        after = topo.link_bytes()
        coord_after = origin.coordination_sent()
        host_stats = {}
        for host in hosts:
            with contextlib.suppress(Exception):
                host_stats[host.name] = strategy.detach(host)
        strategy.cleanup()
    booted = [r["t_s"] for r in results.values() if r["event"] == "booted"]
    failed = {vm: r.get("error") for vm, r in results.items()
              if r["event"] != "booted"}
    series = sampler.series(t0)
    origin_bytes = (after["origin"]["tx_bytes"]
                    - before["origin"]["tx_bytes"])
    peer_bytes = sum(after[h.name]["tx_bytes"] - before[h.name]["tx_bytes"]
                     for h in hosts)
    return {
        "strategy": name, "summary": strategy.summary,
        "vms": len(results), "booted": len(booted), "failed": failed,
        "p50_boot_s": _r(percentile(booted, 0.5)),
        "p95_boot_s": _r(percentile(booted, 0.95)),
        "max_boot_s": _r(max(booted) if booted else None),
        "all_booted_s": _r(max(booted)) if booted and not failed else None,
        "origin_bytes": origin_bytes, "host_sent_bytes": peer_bytes,
        # Of origin_bytes: what Redis (on the origin host) sent the agents
        # for membership, payload only; None when no agent used it.
        "coordination_bytes": (coord_after - coord_before
                               if None not in (coord_before, coord_after)
                               and name in NEEDS_REDIS else None),
        "peak_origin_Bps": round(max((b for _, b in series), default=0)),
        "precache_s": precache_s,
        "precache_origin_bytes": precache_bytes,
        # Failed VMs have no boot time (never counted as fast).
        "boot_s": {vm: r["t_s"] if r["event"] == "booted" else None
                   for vm, r in sorted(results.items())},
        # Replayed VMs: the mean over VMs of the time spent in reads and
        # of their read latency percentiles (where a slow boot waited).
        "read_wait_s": _mean([r["read_wait_s"] for r in results.values()
                              if "read_wait_s" in r]),
        "read_ms": {q: _mean([r["read_ms"][q] for r in results.values()
                              if q in r.get("read_ms", {})])
                    for q in ("p50", "p90", "p99", "max")},
        "origin_series": series, "hosts": host_stats,
        "prefetch": _prefetch_totals(host_stats),
        "fetch_latency": _latency_totals(host_stats),
        "attach_s": attach_s,
        "host_errors": host_errors,
    }


def _latency_totals(host_stats: dict) -> dict | None:
    """The agents' fetches by source (origin, owner, peer, parent; their
    status's fetches, fetch_chunks, fetch_seconds,
    fetch_digest_wait_seconds) over every host: {source: {fetches,
    chunks, mean_ms, digest_wait_ms}}, means over all fetches (None: no
    agent said)."""
    out: dict[str, dict] = {}
    for stats in host_stats.values():
        for where, n in (stats.get("fetches") or {}).items():
            if not n:
                continue
            acc = out.setdefault(where, {"fetches": 0, "chunks": 0,
                                         "_s": 0.0, "_digest_s": 0.0})
            acc["fetches"] += n
            acc["chunks"] += stats["fetch_chunks"][where]
            acc["_s"] += stats["fetch_seconds"][where]
            acc["_digest_s"] += stats["fetch_digest_wait_seconds"][where]
    for acc in out.values():
        acc["mean_ms"] = round(acc.pop("_s") / acc["fetches"] * 1e3, 3)
        acc["digest_wait_ms"] = round(acc.pop("_digest_s")
                                      / acc["fetches"] * 1e3, 3)
    return out or None


def profile_path(path: str, strategy: str) -> str:
    """--profile-out FILE for one strategy: FILE with the strategy's name
    before its extension (prof.txt -> prof.vmthunder.txt)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{strategy}{ext}"


def _start_profiler(args, strategy, hosts, name: str):
    """py-spy on host --profile-host's agent (the strategies with one:
    vmthunder, vmthunder-prefetch, tree) from the clock start to the end
    of the boots; None when not asked or the strategy has no process
    running before the clock (the others start theirs at attach).
    py-spy reads the process from the root namespace (--nonblocking: the
    agent is never paused, so figures stay close to an unprofiled run)."""
    if getattr(args, "profile_host", None) is None:
        return None
    if not 0 <= args.profile_host < len(hosts):
        raise SystemExit(f"--profile-host {args.profile_host}: the run has "
                         f"hosts 0-{len(hosts) - 1}")
    st = strategy.hosts.get(hosts[args.profile_host].name)
    procs = [p for p in (st.procs if st else []) if p.poll() is None]
    if not procs:
        log(f"{name}: no long-running process on host {args.profile_host} "
            "before the clock (nothing to profile yet)")
        return None
    pyspy = shutil.which("py-spy") or os.path.join(
        os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        raise SystemExit("--profile-host needs py-spy (pip install py-spy)")
    out = os.path.abspath(profile_path(args.profile_out, name))
    fmt = "raw" if out.endswith((".txt", ".folded")) else (
        "speedscope" if out.endswith(".json") else "flamegraph")
    log(f"{name}: profiling pid {procs[0].pid} on "
        f"{hosts[args.profile_host].name} into {out}")
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(procs[0].pid), "--rate", "200",
         "--nonblocking", "--format", fmt, "-o", out],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(out + ".log", "w"))


def _stop_profiler(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _prefetch_totals(host_stats: dict) -> dict | None:
    """The hosts' trace prefetch figures added up (None: no prefetch)."""
    rows = [s.get("prefetch") for s in host_stats.values()]
    rows = [r for r in rows if isinstance(r, dict) and "trace_chunks" in r]
    if not rows:
        return None
    keys = ("chunks_prefetched", "bytes_prefetched", "chunks_used",
            "chunks_unused", "chunks_held_already", "chunks_deferred",
            "promoted", "read_errors")
    out = {k: sum(r.get(k) or 0 for r in rows) for k in keys}
    out["hosts"] = len(rows)
    out["states"] = sorted({f"{r['state']} ({r.get('stop_reason')})"
                            for r in rows})
    return out


def _r(value):
    return None if value is None else round(value, 3)


def _mean(values: list):
    return _r(sum(values) / len(values)) if values else None


# -- once per run -------------------------------------------------------------

def single_local_boot(args, image: str, workdir: str, workload) -> float:
    """One VM, the image already local (nbdkit + cow over the file)."""
    if workload["kind"] != "replay":
        return None
    from vmthunder.bench import replay as replay_mod
    sock = os.path.join(workdir, "local.sock")
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent",
                             "-U", sock, "--filter=cow", "file", image],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    try:
        strat_mod._wait_for_socket(proc, sock, "nbdkit (local boot)")
        trace = vmhost.until_boot(trace_mod.load(workload["trace"]))
        import asyncio
        result = asyncio.run(replay_mod.replay_nbd(
            trace, f"nbd+unix:///?socket={sock}"))
        if result["failed"]:
            raise RuntimeError(f"local boot failed: {result['error']}")
        return round(result["boot_s"], 3)
    finally:
        proc.terminate()
        proc.wait(10)


# -- report -------------------------------------------------------------------

def mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def sec(n) -> str:
    return "-" if n is None else f"{n:.2f}"


def print_table(report: dict, out=sys.stdout) -> None:
    p = report["params"]
    print(f"{p['hosts']} hosts x {p['vms_per_host']} VMs, origin "
          f"{p['origin_rate']}, hosts {p['host_rate']}, workload "
          f"{p['workload']} ({p['guest']}); working set "
          f"{mb(report['working_set_bytes'])} MB, single local boot "
          f"{sec(report['single_local_boot_s'])} s", file=out)
    w = max([10] + [len(n) for n in report["strategies"]])
    head = (f"{'strategy':{w}} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
            f"{'all s':>7} {'origin MB':>10} {'hosts MB':>9} "
            f"{'peak MB/s':>9} {'precache s':>10} {'failed':>6}")
    print(head, file=out)
    for name, r in report["strategies"].items():
        print(f"{name:{w}} {sec(r['p50_boot_s']):>7} {sec(r['p95_boot_s']):>7}"
              f" {sec(r['max_boot_s']):>7} {sec(r['all_booted_s']):>7} "
              f"{mb(r['origin_bytes']):>10} {mb(r['host_sent_bytes']):>9} "
              f"{mb(r['peak_origin_Bps']):>9} {sec(r['precache_s']):>10} "
              f"{len(r['failed']):>6}", file=out)
    for name, r in report["strategies"].items():
        pf = r.get("prefetch")
        if pf:
            print(f"{name}: prefetch on {pf['hosts']} hosts: "
                  f"{pf['chunks_prefetched']} chunks "
                  f"({mb(pf['bytes_prefetched'])} MB) prefetched, "
                  f"{pf['chunks_used']} used, {pf['chunks_unused']} unused,"
                  f" {pf['chunks_held_already']} held already, "
                  f"{pf['chunks_deferred']} left to their owner, "
                  f"{pf['promoted']} promoted; {', '.join(pf['states'])}",
                  file=out)
    sim = report.get("simulation")
    if sim:
        print("simulator vs measured (within 15%?):", file=out)
        for name, row in sim.items():
            if "error" in row:
                print(f"  {name:10} {row['error']}", file=out)
                continue
            print(f"  {name:10} all_booted {sec(row['sim_all_booted_s'])} vs "
                  f"{sec(row['all_booted_s'])} s ({row['all_booted_ratio']})"
                  f"; origin {mb(row['sim_origin_bytes'])} vs "
                  f"{mb(row['origin_bytes'])} MB "
                  f"({row['origin_bytes_ratio']}) "
                  f"{'ok' if row['within_15pct'] else 'DIFFERS'}"
                  + "".join(f"; {k.replace('_fetch_s', '')} fetch "
                            f"{v} ms" for k, v in
                            (row.get("fetch_cost_ms") or {}).items()),
                  file=out)


def plot(report: dict, outdir: str) -> list[str]:
    """PNG plots; none (with a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    rows = report["strategies"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        times = sorted(t for t in r["boot_s"].values() if t is not None)
        if times:
            ax.step(times, [(i + 1) / len(times) for i in range(len(times))],
                    where="post", label=name)
    ax.set_xlabel("seconds since the boot storm started")
    ax.set_ylabel("fraction of VMs booted")
    ax.set_title("Boot time CDF per strategy")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, outdir, "boot_cdf.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    ax.bar(names, [rows[n]["origin_bytes"] / 1e6 for n in names])
    ws = report["working_set_bytes"]
    if ws:
        ax.axhline(ws / 1e6, color="gray", ls="--", label="working set")
        ax.legend()
    ax.set_ylabel("MB sent by the origin")
    ax.set_title("Origin bytes per strategy")
    paths.append(_save(fig, outdir, "origin_bytes.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        series = r["origin_series"]
        if series:
            ax.plot([t for t, _ in series], [b * 8 / 1e6 for _, b in series],
                    label=name)
    ax.set_xlabel("seconds since the boot storm started")
    ax.set_ylabel("origin throughput, Mbit/s")
    ax.set_title("Origin uplink over time")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, outdir, "origin_throughput.png"))
    plt.close("all")
    return paths


def _save(fig, outdir: str, name: str) -> str:
    path = os.path.join(outdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# tbf through veth delivers this much of its configured rate as TCP
# payload (measured: 38.6 of 40, 191 of 200, 950 of 1000 Mbit/s; headers).
TCP_EFFICIENCY = 0.956


def compare_with_simulator(report: dict, trace) -> dict:
    """The simulator on the run's scenario, next to what was measured."""
    try:
        from vmthunder.bench import sim
    except ImportError as exc:
        return {"error": f"no simulator: {exc}"}
    out = {}
    p = report["params"]
    for name, r in report["strategies"].items():
        if name not in sim.STRATEGIES:
            out[name] = {"error": "not modelled by the simulator"}
            continue
        # VMs began when their host's attach returned (after its copy, for
        # copy): the simulator starts them spread the same way. Identical
        # VMs started in lockstep would share the origin in lockstep too,
        # all thinking at once with the link idle, which real ones never
        # do; copy's wait is modelled by the simulator itself.
        attach = sorted((r.get("attach_s") or {}).values())
        first = attach[0] if attach and name != "copy" else 0.0
        spread = attach[-1] - first if attach and name != "copy" else 0.0
        costs = fetch_costs(r.get("fetch_latency"), p)
        try:
            got = sim.simulate_trace(
                trace, strategy=name, hosts=p["hosts"],
                vms_per_host=p["vms_per_host"],
                origin_rate_bps=_sim_rate(p["origin_rate"]),
                host_rate_bps=_sim_rate(p["host_rate"]),
                image_bytes=report["image_allocated_bytes"],
                chunk_size=p["chunk_size"],
                tree_degree=p.get("tree_degree", 2),
                vm_start_spread_s=spread, **costs)
        except Exception as exc:                # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        # The simulator counts a precache's copy in origin_bytes.
        measured = r["origin_bytes"] + (r.get("precache_origin_bytes") or 0)
        got["all_booted_s"] += first
        row = {"sim_all_booted_s": _r(got["all_booted_s"]),
               "all_booted_s": r["all_booted_s"],
               "sim_origin_bytes": round(got["origin_bytes"]),
               "origin_bytes": measured,
               # What the simulator was told a fetch costs (measured).
               "fetch_cost_ms": {k: round(v * 1e3, 3)
                                 for k, v in costs.items()}}
        row["all_booted_ratio"] = (
            round(got["all_booted_s"] / r["all_booted_s"], 3)
            if r["all_booted_s"] else None)
        row["origin_bytes_ratio"] = (
            round(got["origin_bytes"] / measured, 3) if measured else None)
        row["within_15pct"] = all(
            x is not None and abs(x - 1) <= 0.15
            for x in (row["all_booted_ratio"], row["origin_bytes_ratio"]))
        out[name] = row
    return out


# Where an agent's fetch went (p2p/volume.py fetch_latency): the sources
# that are another host, for the simulator's peer_fetch_s.
HOST_SOURCES = ("owner", "peer", "parent")


def fetch_costs(latency: dict | None, params: dict) -> dict:
    """The simulator's per-fetch costs learned from a run's measured fetch
    latency (the agents': _latency_totals): {origin_fetch_s,
    peer_fetch_s}, each present when the run measured it. A cost is the
    mean fetch's time less what its bytes take alone on the link at the
    configured rate (the simulator moves the bytes itself): request
    handling, round trips, the check against the manifest, waits for
    CPU on a busy machine (not modelled), an owner's or parent's
    hand-over. The mean also holds what the model has on its own (a
    fetch's share of a busy link; an owner's or parent's own fetch, when
    it lacked the chunk, is one more fetch in the model): the costs err
    on the slow side (medians miss the tail that makes boots slow: with
    them the simulator said 0.86-0.88 of the measured time where means
    say 0.95 on the same 4-host runs)."""
    if not latency:
        return {}
    cs = params["chunk_size"]

    def cost(rows, rate_text):
        rows = [r for r in rows if r and r.get("fetches")]
        if not rows:
            return None
        n = sum(r["fetches"] for r in rows)
        mean = sum(r["mean_ms"] * r["fetches"] for r in rows) / n / 1e3
        chunk_bytes = sum(r["chunks"] for r in rows) / n * cs
        rate = _sim_rate(rate_text) / 8
        return max(0.0, mean - chunk_bytes / rate)
    out = {"origin_fetch_s": cost([latency.get("origin")],
                                  params["origin_rate"]),
           "peer_fetch_s": cost([latency.get(k) for k in HOST_SOURCES],
                                params["host_rate"])}
    return {k: v for k, v in out.items() if v is not None}


def _sim_rate(text: str | None) -> float:
    if _rate(text or "none") is None:
        return float("inf")
    return topo_mod.parse_rate(text) * TCP_EFFICIENCY


def allocated_bytes(path: str) -> int:
    """Bytes of data (not holes) in ``path``: what a sparse copy moves."""
    total, pos = 0, 0
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    return total


# -- main ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmthunder bench",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split(
            "\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hosts", type=int, default=8,
                   help="compute hosts (network namespaces)")
    p.add_argument("--vms-per-host", type=int, default=4,
                   help="VMs booted on each host at once")
    p.add_argument("--origin-rate", default="200mbit",
                   help="origin uplink rate, tc syntax (e.g. 200mbit, 1gbit)"
                        "; 'none' for unshaped")
    p.add_argument("--host-rate", default="1gbit",
                   help="each compute host's uplink rate; 'none' unshaped")
    p.add_argument("--strategies", default=",".join(strat_mod.STRATEGIES),
                   help="comma-separated, from: "
                        + ", ".join(f"{n} ({c.summary})" for n, c in
                                    strat_mod.STRATEGIES.items()))
    p.add_argument("--guest", choices=sorted(GUESTS), default="debian",
                   help="which guest image: 'debian' (realistic, >=2 GiB, "
                        "systemd; scripts/build-guest-debian.sh) or 'small' "
                        "(busybox, 256 MiB)")
    p.add_argument("--workload", choices=("replay", "qemu"),
                   default="replay",
                   help="'replay': virtual VMs replay the guest's recorded "
                        "boot trace with its think times (dozens fit on 2 "
                        "cores); 'qemu': real QEMU (TCG) boots, for small N")
    p.add_argument("--trace", help="boot trace to replay (default: the one "
                                   "shipped for --guest)")
    p.add_argument("--prefetch-trace", metavar="TRACE",
                   help="boot trace published with the image's export "
                        "(what vmthunder-prefetch's agents prefetch); "
                        "default: the trace replayed. Give another boot's "
                        "trace to see a trace that does not match the "
                        "boot exactly")
    p.add_argument("--tree-degree", type=int, default=2,
                   help="children per host in the 'tree' strategy (host i's "
                        "parent is host (i-1)//degree; host0 reads the "
                        "origin)")
    p.add_argument("--chunk-size", type=sizes.parse_size,
                   default=opts_mod.DEFAULT_EXPORT_CHUNK_SIZE,
                   help="chunk size of the image's export, so of every "
                        "vmthunder cache (suffixes K, M)")
    p.add_argument("--config-file", metavar="PATH",
                   help="vmthunder options (oslo.config file) for every "
                        "`vmthunder serve` and agent of the run, e.g. "
                        "[cache] max_pending_writes; --chunk-size wins over "
                        "its [cache] chunk_size")
    p.add_argument("--vm-timeout", type=float, default=900,
                   help="seconds after which a VM that has not booted "
                        "counts as failed")
    p.add_argument("--output", default=None,
                   help="directory for results.json and the PNG plots "
                        "(default: bench-results/RUN-ID under the current "
                        "directory)")
    p.add_argument("--no-sim", action="store_true",
                   help="skip the simulator comparison")
    p.add_argument("--compare", metavar="RESULTS_JSON",
                   help="run nothing: print the table of a finished run's "
                        "results.json with the simulator's figures for the "
                        "same scenario next to the measured ones")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--profile-host", type=int, metavar="N",
                   help="record host N's agent with py-spy during each "
                        "agent strategy's boots (vmthunder, "
                        "vmthunder-prefetch, tree; host0 is 0); py-spy "
                        "--nonblocking, so the agent is never paused")
    p.add_argument("--profile-out", metavar="FILE", default="profile.txt",
                   help="with --profile-host: where the profiles go, one "
                        "per strategy (FILE with the strategy's name "
                        "before its extension); .txt: py-spy's raw "
                        "folded stacks, .json: speedscope, else SVG")
    p.add_argument("--workdir", default=None,
                   help="where the run's temporary files go (removed at the "
                        "end); default: the system temp dir")
    return p


def _rate(text: str):
    return None if text.lower() in ("none", "0", "") else text


def compare_saved(path: str) -> int:
    with open(path) as f:
        report = json.load(f)
    trace = vmhost.until_boot(trace_mod.load(os.path.join(
        REPO, report["params"]["trace"])))
    report["simulation"] = compare_with_simulator(report, trace)
    print_table(report)
    print(json.dumps(report["simulation"]))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return compare_saved(args.compare)
    if args.hosts < 1 or args.vms_per_host < 1:
        print("vmthunder bench: --hosts and --vms-per-host must be >= 1",
              file=sys.stderr)
        return 2
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in strat_mod.STRATEGIES]
    if unknown:
        print(f"vmthunder bench: unknown strategy {', '.join(unknown)}; "
              f"known: {', '.join(strat_mod.STRATEGIES)}", file=sys.stderr)
        return 2
    guest_name, script, shipped = GUESTS[args.guest]
    guest_dir = guest_mod.default_dir(guest_name)
    if not os.path.exists(os.path.join(guest_dir, ".complete")) and \
            not os.path.exists(os.path.join(guest_dir, "guest.json")):
        log(f"building the {args.guest} guest ({script}; once)")
        subprocess.run(["bash", guest_mod.builder(script), guest_dir],
                       check=True, stdout=sys.stderr)
    with open(os.path.join(guest_dir, "guest.json")) as f:
        guest_meta = json.load(f)
    image = os.path.join(guest_dir, guest_meta["root"])
    trace_path = args.trace or os.path.join(TRACES, shipped)
    # What a boot reads: requests up to the boot marker.
    trace = vmhost.until_boot(trace_mod.load(trace_path))
    workload = {"kind": args.workload, "trace": trace_path,
                "guest_dir": guest_dir}
    run_id = time.strftime("%Y%m%d-%H%M%S")
    outdir = args.output or os.path.join("bench-results", run_id)
    os.makedirs(outdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vmthunder-bench-", dir=args.workdir)
    args.conf_file = os.path.join(workdir, "vmthunder.conf")
    with open(args.conf_file, "w") as f:
        if args.config_file:
            with open(args.config_file) as user:
                f.write(user.read() + "\n")
        f.write(f"[cache]\nchunk_size = {args.chunk_size}\n"
                "[iscsi]\nmanifest_lun = 2\n")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    report = {"params": {
        "hosts": args.hosts, "vms_per_host": args.vms_per_host,
        "origin_rate": args.origin_rate, "host_rate": args.host_rate,
        "strategies": names, "guest": args.guest, "workload": args.workload,
        "trace": os.path.relpath(trace_path, REPO),
        "prefetch_trace": args.prefetch_trace,
        "chunk_size": args.chunk_size, "vm_timeout_s": args.vm_timeout,
        "tree_degree": args.tree_degree,
        "config_file": args.config_file,
        "profile_host": args.profile_host},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image_size": os.path.getsize(image),
        "image_allocated_bytes": allocated_bytes(image),
        "working_set_bytes": trace.working_set_bytes(),
        # The chunks those bytes fall in: what one cold cache fetches.
        "working_set_chunk_bytes": len(trace.chunks(args.chunk_size))
        * args.chunk_size,
        "trace_read_bytes": trace.read_bytes(),
        "strategies": {}}
    topo = origin = None
    try:
        removed = topo_mod.cleanup_stale()
        if removed:
            log(f"removed leftovers of a crashed run: {', '.join(removed)}")
        topo = topo_mod.Topology(args.hosts,
                                 origin_rate=_rate(args.origin_rate),
                                 host_rate=_rate(args.host_rate))
        topo.create()
        log(f"{args.hosts} hosts + origin up (origin {args.origin_rate}, "
            f"hosts {args.host_rate})")
        log(f"exporting {image} ({report['image_size'] / 1e6:.0f} MB) on "
            "the origin")
        origin = OriginHost(topo, workdir, image, args.chunk_size,
                            args.prefetch_trace or trace_path)
        origin.coordination = (origin.start_redis(workdir)
                               if NEEDS_REDIS & set(names) else None)
        report["single_local_boot_s"] = single_local_boot(
            args, image, workdir, workload)
        log(f"single local boot: {report['single_local_boot_s']} s")
        for name in names:
            log(f"strategy {name}: {strat_mod.STRATEGIES[name].summary}")
            report["strategies"][name] = run_strategy(
                args, topo, origin, name, workdir, workload)
            r = report["strategies"][name]
            log(f"{name}: all booted {r['all_booted_s']} s, origin "
                f"{mb(r['origin_bytes'])} MB"
                + (f" (of which membership {mb(r['coordination_bytes'])} "
                   "MB)" if r.get("coordination_bytes") is not None else "")
                + f", {len(r['failed'])} failed"
                + (f"; per VM {r['read_wait_s']} s in reads, read ms "
                   + " ".join(f"{q} {v}" for q, v in r["read_ms"].items())
                   if r.get("read_wait_s") is not None else "")
                + "".join(f"; {where} fetch ms mean {f['mean_ms']} "
                          f"({f['fetches']} fetches)" for where, f in
                          (r.get("fetch_latency") or {}).items()))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if origin is not None:
            origin.stop()
        if topo is not None:
            topo.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.workload == "replay" and not args.no_sim:
        report["simulation"] = compare_with_simulator(report, trace)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    if not args.no_plots:
        report["plots"] = plot(report, outdir)
    print_table(report)
    log(f"results in {outdir}/")
    summary = {name: {k: r[k] for k in ("all_booted_s", "p50_boot_s",
                                        "origin_bytes", "failed")}
               for name, r in report["strategies"].items()}
    for row in summary.values():
        row["failed"] = len(row["failed"])
    print(json.dumps({"strategies": summary,
                      "working_set_bytes": report["working_set_bytes"],
                      "single_local_boot_s": report["single_local_boot_s"],
                      "results": os.path.join(outdir, "results.json")}))
    failed = sum(len(r["failed"]) for r in report["strategies"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
