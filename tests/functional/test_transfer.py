"""vmthunder.transfer against real peers: NBD (qemu-nbd, nbdkit) as
source and destination, qcow2 through qemu-img, HTTP (aiohttp's web
server, with and without ranges), a Glance image-data stand-in, sources
that lie, SIGKILL mid-copy, and `vmthunder copy`.

Every server and process started here is stopped when its test ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import REPO, need
from tests.functional import test_nbd_client_interop as _interop
from tests.unit.test_transfer import make_sparse
from tests.functional.transfer_servers import (HttpServer, file_app,
                                               glance_app, stream_app)
from vmthunder import transfer

MiB = 1 << 20
# qemu-nbd and nbdkit servers, as the NBD client's interop tests start
# them.
nbd_server = _interop.nbd_server
pytestmark = pytest.mark.timeout(120)


def sparse_image(path):
    """48 MiB, 6 MiB of it random data in three runs, the rest holes."""
    return make_sparse(path, size=48 * MiB, seed=3, runs=(
        (0, 2 * MiB), (17 * MiB, 3 * MiB), (47 * MiB, MiB)))


def data_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def same(a, b, fmt_b="raw"):
    proc = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F",
                           fmt_b, str(a), str(b)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def no_leftovers(directory, name="out.raw"):
    assert not os.path.exists(os.path.join(directory, name))
    assert [n for n in os.listdir(directory) if ".part-" in n] == []


def nbd_uri(server) -> str:
    kind, _, rest = server.address.partition(":")
    if kind == "unix":
        return f"nbd+unix:///{server.export}?socket={rest}"
    return f"nbd://{rest}/{server.export}"


@pytest.fixture
def http_server():
    started = []

    def start(app):
        server = HttpServer(app).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- NBD -------------------------------------------------------------------

@pytest.mark.parametrize("kind,transport", [
    ("qemu-nbd", "unix"), ("qemu-nbd", "tcp"), ("nbdkit", "unix")])
def test_nbd_source_copy_is_equal_and_sparse(nbd_server, tmp_path, kind,
                                             transport):
    src = sparse_image(tmp_path / "src.raw")
    server = nbd_server(kind, src, transport=transport, read_only=True)
    out = tmp_path / "out.raw"
    result = transfer.copy(nbd_uri(server), str(out)).wait(60)
    same(src, out)
    # Holes from base:allocation were neither read nor written.
    assert result.bytes_copied == 6 * MiB, result
    assert result.bytes_skipped == 42 * MiB
    assert data_bytes(out) <= 7 * MiB
    with open(src, "rb") as f:
        import blake3
        assert result.digest == "blake3:" + blake3.blake3(
            f.read()).hexdigest()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_nbd_destination(nbd_server, tmp_path, kind):
    src = sparse_image(tmp_path / "src.raw")
    target = tmp_path / "target.raw"
    # The export held other data: holes must come out as zeros.
    with open(target, "wb") as f:
        f.write(os.urandom(48 * MiB))
    server = nbd_server(kind, str(target))
    result = transfer.copy(src, nbd_uri(server)).wait(60)
    assert result.bytes_written == 6 * MiB
    server.stop()
    same(src, target)


def test_nbd_destination_too_small_or_read_only(nbd_server, tmp_path):
    src = sparse_image(tmp_path / "src.raw")
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(MiB))
    server = nbd_server("qemu-nbd", str(small))
    with pytest.raises(transfer.DestinationError, match="too small"):
        transfer.copy(src, nbd_uri(server)).wait(30)
    ro = nbd_server("qemu-nbd", src, read_only=True)
    with pytest.raises(transfer.DestinationError, match="read-only"):
        transfer.copy(src, nbd_uri(ro)).wait(30)
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy(f"nbd+unix:///x?socket={tmp_path}/none.sock",
                      str(tmp_path / "out.raw")).wait(30)
    assert str(info.value).startswith("source nbd+unix:///x?socket=")
    assert "cannot connect" in str(info.value)
    no_leftovers(tmp_path)


def test_nbd_cancel_mid_copy(nbd_server, tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(32 * MiB))
    server = nbd_server("nbdkit", str(src), read_only=True)
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous")
    task = transfer.copy(nbd_uri(server), str(out), rate_limit=8 * MiB,
                         request_size=MiB)
    while task.progress().done < 3 * MiB:
        time.sleep(0.01)
    task.cancel()
    with pytest.raises(transfer.TransferCancelled):
        task.wait(20)
    assert out.read_bytes() == b"previous"
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []


# -- qcow2 -------------------------------------------------------------------

def test_qcow2_destination(tmp_path):
    need("qemu-img")
    src = sparse_image(tmp_path / "src.raw")
    out = tmp_path / "out.qcow2"
    result = transfer.copy(src, str(out), dst_format="qcow2").wait(60)
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(out)], check=True,
        capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 48 * MiB
    same(src, out, "qcow2")
    assert data_bytes(out) < 8 * MiB
    assert result.size == 48 * MiB
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []


# -- HTTP ------------------------------------------------------------------

def test_http_with_ranges(http_server, tmp_path):
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(file_app(src))
    out = tmp_path / "out.raw"
    result = transfer.copy(server.url("/image"), str(out)).wait(60)
    same(src, out)
    # One probe, then ranges in parallel: 48 MiB in 4 MiB requests.
    assert server.ranged == 1 + 12 and server.plain == 0
    assert result.bytes_copied == 48 * MiB
    assert result.bytes_written == 6 * MiB          # zeros not written
    assert data_bytes(out) <= 7 * MiB
    sha = hashlib.sha256(open(src, "rb").read()).hexdigest()
    # A checksum given by the caller is checked over the whole image.
    result = transfer.copy(server.url("/image"), str(tmp_path / "b.raw"),
                           checksum=f"sha256:{sha}").wait(60)
    assert result.digest == f"sha256:{sha}"
    assert result.verified == "sha256 of the whole image"
    with pytest.raises(transfer.VerificationError) as info:
        transfer.copy(server.url("/image"), str(tmp_path / "out2.raw"),
                      checksum="sha256:" + "0" * 64).wait(60)
    assert "does not match the sha256 digest" in str(info.value)
    no_leftovers(tmp_path, "out2.raw")


def test_http_without_ranges_streams(http_server, tmp_path):
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(stream_app(src))
    out = tmp_path / "out.raw"
    result = transfer.copy(server.url("/image"), str(out)).wait(60)
    same(src, out)
    assert server.ranged == 1 and server.plain == 0   # the probe only
    assert result.bytes_copied == 48 * MiB
    assert data_bytes(out) <= 7 * MiB


@pytest.mark.parametrize("lie,words", [
    (dict(cut_at=5 * MiB + 123), "the server closed the connection before "
     "the body was complete"),
    (dict(cut_at=5 * MiB + 123, reset=True), "the connection was reset "
     "before the body was complete"),
    (dict(length=64 * MiB), "the server closed the connection before the "
     "body was complete"),
])
def test_http_lying_source_fails_and_leaves_nothing(http_server, tmp_path,
                                                    lie, words):
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(stream_app(src, **lie))
    out = tmp_path / "out.raw"
    out_prev = tmp_path / "prev.raw"
    out_prev.write_bytes(b"previous")
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy(server.url("/image"), str(out)).wait(60)
    text = str(info.value)
    assert text.startswith(f"source {server.url('/image')}: "), text
    assert words in text, text
    assert "bytes of the image received" in text, text
    no_leftovers(tmp_path)
    with pytest.raises(transfer.SourceError):
        transfer.copy(server.url("/image"), str(out_prev)).wait(60)
    assert out_prev.read_bytes() == b"previous"


def test_http_errors(http_server, tmp_path):
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(file_app(src))
    with pytest.raises(transfer.SourceError, match="HTTP 404"):
        transfer.copy(server.url("/nope"), str(tmp_path / "out.raw")
                      ).wait(30)
    port = server.port
    server.stop()
    with pytest.raises(transfer.SourceError, match="cannot reach"):
        transfer.copy(f"http://127.0.0.1:{port}/image",
                      str(tmp_path / "out.raw")).wait(30)
    no_leftovers(tmp_path)


# -- Glance -----------------------------------------------------------------

def test_glance_image_data_stand_in(http_server, tmp_path):
    """glance://ID against a stand-in of Glance's v2 image-data API (the
    image record and /file, served by aiohttp with ranges): the whole
    image is checked against os_hash_value (sha512)."""
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(glance_app({"img-1": src}, token="secret"))
    out = tmp_path / "out.raw"
    result = transfer.copy("glance://img-1", str(out),
                           glance_endpoint=server.url(""),
                           glance_token="secret").wait(60)
    same(src, out)
    sha = hashlib.sha512(open(src, "rb").read()).hexdigest()
    assert result.digest == f"sha512:{sha}"
    assert result.verified == "sha512 of the whole image"
    assert server.ranged > 1
    with pytest.raises(transfer.SourceError, match="no such image"):
        transfer.copy("glance://img-2", str(tmp_path / "x.raw"),
                      glance_endpoint=server.url(""),
                      glance_token="secret").wait(30)
    with pytest.raises(transfer.SourceError, match="HTTP 401"):
        transfer.copy("glance://img-1", str(tmp_path / "x.raw"),
                      glance_endpoint=server.url("")).wait(30)
    with pytest.raises(transfer.SourceError, match="no Glance endpoint"):
        transfer.copy("glance://img-1", str(tmp_path / "x.raw"))
    no_leftovers(tmp_path, "x.raw")


def test_glance_stand_in_wrong_hash_leaves_nothing(http_server, tmp_path):
    """The Glance stand-in publishes a wrong os_hash_value: the copy fails
    as a verification error and nothing is committed."""
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(glance_app({"img-1": src}, wrong_hash=True))
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous")
    with pytest.raises(transfer.VerificationError) as info:
        transfer.copy("glance://img-1", str(out),
                      glance_endpoint=server.url("")).wait(60)
    assert "does not match the sha512 digest" in str(info.value)
    assert str(info.value).startswith("source glance://img-1 (Glance at ")
    assert out.read_bytes() == b"previous"
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []


# -- SIGKILL and the command line --------------------------------------------

def vmthunder_copy(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "vmthunder.cli", "copy",
                           *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, **kwargs)


def test_sigkill_mid_copy_leaves_no_destination(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(32 * MiB))
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmthunder.cli", "copy", str(src), str(out),
         "--rate-limit", "8M", "--request-size", "1M"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        temps = []
        while time.monotonic() < deadline:
            temps = [n for n in os.listdir(tmp_path) if ".part-" in n]
            if temps and os.stat(tmp_path / temps[0]).st_blocks * 512 \
                    >= 2 * MiB:
                break
            time.sleep(0.02)
        assert temps, "the copy never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert out.read_bytes() == b"previous"
    # Only a hidden temporary name is left, and the next copy to the same
    # destination removes it.
    assert all(n.startswith(".out.raw.part-") for n in temps)
    res = vmthunder_copy(src, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == src.read_bytes()
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []


def test_cli_copy(http_server, tmp_path):
    src = sparse_image(tmp_path / "src.raw")
    server = http_server(file_app(src))
    out = tmp_path / "out.raw"
    res = vmthunder_copy(server.url("/image"), out, "--json", "--progress")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["size"] == 48 * MiB and report["bytes_copied"] == 48 * MiB
    assert report["digest"].startswith("blake3:")
    assert "(100.00/100%)" in res.stderr
    same(src, out)
    res = vmthunder_copy(src, tmp_path / "q.qcow2", "--dst-format", "qcow2",
                         "--rate-limit", "1G")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"copied {src} to {tmp_path}/q.qcow2: "
                                 "48.0 MiB (6.0 MiB read, 42.0 MiB of holes")
    same(src, tmp_path / "q.qcow2", "qcow2")
    res = vmthunder_copy(tmp_path / "none.raw", out)
    assert res.returncode == 1
    assert res.stderr.startswith(f"vmthunder copy: error: source "
                                 f"{tmp_path}/none.raw: ")
    res = vmthunder_copy(src, tmp_path / "no" / "out.raw")
    assert res.returncode == 1
    assert "vmthunder copy: error: destination " in res.stderr
    res = vmthunder_copy("--help")
    assert res.returncode == 0
    for form in ("nbd+unix://", "iscsi://", "export:NAME", "glance://",
                 "vmthunder://IMAGE", "--rate-limit", "--dst-format"):
        assert form in res.stdout, form
