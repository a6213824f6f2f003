"""The whole chain tgtd -> `vmthunder serve` (cache) -> NBD, with faults.

A real tgtd per test (tests/functional/iscsi_fixtures.py, or the one
`vmthunder export` starts itself), a real `vmthunder serve iscsi://...`
process, and QEMU's tools as the NBD clients:

- an exported image reads back identical, each chunk fetched once;
- an unreachable portal fails the attach, naming the portal;
- tgtd stopped and started again while a reader reads: the reader stalls,
  then completes with correct data, and every chunk the cache marked
  present holds the origin's bytes;
- a chunk corrupted on the origin fails its read (I/O error, after one
  retry), is named in the log, and is never marked in the cache;
- a LUN whose size disagrees with its manifest is refused at start.

Needs root and tgt (skips otherwise), qemu-img and qemu-io.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import READY_RE, REPO, Served, make_image, need
from tests.functional.iscsi_fixtures import (  # noqa: F401
    free_control_port, free_port, need_tgtd, tgtd)
from tests.waiting import wait_until
from vmthunder import opts as opts_mod
from vmthunder.volume import tgt as tgt_mod
from vmthunder.volume.manifest import build_manifest

MiB = 1 << 20
IQN = "iqn.2026-11.org.vmthunder.test"
CHUNK = 256 * 1024


@pytest.fixture(autouse=True)
def _tools():
    need_tgtd()
    need("qemu-img", "qemu-io")


def write_conf(path, **iscsi) -> str:
    lines = ["[iscsi]"] + [f"{k} = {v}" for k, v in iscsi.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pad512(path) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(-(-size // 512) * 512)


@contextlib.contextmanager
def serving(image: str, tmp_path, *args: str, conf: str | None = None,
            timeout: float = 30):
    """`vmthunder serve IMAGE` on a free loopback port; stopped on exit."""
    stats = str(tmp_path / f"stats-{time.monotonic_ns()}.json")
    err_path = stats + ".stderr"
    cache_dir = str(tmp_path / "cache")
    argv = [sys.executable, "-m", "vmthunder.cli", "-v"]
    if conf:
        argv += ["--config-file", conf]
    argv += ["serve", image, "--listen", "tcp:127.0.0.1:0", "--cache-dir",
             cache_dir, "--stats-file", stats, *args]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=REPO)
    served = Served(proc, {}, stats, cache_dir, err_path)
    try:
        deadline = time.monotonic() + timeout
        while not served.uris:
            assert time.monotonic() < deadline, "serve not ready"
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"vmthunder serve exited "
                                     f"({proc.wait()}): {served.stderr()}")
            m = READY_RE.match(line.strip())
            if m:
                served.uris[m.group(1)] = m.group(2)
        yield served
    finally:
        served.stop(timeout=20)


def final_stats(served: Served) -> dict:
    """Stats written at exit (the server must have stopped cleanly)."""
    assert served.stop() == 0, served.stderr()[-3000:]
    return served.stats()


def cache_files(cache_dir: str) -> tuple[bytes, str]:
    """The chunk map (one byte per chunk) and the data file path of the
    one cache under cache_dir."""
    dirs = [e.path for e in os.scandir(cache_dir) if e.is_dir()]
    assert len(dirs) == 1, dirs
    with open(os.path.join(dirs[0], "map"), "rb") as f:
        cmap = f.read()
    return cmap, os.path.join(dirs[0], "data")


def check_marked_chunks(cache_dir: str, source: str, chunk: int) -> int:
    """Every chunk marked present in the cache equals the source; the
    number of marked chunks."""
    cmap, data_path = cache_files(cache_dir)
    assert set(cmap) <= {0, 1}, "map bytes other than 0/1"
    marked = 0
    with open(data_path, "rb") as data, open(source, "rb") as src:
        for i, state in enumerate(cmap):
            if state:
                marked += 1
                data.seek(i * chunk)
                src.seek(i * chunk)
                assert data.read(chunk) == src.read(chunk), \
                    f"chunk {i} marked present holds wrong data"
    return marked


def qemu_compare(image: str, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                           image, uri], capture_output=True, text=True,
                          timeout=60)


def nbd_range_opts(uri: str, offset: int, length: int) -> str:
    """QEMU image options reading [offset, offset+length) of an NBD
    export (QEMU's raw driver over its nbd driver)."""
    m = re.match(r"^nbd://([^:/]+):(\d+)/(.*)$", uri)
    assert m, uri
    host, port, name = m.groups()
    return (f"driver=raw,offset={offset},size={length},file.driver=nbd,"
            f"file.server.type=inet,file.server.host={host},"
            f"file.server.port={port},file.export={name}")


def lun_with_manifest(tgtd, tmp_path, size: int, *, name="img",  # noqa: F811
                      manifest_of: str | None = None, seed: int = 3):
    """tgtd with LUN 1 = a random volume, LUN 2 = its manifest (as
    `vmthunder export` lays it out); (daemon, target, volume path)."""
    volume = make_image(tmp_path / "volume.raw", size, seed=seed)
    manifest = build_manifest(manifest_of or volume, name, CHUNK)
    mpath = tmp_path / "manifest.lun"
    mpath.write_bytes(manifest.to_bytes())
    pad512(mpath)
    daemon = tgtd()
    target = daemon.add_target(f"{IQN}:{name}")
    daemon.add_lun(target, 1, volume)
    daemon.add_lun(target, 2, str(mpath))
    return daemon, target, volume


# -- (a) export, attach, compare ------------------------------------------

def test_exported_image_reads_back_identical_each_chunk_once(tmp_path):
    size = random.Random().randrange(32 * MiB, 64 * MiB + 1, 4096)
    image = make_image(tmp_path / "src.raw", size, seed=size)
    port = free_port()
    control = free_control_port()
    export_dir = tmp_path / "exports"
    conf = tmp_path / "vmthunder.conf"
    conf.write_text("[export]\n"
                    f"export_dir = {export_dir}\n"
                    f"portal = 127.0.0.1:{port}\n"
                    f"tgtd_control_port = {control}\n"
                    f"iqn_prefix = {IQN}\n"
                    "[iscsi]\nlogin_timeout = 10\n")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "vmthunder.cli", "--config-file",
             str(conf), "export", image, "--name", "chain"],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        # By export name (resolved through [export]) and by URL.
        for image_ref in ("export:chain",
                          f"iscsi://127.0.0.1:{port}/{IQN}:chain/1"):
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
            with serving(image_ref, tmp_path, conf=str(conf)) as served:
                uri = next(iter(served.uris.values()))
                r = qemu_compare(image, uri)
                assert r.returncode == 0, r.stdout + r.stderr
                assert "Images are identical" in r.stdout
                stats = final_stats(served)
            cache = stats["cache"]
            chunk = opts_mod.DEFAULT_EXPORT_CHUNK_SIZE   # the export's
            assert stats["image_size"] == size
            assert cache["chunk_size"] == chunk
            # Every chunk once, nothing more, nothing wrong.
            assert cache["bytes_fetched"] == size, cache
            assert cache["chunks_fetched"] == -(-size // chunk), cache
            assert stats["source"]["bytes_read"] == size, stats["source"]
            assert cache["verify_errors"] == 0, cache
            assert cache["fetch_errors"] == 0, cache
            assert check_marked_chunks(served.cache_dir, image, chunk) \
                == -(-size // chunk)
    finally:
        with contextlib.suppress(Exception):
            tgt_mod.Tgt(control, f"127.0.0.1:{port}", str(export_dir)).stop()


# -- (b) origin unreachable at attach -------------------------------------

def test_unreachable_origin_fails_attach_naming_the_portal(tmp_path):
    port = free_port()              # nobody listens there
    conf = write_conf(tmp_path / "c.conf", login_timeout=5)
    url = f"iscsi://127.0.0.1:{port}/iqn.2026-11.x:y/1"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "--config-file", conf,
         "serve", url, "--listen", "tcp:127.0.0.1:0", "--cache-dir",
         str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "vmthunder: ready" not in proc.stdout
    assert elapsed < 5 + 5, elapsed      # login timeout + interpreter start


# -- (c) target stopped and started while a reader reads ------------------

def test_target_restart_while_reading_completes_with_correct_data(
        tgtd, tmp_path):  # noqa: F811
    size = 48 * MiB
    daemon, target, volume = lun_with_manifest(tgtd, tmp_path, size)
    conf = write_conf(tmp_path / "c.conf", reconnect_timeout=20,
                      login_timeout=5)
    with serving(daemon.url(target, 1), tmp_path, conf=conf) as served:
        uri = next(iter(served.uris.values()))
        out = str(tmp_path / "out.raw")
        # Rate-limited so that the outage falls in the middle of it
        # (~3 s at 16 MiB/s).
        reader = subprocess.Popen(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw",
             "-r", "16M", uri, out], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            # A sixth of the image copied (the rest takes ~2.5 s more).
            wait_until(lambda: reader.poll() is not None or (
                os.path.exists(out)
                and os.stat(out).st_blocks * 512 >= 8 * MiB),
                "the reader to be under way", timeout=20)
            assert reader.poll() is None, "reader finished before the outage"
            t_down = time.monotonic()
            daemon.stop()
            time.sleep(2.0)
            daemon.start()
            t_up = time.monotonic()
            output, _ = reader.communicate(timeout=60)
            t_done = time.monotonic()
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert reader.returncode == 0, output
        assert t_up - t_down >= 2.0 and t_done > t_up
        assert daemon.exits == [0]
        # Correct data, then all of it once more through the chain.
        r = subprocess.run(["cmp", volume, out], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_compare(volume, uri)
        assert r.returncode == 0, r.stdout + r.stderr
        stats = final_stats(served)
    assert stats["source"]["reconnects"] >= 1, stats["source"]
    assert stats["cache"]["verify_errors"] == 0, stats["cache"]
    assert stats["cache"]["bytes_fetched"] == size, stats["cache"]
    # Nothing corrupt in the cache: the files themselves.
    assert check_marked_chunks(served.cache_dir, volume, CHUNK) \
        == size // CHUNK


# -- (d) a chunk corrupted on the origin ----------------------------------

def test_corrupted_chunk_on_origin_is_detected(tgtd, tmp_path):  # noqa: F811
    size = 32 * MiB
    daemon, target, volume = lun_with_manifest(tgtd, tmp_path, size,
                                               name="bad", seed=7)
    pristine = str(tmp_path / "pristine.raw")
    shutil.copy(volume, pristine)
    bad = 37
    # tgtd reads the backing file through the page cache: a write through
    # the filesystem is what the LUN returns from now on.
    with open(volume, "r+b") as f:
        f.seek(bad * CHUNK + 1000)
        f.write(b"\xff\x00corrupt\x00\xff")
    with serving(daemon.url(target, 1), tmp_path) as served:
        uri = next(iter(served.uris.values()))
        # A read touching the bad chunk: an I/O error, not wrong data.
        r = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c",
             f"read {bad * CHUNK - 4096} 16384", uri],
            capture_output=True, text=True, timeout=60)
        assert "Input/output error" in r.stdout + r.stderr, r
        assert "read failed" in r.stdout + r.stderr, r
        # Every other chunk reads fine and right.
        for skip, count, name in ((0, bad, "before"),
                                  (bad + 1, size // CHUNK - bad - 1,
                                   "after")):
            out = str(tmp_path / f"{name}.raw")
            r = subprocess.run(
                ["qemu-img", "convert", "--image-opts",
                 nbd_range_opts(uri, skip * CHUNK, count * CHUNK),
                 "-O", "raw", out],
                capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            with open(pristine, "rb") as f:
                f.seek(skip * CHUNK)
                expected = f.read(count * CHUNK)
            with open(out, "rb") as f:
                assert f.read() == expected, name
        stats = final_stats(served)
    log = served.stderr()
    assert re.search(rf"image 'bad': chunk {bad} \(offset {bad * CHUNK}\) "
                     r"does not match its manifest digest", log), log[-3000:]
    cache = stats["cache"]
    assert cache["verify_errors"] >= 2, cache       # fetched, retried once
    assert cache["fetch_errors"] >= 1, cache
    cmap, _ = cache_files(served.cache_dir)
    assert cmap[bad] == 0, "the corrupted chunk is marked present"
    assert sum(cmap) == size // CHUNK - 1
    # Marked chunks are the origin's true bytes.
    check_marked_chunks(served.cache_dir, pristine, CHUNK)


# -- (e) LUN size disagreeing with its manifest ---------------------------

def test_lun_size_disagreeing_with_manifest_is_refused(tgtd,  # noqa: F811
                                                       tmp_path):
    size = 8 * MiB
    other = make_image(tmp_path / "other.raw", size + CHUNK, seed=9)
    daemon, target, _ = lun_with_manifest(tgtd, tmp_path, size,
                                          manifest_of=other)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "serve",
         daemon.url(target, 1), "--listen", "tcp:127.0.0.1:0",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 20
    assert "vmthunder: ready" not in proc.stdout
    assert f"LUN size {size} disagrees with its manifest " \
        f"({size + CHUNK}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # Nothing was cached for it.
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(
        (p / "map").exists() for p in cache.iterdir()), \
        json.dumps(os.listdir(cache))
