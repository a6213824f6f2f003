"""Fixtures for functional tests: real `vmthunder serve` processes, images.

Every process a fixture starts is stopped when the test ends, pass or
fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
READY_RE = re.compile(r"^vmthunder: ready export=(\S*) uri=(\S+)$")


def need(*binaries):
    """Skip unless every binary is installed (scripts/install.sh does)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; run "
                    "scripts/install.sh")


def make_image(path, size: int, *, seed: int = 0, hole_at: int | None = None):
    """A file of pseudo-random bytes (reproducible); sparse from hole_at."""
    import random
    rng = random.Random(seed)
    data_end = size if hole_at is None else hole_at
    with open(path, "wb") as f:
        written = 0
        while written < data_end:
            n = min(1 << 20, data_end - written)
            f.write(rng.randbytes(n))
            written += n
        f.truncate(size)
    return str(path)


class DaemonProc:
    """A daemon a test started (``proc``), its stderr in ``stderr_path``."""

    proc: subprocess.Popen
    stderr_path: str

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()


@dataclasses.dataclass
class Served(DaemonProc):
    proc: subprocess.Popen
    uris: dict
    stats_file: str
    cache_dir: str
    stderr_path: str

    def uri(self, export: str) -> str:
        return self.uris[export]

    def stats(self) -> dict:
        with open(self.stats_file) as f:
            return json.load(f)


def start_serve(image: str, cache_dir: str, *args: str,
                listen: str = "tcp:127.0.0.1:0", workdir: str,
                timeout: float = 30, config_file: str | None = None
                ) -> Served:
    """Start `vmthunder serve` and wait for its ready lines."""
    stats_file = os.path.join(workdir, f"stats-{time.monotonic_ns()}.json")
    stderr_path = stats_file + ".stderr"
    config = ["--config-file", config_file] if config_file else []
    argv = [sys.executable, "-m", "vmthunder.cli", "-v", *config,
            "serve", image,
            "--listen", listen, "--cache-dir", cache_dir,
            "--stats-file", stats_file, *args]
    err = open(stderr_path, "w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                            text=True, cwd=REPO)
    err.close()
    served = Served(proc, {}, stats_file, cache_dir, stderr_path)
    expected = 1 + args.count("--snapshot")
    deadline = time.monotonic() + timeout
    try:
        while len(served.uris) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError("vmthunder serve did not get ready")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"vmthunder serve exited ({proc.wait()}): "
                    f"{served.stderr()[-2000:]}")
            m = READY_RE.match(line.strip())
            if m:
                served.uris[m.group(1)] = m.group(2)
    except BaseException:
        served.stop(signal.SIGKILL)
        raise
    return served


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(image, *args, cache_dir=..., listen=...) -> Served."""
    started: list[Served] = []

    def factory(image, *args, cache_dir=None, listen="tcp:127.0.0.1:0",
                config_file=None):
        served = start_serve(image, cache_dir or str(tmp_path / "cache"),
                             *args, listen=listen, workdir=str(tmp_path),
                             config_file=config_file)
        started.append(served)
        return served

    yield factory
    for served in started:
        with contextlib.suppress(Exception):
            served.stop()


@pytest.fixture(scope="session")
def guest_dir():
    """The small test guest, built once (cached under .cache/guest)."""
    need("qemu-system-x86_64")
    out = os.path.join(REPO, ".cache", "guest")
    subprocess.run([os.path.join(REPO, "scripts", "build-guest.sh"), out],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def build_guest_disk() -> dict:
    """The whole-disk test guest (scripts/build-guest-disk.sh: MBR,
    SYSLINUX, root on /dev/vda1), built once, cached under
    .cache/guest-disk: its guest.json, plus ``path`` (the raw disk image)
    and ``dir``."""
    out = os.path.join(REPO, ".cache", "guest-disk")
    subprocess.run([os.path.join(REPO, "scripts", "build-guest-disk.sh"),
                    out], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "guest.json")) as f:
        meta = json.load(f)
    meta["dir"] = out
    meta["path"] = os.path.join(out, meta["disk"])
    return meta


@pytest.fixture(scope="session")
def guest_disk():
    """The whole-disk test guest (see build_guest_disk): a dict."""
    need("qemu-system-x86_64")
    return build_guest_disk()
