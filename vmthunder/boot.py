"""`vmthunder boot`: boot a real VM through vmthunder (the main job).

For each VM: start `vmthunder serve IMAGE --snapshot VM` on a unix socket,
boot QEMU from that NBD export, wait for the guest's boot marker on the
serial console, stop QEMU and the server, and report time to boot, bytes
the guest read against the image size, and bytes fetched from the image
source. VMs boot one after the other on the same cache, so the second one
shows what a warm host cache costs: nothing fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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

from vmthunder import guest as guest_mod
from vmthunder import serve
from vmthunder.cache import snapshot

MiB = 1024 * 1024
ORIGIN_NAMES = {"iscsi": "iSCSI LUN on tgtd, each chunk verified",
                "file": "image file"}


class BootError(Exception):
    pass


@dataclasses.dataclass
class Guest:
    kernel: str
    initrd: str
    root: str
    append: str
    marker: str
    failure_marker: str
    # The guest's own needs (guest.json), over [boot] memory_mb.
    memory_mb: int | None = None


def load_guest(guest_dir: str, build: bool = True) -> Guest:
    """The test guest in ``guest_dir``, built first when missing (with
    the builder shipped in the package, vmthunder.guest)."""
    meta_path = os.path.join(guest_dir, "guest.json")
    if not os.path.exists(os.path.join(guest_dir, ".complete")):
        try:
            script = guest_mod.builder(guest_mod.SMALL)
        except guest_mod.BuilderMissing as exc:
            raise BootError(f"no guest in {guest_dir} and {exc}") from None
        if not build:
            raise BootError(f"no guest in {guest_dir}; run "
                            f"bash {script} {guest_dir}")
        print(f"vmthunder boot: building the test guest in {guest_dir} "
              "(once)", file=sys.stderr, flush=True)
        subprocess.run(["bash", script, guest_dir], check=True,
                       stdout=sys.stderr)
    with open(meta_path) as f:
        meta = json.load(f)

    def path(key):
        return os.path.join(guest_dir, meta[key])

    append = meta["append"]
    if meta.get("poweroff_flag"):
        # Guests that stay up unless told (the Debian one): power off
        # after the marker, so the guest's writes are synced and QEMU ends.
        append = f"{append} {meta['poweroff_flag']}"
    return Guest(kernel=path("kernel"), initrd=path("initrd"),
                 root=path("root"), append=append,
                 memory_mb=meta.get("memory_mb"),
                 marker=meta["marker"],
                 failure_marker=meta.get("failure_marker",
                                         "VMTHUNDER-BOOT-FAILED"))


def qemu_command(conf, guest: Guest, drive_uri: str) -> list[str]:
    return [conf.boot.qemu_binary, "-accel", conf.boot.qemu_accel,
            "-m", str(guest.memory_mb or conf.boot.memory_mb), "-smp", "1",
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", guest.kernel, "-initrd", guest.initrd,
            "-append", guest.append,
            "-drive", f"file={drive_uri},format=raw,if=virtio,cache=none"]


@contextlib.asynccontextmanager
async def running(argv: list[str], **kwargs):
    """A subprocess that is stopped (TERM, then KILL) however we leave."""
    proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def wait_line(stream, prefix: str, timeout: float,
                    fail: str | None = None, log=None) -> str:
    """Read lines until one contains ``prefix``; BootError on timeout/EOF."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootError(f"no {prefix!r} within {timeout:.0f} s")
        try:
            raw = await asyncio.wait_for(stream.readline(), left)
        except asyncio.TimeoutError:
            raise BootError(f"no {prefix!r} within {timeout:.0f} s") \
                from None
        if not raw:
            raise BootError(f"output ended before {prefix!r}")
        line = raw.decode("utf-8", "replace").rstrip()
        if log is not None:
            log.append(line)
        if prefix in line:
            return line
        if fail and fail in line:
            raise BootError(f"guest reported: {line}")


async def boot_one(conf, guest: Guest, image: str, cache_dir: str,
                   vm_name: str, workdir: str,
                   chunk_size: int | None = None,
                   trace: str | None = None) -> dict:
    sock = os.path.join(workdir, f"{vm_name}.sock")
    stats_file = os.path.join(workdir, f"{vm_name}.stats.json")
    serve_argv = [sys.executable, "-m", "vmthunder.cli", "serve", image,
                  "--listen", f"unix:{sock}", "--cache-dir", cache_dir,
                  "--snapshot", vm_name, "--stats-file", stats_file]
    if chunk_size:
        serve_argv += ["--chunk-size", str(chunk_size)]
    raw_trace = os.path.join(workdir, f"trace-{vm_name}")
    if trace:
        # serve records each export into its own file; ours is the VM's.
        serve_argv += ["--trace", os.path.join(workdir, "trace-{export}")]
    console: list[str] = []
    async with running(serve_argv, stdout=asyncio.subprocess.PIPE) as srv:
        try:
            await wait_line(srv.stdout, serve.READY_PREFIX, 30)
        except BootError as exc:
            raise BootError(f"vmthunder serve did not start: {exc}") \
                from None
        uri = f"nbd+unix:///{vm_name}?socket={sock}"
        argv = qemu_command(conf, guest, uri)
        started = time.monotonic()
        async with running(argv, stdin=asyncio.subprocess.DEVNULL,
                           stdout=asyncio.subprocess.PIPE,
                           stderr=asyncio.subprocess.STDOUT) as vm:
            try:
                await wait_line(vm.stdout, guest.marker,
                                conf.boot.boot_timeout,
                                fail=guest.failure_marker, log=console)
            except BootError as exc:
                tail = "\n  ".join(console[-15:])
                raise BootError(f"VM {vm_name} did not boot: {exc}\n  "
                                f"console:\n  {tail}") from None
            marker_at = time.monotonic()
            boot_s = marker_at - started
            # The guest syncs its write and powers off by itself.
            try:
                await asyncio.wait_for(vm.wait(), 30)
            except asyncio.TimeoutError:
                pass
        srv.send_signal(signal.SIGTERM)
        await asyncio.wait_for(srv.wait(), 30)
    with open(stats_file) as f:
        stats = json.load(f)
    snap = stats["snapshots"][vm_name]
    cache = stats["cache"]
    if trace:
        _finish_trace(raw_trace, trace, started, marker_at,
                      qemu_accel=conf.boot.qemu_accel,
                      memory_mb=guest.memory_mb or conf.boot.memory_mb,
                      kernel=os.path.basename(guest.kernel))
    return {
        "vm": vm_name,
        "boot_s": round(boot_s, 3),
        "image_bytes": stats["image_size"],
        "guest_read_bytes": snap["bytes_read"],
        "guest_read_requests": snap["read_requests"],
        "guest_written_bytes": snap["bytes_written"],
        "fetched_bytes": cache["bytes_fetched"],
        "chunk_size": cache["chunk_size"],
    }


def _finish_trace(raw: str, path: str, started: float, marker_at: float,
                  **header) -> None:
    """Put the boot's times into the trace `vmthunder serve` recorded.

    serve and we read the same CLOCK_MONOTONIC, so its time 0 (the first
    request) places QEMU's start and the boot marker on the trace's clock.
    """
    from vmthunder import trace as trace_mod
    if not os.path.exists(raw):
        raise BootError(f"vmthunder serve wrote no trace to {raw}: the "
                        "guest made no request?")
    recorded = trace_mod.load(raw)
    origin = recorded.header["origin_monotonic"]
    recorded.header.update(boot_s=round(marker_at - origin, 6),
                           vm_start_s=round(started - origin, 6),
                           recorder="vmthunder boot", **header)
    trace_mod.save(recorded, path)


def _report(result: dict) -> str:
    img = result["image_bytes"]
    read = result["guest_read_bytes"]
    return (
        f"VM {result['vm']} booted in {result['boot_s']:.2f} s\n"
        f"  guest read {read / MiB:.1f} MiB of the {img / MiB:.0f} MiB "
        f"image ({100 * read / img:.1f}%) in "
        f"{result['guest_read_requests']} requests, wrote "
        f"{result['guest_written_bytes'] / 1024:.0f} KiB to its snapshot\n"
        f"  fetched from the origin ({ORIGIN_NAMES[result['origin']]}): "
        f"{result['fetched_bytes'] / MiB:.1f} MiB "
        f"(chunk size {result['chunk_size'] // 1024} KiB)")


async def run(args, conf) -> int:
    if args.vms < 1:
        raise ValueError(f"--vms {args.vms}: boot at least one VM")
    if shutil.which(conf.boot.qemu_binary) is None:
        raise BootError(f"{conf.boot.qemu_binary} not found; run "
                        "scripts/install.sh (Debian package qemu-system-x86)")
    guest = await asyncio.to_thread(
        load_guest, getattr(args, "guest_dir", None) or conf.boot.guest_dir)
    image = args.image or guest.root
    workdir = tempfile.mkdtemp(prefix="vmthunder-boot-")
    cache_dir = args.cache_dir or os.path.join(workdir, "cache")
    results = []
    origin = None
    try:
        origin_kind = choose_origin(args.origin)
        if origin_kind == "iscsi":
            origin = await asyncio.to_thread(
                PrivateOrigin, conf, os.path.join(workdir, "origin"),
                args.chunk_size)
            source = await asyncio.to_thread(origin.export, image)
        else:
            source = image
        for i in range(args.vms):
            vm_name = f"vm{i + 1}"
            try:
                trace = getattr(args, "trace", None)
                if trace:
                    from vmthunder.trace import export_trace_path
                    trace = export_trace_path(trace, vm_name, args.vms > 1)
                result = await boot_one(conf, guest, source, cache_dir,
                                        vm_name, workdir, args.chunk_size,
                                        trace)
                result["origin"] = origin_kind
                if trace:
                    result["trace"] = trace
                if origin is not None:
                    result["origin_portal"] = origin.cfg.portal
            except BootError as exc:
                print(f"vmthunder boot: {exc}", file=sys.stderr)
                return 1
            results.append(result)
            if not args.json:
                print(_report(result), flush=True)
            # The VM is gone: so is its snapshot (the cache stays).
            for path in glob_snapshot(cache_dir, vm_name):
                os.unlink(path)
    finally:
        if origin is not None:
            await asyncio.to_thread(origin.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"vms": results}))
    return 0


def choose_origin(wanted: str) -> str:
    """``iscsi`` (the image on a tgtd LUN, as in production) when we can
    run tgtd, i.e. as root with tgt installed; else ``file``."""
    can_iscsi = os.geteuid() == 0 and shutil.which("tgtd") is not None
    if wanted == "iscsi" and not can_iscsi:
        raise BootError("--origin iscsi needs root and tgtd (Debian "
                        "package tgt; scripts/install.sh installs it)")
    if wanted == "auto":
        if not can_iscsi:
            print("vmthunder boot: not root or no tgtd: serving the image "
                  "file directly (--origin file)", file=sys.stderr)
        return "iscsi" if can_iscsi else "file"
    return wanted


class PrivateOrigin:
    """A tgtd of this boot's own, exporting the image like `vmthunder
    export` does (LUN 1 image, LUN 2 manifest), on a free loopback port;
    stopped at the end so the boot leaves nothing running."""

    def __init__(self, conf, directory: str, chunk_size: int | None):
        from vmthunder.volume import export
        self.cfg = export.ExportConfig(
            export_dir=directory, portal=f"127.0.0.1:{free_port()}",
            control_port=random.randrange(20000, 32768),
            iqn_prefix=conf.export.iqn_prefix,
            chunk_size=chunk_size or conf.export.chunk_size)
        self._export = export

    def export(self, image: str) -> str:
        def quiet(text):
            pass
        result = self._export.export_image(self.cfg, image, "boot-guest",
                                           out=quiet)
        return result.record.url(1)

    def stop(self) -> None:
        try:
            self.cfg.tgt().stop()
        except Exception as exc:          # noqa: BLE001 - report, go on
            print(f"vmthunder boot: could not stop its tgtd: {exc}",
                  file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def glob_snapshot(cache_dir: str, vm_name: str) -> list[str]:
    """The overlay files of VM ``vm_name`` in any image's cache."""
    found = []
    for entry in os.scandir(cache_dir):
        paths = snapshot.snapshot_paths(
            os.path.join(entry.path, "snapshots"), vm_name)
        found.extend(p for p in paths if os.path.exists(p))
    return found
