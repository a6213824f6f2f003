"""vmthunder.transfer from iSCSI against a real tgtd: images published by
`vmthunder export` (LUN 1 the image, LUN 2 its chunk manifest), read as
export:NAME and as iscsi:// through vmthunder.stack, every chunk checked
against the manifest; a LUN whose bytes no longer match it fails the
copy and leaves nothing.

The module runs one tgtd of its own (test_export.py's ``origin``
fixture), stopped at the end, pass or fail. Needs root.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.functional import test_export as _export
from tests.functional.conftest import REPO
from tests.unit.test_transfer import make_sparse
from vmthunder import transfer

MiB = 1 << 20
# tgtd with a store of exports of this module's own.
origin = _export.origin
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(
    os.geteuid() != 0, reason="tgtd and tgtadm need root")]


@pytest.fixture(scope="module")
def exported(origin, tmp_path_factory):
    """An image of 24 MiB + 4 KiB (not a whole number of chunks), 5 MiB of
    data, exported as 'xfer' with 64 KiB chunks."""
    base = tmp_path_factory.mktemp("xfer")
    image = make_sparse(base / "image.raw", size=24 * MiB + 4096, seed=5,
                        runs=((0, MiB), (10 * MiB, 3 * MiB),
                              (24 * MiB - 4096, 8192)))
    origin.export(image, "xfer", "--chunk-size", "64K")
    return image


def test_export_name_copy_is_equal_verified_and_sparse(origin, exported,
                                                       tmp_path):
    out = tmp_path / "out.raw"
    task = transfer.copy("export:xfer", str(out),
                         config_file=str(origin.conf))
    result = task.wait(120)
    assert out.read_bytes() == open(exported, "rb").read()
    assert result.verified == "manifest"
    assert result.size == 24 * MiB + 4096
    # No block status over iSCSI: all is read, zeros are not written.
    assert result.bytes_copied == result.size
    assert result.bytes_written <= 5 * MiB + 8192
    assert os.stat(out).st_blocks * 512 <= 6 * MiB
    assert sum(result.by_source.values()) == result.size


def test_iscsi_url_copy(origin, exported, tmp_path):
    out = tmp_path / "out.raw"
    result = transfer.copy(origin.url("xfer"), str(out)).wait(120)
    assert out.read_bytes() == open(exported, "rb").read()
    assert result.verified == "manifest"
    res = subprocess.run(
        [sys.executable, "-m", "vmthunder.cli", "--config-file",
         str(origin.conf), "copy", "export:xfer", str(tmp_path / "cli.raw"),
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"verified": "manifest"' in res.stdout
    assert (tmp_path / "cli.raw").read_bytes() == out.read_bytes()


def test_lun_that_lies_fails_and_leaves_nothing(origin, tmp_path):
    """The LUN's bytes are changed behind the manifest's back: the copy
    fails on the first chunk that does not match, says which, and
    commits nothing."""
    image = make_sparse(tmp_path / "lie.raw", size=8 * MiB, seed=6,
                        runs=((0, 8 * MiB),))
    origin.export(image, "xfer-lie", "--chunk-size", "64K")
    volume = os.path.join(origin.export_dir, "xfer-lie", "volume.raw")
    with open(volume, "r+b") as f:
        f.seek(5 * MiB + 100)
        f.write(b"forged")
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous")
    with pytest.raises(transfer.VerificationError) as info:
        transfer.copy("export:xfer-lie", str(out),
                      config_file=str(origin.conf)).wait(120)
    text = str(info.value)
    assert text.startswith("source export:xfer-lie: "), text
    assert "chunk 80 (offset 5242880) does not match its manifest " \
        "digest" in text, text
    assert out.read_bytes() == b"previous"
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []


def test_unknown_export_is_a_source_error(origin, tmp_path):
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy("export:none", str(tmp_path / "out.raw"),
                      config_file=str(origin.conf), timeout=10).wait(120)
    assert str(info.value).startswith("source export:none: "), info.value
    assert not (tmp_path / "out.raw").exists()


def test_chap(origin, tmp_path):
    """An export that requires CHAP: export:NAME on the origin host finds
    its secret; iscsi:// with the password given apart (never in the
    message) works; without it the login is refused, naming the source."""
    import json
    image = make_sparse(tmp_path / "chap.raw", size=4 * MiB, seed=7,
                        runs=((0, MiB),))
    origin.export(image, "xfer-chap", "--chap")
    with open(os.path.join(origin.export_dir, "xfer-chap",
                           "chap.json")) as f:
        chap = json.load(f)
    out = tmp_path / "out.raw"
    transfer.copy("export:xfer-chap", str(out),
                  config_file=str(origin.conf)).wait(120)
    assert out.read_bytes() == open(image, "rb").read()
    url = origin.url("xfer-chap", auth=f"{chap['user']}%{chap['secret']}@")
    result = transfer.copy(url, str(tmp_path / "b.raw")).wait(120)
    assert chap["secret"] not in result.source
    assert result.verified == "manifest"
    with pytest.raises(transfer.SourceError) as info:
        transfer.copy(origin.url("xfer-chap"), str(tmp_path / "c.raw"),
                      timeout=10).wait(120)
    assert str(info.value).startswith(f"source {origin.url('xfer-chap')}: ")
    assert not (tmp_path / "c.raw").exists()
