"""vmthunder.volume.glance_export: what is checked before any fetch or
qemu-img run (the export itself: tests/functional/test_export.py)."""

import struct

import pytest

from vmthunder.volume import glance_export
from vmthunder.volume.export import ExportError


@pytest.mark.parametrize("uri", [
    "glance://", "glance:///", "glance://a/b", "http://x/img",
    "glance://id?x=1", "glance://id#f", "", "img-1"])
def test_bad_glance_uris_are_refused(uri):
    with pytest.raises(ExportError, match="is not glance://IMAGE_ID"):
        glance_export.parse_uri(uri)


def test_glance_uri():
    assert glance_export.parse_uri("glance://3f2a-11") == "3f2a-11"
    assert glance_export.parse_uri("glance://3f2a-11/") == "3f2a-11"


def test_no_endpoint_says_where_to_give_one(monkeypatch):
    monkeypatch.delenv(glance_export.ENDPOINT_ENV, raising=False)
    with pytest.raises(ExportError) as info:
        glance_export.endpoint_of(None)
    for words in ("--glance-endpoint", "[cinder] glance_endpoint",
                  "$VMTHUNDER_GLANCE_ENDPOINT"):
        assert words in str(info.value)
    monkeypatch.setenv(glance_export.ENDPOINT_ENV, "http://g:9292/")
    assert glance_export.endpoint_of(None) == "http://g:9292"
    assert glance_export.endpoint_of("http://h:1") == "http://h:1"


def qcow2_header(version=3, backing_offset=0, incompatible=0) -> bytes:
    header = bytearray(104)
    header[:4] = b"QFI\xfb"
    struct.pack_into(">I", header, 4, version)
    struct.pack_into(">Q", header, 8, backing_offset)
    struct.pack_into(">Q", header, 72, incompatible)
    return bytes(header)


@pytest.mark.parametrize("header,words", [
    (qcow2_header(backing_offset=512), "names a backing or data file"),
    (qcow2_header(version=2, backing_offset=512),
     "names a backing or data file"),
    (qcow2_header(incompatible=1 << 2), "names a backing or data file"),
    (b"\0" * 104, "not a qcow2 image"),
    (b"QFI", "not a qcow2 image"),
])
def test_qcow2_from_glance_must_be_self_contained(tmp_path, header, words):
    path = tmp_path / "img"
    path.write_bytes(header)
    with pytest.raises(ExportError, match=words):
        glance_export._check_qcow2_header(str(path), "glance://x")


def test_self_contained_qcow2_header_passes(tmp_path):
    path = tmp_path / "img"
    # Version 2 has no feature bits: bytes 72.. are not read as such.
    for header in (qcow2_header(), qcow2_header(version=2,
                                                incompatible=1 << 2)):
        path.write_bytes(header)
        glance_export._check_qcow2_header(str(path), "glance://x")
