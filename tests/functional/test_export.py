"""`vmthunder export`, `unexport`, `exports` against a real tgtd.

The module runs one tgtd of its own, started by `vmthunder export` itself,
on a free iSCSI port and an unused tgtd control port (tgtd -C N), with the
export store in a temporary directory; it is stopped at the end, pass or
fail. LUNs are read back with QEMU's libiscsi driver (qemu-img, qemu-io)
and libiscsi's iscsi-ls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.functional.conftest import REPO, make_image, need
from tests.functional.iscsi_fixtures import free_control_port
from tests.functional.test_transfer import http_server  # noqa: F401
from tests.functional.transfer_servers import glance_app
from vmthunder.volume import manifest as manifest_mod
from vmthunder.volume import tgt as tgt_mod

PREFIX = "iqn.2026-11.org.vmthunder.test"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="tgtd and tgtadm need root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Origin:
    """The tgtd of this module and a runner for the vmthunder CLI."""

    def __init__(self, base):
        self.base = base
        self.export_dir = str(base / "exports")
        self.port = _free_port()
        self.portal = f"127.0.0.1:{self.port}"
        self.control_port = free_control_port()
        self.conf = base / "vmthunder.conf"
        self.conf.write_text(
            "[export]\n"
            f"export_dir = {self.export_dir}\n"
            f"portal = {self.portal}\n"
            f"tgtd_control_port = {self.control_port}\n"
            f"iqn_prefix = {PREFIX}\n")
        self.tgt = tgt_mod.Tgt(self.control_port, self.portal,
                               self.export_dir)

    def vmt(self, *args, check_rc: int | None = None,
            conf=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "vmthunder.cli", "--config-file",
             str(conf or self.conf), *map(str, args)],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        if check_rc is not None:
            assert proc.returncode == check_rc, (
                f"vmthunder {' '.join(map(str, args))}: exit "
                f"{proc.returncode}\nstdout: {proc.stdout}\n"
                f"stderr: {proc.stderr}")
        return proc

    def export(self, image, name, *args) -> subprocess.CompletedProcess:
        return self.vmt("export", image, "--name", name, *args, check_rc=0)

    def url(self, name: str, lun: int = 1, auth: str = "") -> str:
        return f"iscsi://{auth}{self.portal}/{PREFIX}:{name}/{lun}"

    def exports(self) -> dict:
        rows = json.loads(self.vmt("exports", "--json", check_rc=0).stdout)
        return {row["name"]: row for row in rows}

    def listed_targets(self) -> list[str]:
        out = subprocess.run(["iscsi-ls", f"iscsi://{self.portal}"],
                             capture_output=True, text=True, timeout=30)
        return [line.split()[0].removeprefix("Target:")
                for line in out.stdout.splitlines()
                if line.startswith("Target:")]

    def stop_tgtd(self) -> None:
        with contextlib.suppress(Exception):
            self.tgt.stop()
        # Should tgtadm fail, the pid vmthunder recorded for this tgtd.
        try:
            with open(self.tgt.pid_path) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return
        if cmdline.startswith(b"tgtd") or b"/tgtd\0" in cmdline:
            if f"-C\0{self.control_port}\0".encode() in cmdline:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    need("tgtd", "tgtadm", "qemu-img", "qemu-io", "iscsi-ls")
    o = Origin(tmp_path_factory.mktemp("origin"))
    try:
        yield o
    finally:
        o.stop_tgtd()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{o.control_port}{suffix}")


def compare(image, url, fmt="raw") -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw",
                           str(image), url],
                          capture_output=True, text=True, timeout=60)


def read_lun(url, dest) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url,
                    str(dest)], check=True, capture_output=True, timeout=60)
    return dest.read_bytes()


def test_export_raw(origin, tmp_path):
    # Not a multiple of 512: tgtd would drop the partial sector, so the
    # stored volume is padded (as QEMU pads reading the raw file).
    image = make_image(tmp_path / "raw.img", 5 * 2**20 + 1000, seed=1)
    pristine = tmp_path / "pristine.img"
    shutil.copy(image, pristine)
    out = origin.export(image, "raw1").stdout
    assert f"volume:   {origin.url('raw1', 1)}" in out
    assert f"manifest: {origin.url('raw1', 2)}" in out
    assert compare(image, origin.url("raw1")).returncode == 0

    directory = os.path.join(origin.export_dir, "raw1")
    record = json.load(open(os.path.join(directory, "export.json")))
    assert record["name"] == "raw1"
    assert record["iqn"] == f"{PREFIX}:raw1"
    assert record["portal"] == origin.portal
    assert record["size"] == 5 * 2**20 + 1024
    assert record["chunk_size"] == 8 * 1024          # [export] default
    assert record["source"] == image and record["chap_user"] is None
    volume = os.path.join(directory, "volume.raw")
    assert os.path.getsize(volume) == record["size"]

    # The manifest file, its LUN, and the volume agree.
    stored = open(os.path.join(directory, "manifest.bin"), "rb").read()
    manifest = manifest_mod.Manifest.from_bytes(stored)
    assert manifest == manifest_mod.build_manifest(volume, "raw1",
                                                   8 * 1024)
    assert manifest.size == record["size"]
    assert manifest.identity() == record["manifest_identity"]
    lun2 = read_lun(origin.url("raw1", 2), tmp_path / "lun2")
    assert len(lun2) % 512 == 0
    assert lun2[:len(stored)] == stored
    assert not lun2[len(stored):].strip(b"\0")
    assert manifest_mod.Manifest.from_bytes(lun2, "LUN 2") == manifest

    # The export is a copy: editing the original does not reach it.
    with open(image, "r+b") as f:
        f.write(b"edited" * 100)
    assert compare(pristine, origin.url("raw1")).returncode == 0
    assert compare(image, origin.url("raw1")).returncode == 1


def test_export_qcow2(origin, tmp_path):
    raw = make_image(tmp_path / "src.raw", 3 * 2**20, seed=2,
                     hole_at=2 * 2**20)
    qcow2 = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                    str(qcow2)], check=True)
    out = origin.export(qcow2, "qcow1", "--chunk-size", "64K").stdout
    assert "converted to raw" in out
    assert compare(raw, origin.url("qcow1")).returncode == 0
    assert compare(qcow2, origin.url("qcow1"), fmt="qcow2").returncode == 0
    row = origin.exports()["qcow1"]
    assert (row["size"], row["chunk_size"]) == (3 * 2**20, 64 * 1024)
    assert row["state"] == "exported"
    lun2 = read_lun(origin.url("qcow1", 2), tmp_path / "lun2")
    assert manifest_mod.Manifest.from_bytes(lun2).chunks == 48


def test_export_is_idempotent(origin, tmp_path):
    image = make_image(tmp_path / "idem.img", 2 * 2**20, seed=3)
    origin.export(image, "idem")
    record_path = os.path.join(origin.export_dir, "idem", "export.json")
    before = open(record_path, "rb").read()
    out = origin.export(image, "idem").stdout
    assert "same content, unchanged" in out
    assert origin.url("idem") in out
    # The same content in another format is the same export.
    qcow2 = tmp_path / "idem.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", image,
                    str(qcow2)], check=True)
    assert "unchanged" in origin.export(qcow2, "idem").stdout
    assert open(record_path, "rb").read() == before

    for other in (make_image(tmp_path / "other.img", 2 * 2**20, seed=4),
                  make_image(tmp_path / "bigger.img", 3 * 2**20, seed=3)):
        proc = origin.vmt("export", other, "--name", "idem", check_rc=1)
        assert "export idem exists with other content" in proc.stderr
        assert "unexport it first" in proc.stderr
    assert open(record_path, "rb").read() == before
    assert compare(image, origin.url("idem")).returncode == 0


def test_bad_input(origin, tmp_path):
    image = make_image(tmp_path / "ok.img", 1 << 20)
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb\0\0\0\3" + b"\0" * 100)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    cases = [
        (tmp_path / "missing.img", "m1", "does not exist"),
        (tmp_path, "m2", "is a directory"),
        (broken, "m3", "not in a format qemu-img can read"),
        (empty, "m4", "is empty"),
        (image, "Bad_Name", "export name 'Bad_Name' is not allowed"),
        (image, "../escape", "is not allowed"),
    ]
    for path, name, message in cases:
        proc = origin.vmt("export", path, "--name", name, check_rc=1)
        assert message in proc.stderr, proc.stderr
        assert str(path) in proc.stderr or name in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(os.path.join(origin.export_dir, name))
    proc = origin.vmt("export", image, "--name", "m5", "--chunk-size",
                      "3000", check_rc=1)
    assert "chunk size 3000 is not a power of two" in proc.stderr
    proc = origin.vmt("unexport", "no-such-export", check_rc=1)
    assert "no export named 'no-such-export'" in proc.stderr


def test_chap(origin, tmp_path):
    image = make_image(tmp_path / "chap.img", 1 << 20, seed=5)
    out = origin.export(image, "secure", "--chap").stdout
    chap_path = os.path.join(origin.export_dir, "secure", "chap.json")
    assert stat.S_IMODE(os.stat(chap_path).st_mode) == 0o600
    chap = json.load(open(chap_path))
    user, secret = chap["user"], chap["secret"]
    assert f"CHAP user {user}" in out and secret not in out
    record = open(os.path.join(origin.export_dir, "secure",
                               "export.json")).read()
    assert user in record and secret not in record

    good = compare(image, origin.url("secure", auth=f"{user}%{secret}@"))
    assert good.returncode == 0, good.stderr
    anonymous = compare(image, origin.url("secure"))
    assert anonymous.returncode != 0
    assert "Authentication failure" in anonymous.stderr
    wrong = compare(image, origin.url("secure", auth=f"{user}%{'x' * 24}@"))
    assert wrong.returncode != 0
    # Exporting it again keeps the credentials.
    origin.export(image, "secure", "--chap")
    assert json.load(open(chap_path)) == chap


def test_exports_lists_attached_initiator(origin, tmp_path):
    image = make_image(tmp_path / "shown.img", 1 << 20, seed=6)
    origin.export(image, "shown")
    initiator = f"{PREFIX}:reader-{os.getpid()}"
    reader = subprocess.Popen(
        ["qemu-io", "-r", "--image-opts",
         f"driver=iscsi,transport=tcp,portal={origin.portal},"
         f"target={PREFIX}:shown,lun=1,initiator-name={initiator}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            row = origin.exports()["shown"]
            if row["initiators"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert row["initiators"] == [f"{initiator} (127.0.0.1)"]
        table = origin.vmt("exports", check_rc=0).stdout
        line = next(ln for ln in table.splitlines()
                    if ln.startswith("shown "))
        for text in ("1 MiB", "8 KiB", origin.portal, f"{PREFIX}:shown",
                     initiator, "exported"):
            assert text in line, (text, table)
        assert table.splitlines()[0].split() == [
            "NAME", "SIZE", "CHUNK", "PORTAL", "IQN", "INITIATORS", "STATE"]
    finally:
        reader.communicate(b"quit\n", timeout=15)
    assert origin.exports()["shown"]["initiators"] == []


def test_unexport(origin, tmp_path):
    image = make_image(tmp_path / "gone.img", 1 << 20, seed=7)
    origin.export(image, "gone")
    origin.export(image, "kept")
    assert {f"{PREFIX}:gone", f"{PREFIX}:kept"} <= set(
        origin.listed_targets())

    out = origin.vmt("unexport", "gone", check_rc=0).stdout
    assert "unexported gone" in out
    assert f"{PREFIX}:gone" not in origin.listed_targets()
    assert not os.path.exists(os.path.join(origin.export_dir, "gone"))
    assert "gone" not in origin.exports()
    proc = origin.vmt("unexport", "gone", check_rc=1)
    assert "no export named 'gone'" in proc.stderr

    origin.vmt("unexport", "kept", "--keep-data", check_rc=0)
    assert f"{PREFIX}:kept" not in origin.listed_targets()
    assert os.path.exists(os.path.join(origin.export_dir, "kept",
                                       "volume.raw"))
    assert origin.exports()["kept"]["state"] == "unexported (data kept)"
    out = origin.export(image, "kept").stdout
    assert "exported again from the data kept" in out
    assert compare(image, origin.url("kept")).returncode == 0


def test_restore_after_tgtd_restart(origin, tmp_path):
    image = make_image(tmp_path / "r1.img", 1 << 20, seed=8)
    origin.export(image, "restore1")
    before = origin.exports()
    assert all(row["state"] in ("exported", "unexported (data kept)")
               for row in before.values())

    origin.tgt.stop()
    assert not origin.tgt.running()
    rows = origin.exports()
    assert rows["restore1"]["state"].startswith("not in tgtd")

    out = origin.vmt("exports", "--restore", check_rc=0).stdout
    assert "restored export restore1" in out
    after = origin.exports()
    for name, row in before.items():
        assert after[name]["state"] == row["state"], name
        assert after[name]["tid"] == row["tid"], name
    assert compare(image, origin.url("restore1")).returncode == 0

    # Any export brings the lost targets back too.
    origin.tgt.stop()
    other = make_image(tmp_path / "r2.img", 1 << 20, seed=9)
    out = origin.export(other, "restore2").stdout
    assert "restored export restore1" in out
    assert compare(image, origin.url("restore1")).returncode == 0
    assert compare(other, origin.url("restore2")).returncode == 0


def test_portal_in_use_is_an_error(origin, tmp_path):
    """tgtd falls back to 0.0.0.0:3260 when its portal is taken: refused."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    control = free_control_port()
    conf = tmp_path / "busy.conf"
    conf.write_text("[export]\n"
                    f"export_dir = {tmp_path / 'exports'}\n"
                    f"portal = 127.0.0.1:{busy.getsockname()[1]}\n"
                    f"tgtd_control_port = {control}\n")
    tgt = tgt_mod.Tgt(control, "127.0.0.1:1", str(tmp_path / "exports"))
    image = make_image(tmp_path / "busy.img", 1 << 20)
    try:
        proc = origin.vmt("export", image, "--name", "busy", conf=conf,
                          check_rc=1)
        assert "could not listen on portal 127.0.0.1:" in proc.stderr
        assert not tgt.running()
    finally:
        busy.close()
        with contextlib.suppress(Exception):
            tgt.stop()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{control}{suffix}")


def test_restore_repairs_half_made_target(origin, tmp_path):
    """A target left incomplete in tgtd (a crash half-way) is re-made."""
    image = make_image(tmp_path / "half.img", 1 << 20, seed=10)
    origin.export(image, "half")
    tid = origin.exports()["half"]["tid"]
    origin.tgt._iscsi("--mode", "logicalunit", "--op", "delete", "--tid",
                      tid, "--lun", 2)
    origin.tgt._iscsi("--mode", "target", "--op", "unbind", "--tid", tid,
                      "--initiator-address", "ALL")
    assert origin.exports()["half"]["state"].startswith(
        "in tgtd, not as recorded")
    out = origin.vmt("exports", "--restore", check_rc=0).stdout
    assert "restored export half" in out
    row = origin.exports()["half"]
    assert (row["state"], row["tid"]) == ("exported", tid)
    assert compare(image, origin.url("half")).returncode == 0


# -- glance://IMAGE_ID through the transfer library ---------------------------

def _leftovers(origin) -> list[str]:
    """Files an export from Glance must not leave in the store."""
    return [e for e in os.listdir(origin.export_dir)
            if e.startswith((".glance-", "..glance-", ".staging-"))]


def test_export_from_glance_stand_in(origin, tmp_path, http_server,  # noqa
                                     monkeypatch):
    """`vmthunder export glance://ID --name N` against a stand-in of
    Glance's image API (tests/functional/transfer_servers.py; a real
    Glance in tests/openstack/test_glance_export.py): the data comes from
    Glance through the transfer library, checked against os_hash_value,
    and lands sparse in the export's volume; a raw image is moved there,
    a qcow2 one converted; again from [cinder] glance_endpoint: unchanged;
    a wrong hash or a qcow2 naming a backing file: no export, nothing
    left."""
    size = 3 * 2**20 + 1000                 # padded to 512 in the export
    image = make_image(tmp_path / "g.raw", size, seed=21, hole_at=2**20)
    raw2 = make_image(tmp_path / "g2.raw", 2**20, seed=22)
    qcow2 = tmp_path / "g2.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw2,
                    str(qcow2)], check=True)
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b",
                    "/etc/hostname", str(backed), "1M"], check=True,
                   capture_output=True)
    server = http_server(glance_app(
        {"img-1": image, "img-q": str(qcow2), "img-b": str(backed)},
        token="secret", disk_formats={"img-q": "qcow2", "img-b": "qcow2"}))
    monkeypatch.setenv("OS_AUTH_TOKEN", "secret")
    endpoint = ("--glance-endpoint", server.url(""))

    out = origin.export("glance://img-1", "glance1", *endpoint).stdout
    assert "fetched glance://img-1 from Glance at " in out, out
    assert "verified: sha512 of the whole image" in out, out
    assert "stored glance://img-1 (raw, " in out and ": moved in" in out
    assert server.ranged + server.plain >= 2        # record, then data
    assert compare(image, origin.url("glance1")).returncode == 0
    directory = os.path.join(origin.export_dir, "glance1")
    record = json.load(open(os.path.join(directory, "export.json")))
    assert record["source"] == "glance://img-1"
    assert record["size"] == size + 24
    volume = os.path.join(directory, "volume.raw")
    assert os.stat(volume).st_blocks * 512 < size - 2**20 // 2   # sparse
    assert _leftovers(origin) == []

    # Again, the endpoint from [cinder] glance_endpoint: same content.
    conf = tmp_path / "glance.conf"
    conf.write_text(origin.conf.read_text()
                    + f"[cinder]\nglance_endpoint = {server.url('')}\n")
    requests = server.ranged + server.plain
    proc = origin.vmt("export", "glance://img-1", "--name", "glance1",
                      conf=conf, check_rc=0)
    assert "same content, unchanged" in proc.stdout
    assert server.ranged + server.plain > requests
    assert _leftovers(origin) == []

    # A qcow2 image is converted (Glance's disk_format, never probed).
    out = origin.export("glance://img-q", "glance2", *endpoint).stdout
    assert "(qcow2, " in out and "converted to raw" in out
    assert compare(raw2, origin.url("glance2")).returncode == 0
    assert _leftovers(origin) == []

    cases = [
        ("img-b", "names a backing or data file"),
        ("nope", "no such image"),
    ]
    for image_id, words in cases:
        proc = origin.vmt("export", f"glance://{image_id}", "--name", "g3",
                          *endpoint, check_rc=1)
        assert words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(os.path.join(origin.export_dir, "g3"))
        assert _leftovers(origin) == []
    monkeypatch.delenv("VMTHUNDER_GLANCE_ENDPOINT", raising=False)
    proc = origin.vmt("export", "glance://img-1", "--name", "g3",
                      check_rc=1)
    assert "no Glance endpoint" in proc.stderr and \
        "--glance-endpoint" in proc.stderr, proc.stderr


def test_export_from_glance_wrong_hash_leaves_nothing(origin, tmp_path,
                                                      http_server):  # noqa
    """Glance's os_hash_value does not match the data: the export fails
    naming the digests, and no export, volume or temporary file is
    left."""
    image = make_image(tmp_path / "w.raw", 2**20, seed=23)
    server = http_server(glance_app({"img-w": image}, wrong_hash=True))
    proc = origin.vmt("export", "glance://img-w", "--name", "wrong",
                      "--glance-endpoint", server.url(""), check_rc=1)
    assert "does not match the sha512 digest" in proc.stderr, proc.stderr
    assert "nothing was committed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(origin.export_dir, "wrong"))
    assert _leftovers(origin) == []
    assert "wrong" not in origin.exports()
