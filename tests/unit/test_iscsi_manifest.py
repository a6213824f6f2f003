"""read_manifest (vmthunder/volume/iscsi_manifest.py) over a stand-in
for an iSCSI session (the session needs a target; what is tested is how
the manifest LUN's bytes are read): a header caught half rewritten is
read again, a header that stays broken is refused."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from vmthunder.blockdev import BlockError
from vmthunder.volume import iscsi_manifest
from vmthunder.volume import manifest as mf

BLOCK = 512


class LunStandIn:
    """A session whose LUN holds ``data``; the first ``torn`` reads of
    block 0 (the header) return it with its first half zeroed, as a read
    racing the publish's in-place rewrite could."""

    def __init__(self, data: bytes, torn: int):
        self.data = data + b"\0" * (-len(data) % BLOCK)
        self.torn = torn
        self.header_reads = 0

    async def read_capacity(self, lun):
        return BLOCK, len(self.data) // BLOCK

    def set_block_size(self, lun, block_size, blocks=None):
        pass

    async def read_into(self, lun, lba, view, where):
        start = lba * BLOCK
        chunk = bytearray(self.data[start:start + len(view)])
        if lba == 0:
            self.header_reads += 1
            if self.header_reads <= self.torn:
                chunk[:64] = bytes(64)
        view[:] = chunk


@pytest.fixture
def manifest_bytes(tmp_path):
    path = tmp_path / "image.raw"
    path.write_bytes(random.Random(4).randbytes(64 * 4096))
    manifest = mf.build_manifest(str(path), "image", 4096)
    return manifest, manifest.to_bytes()


def test_a_header_caught_half_written_is_read_again(manifest_bytes,
                                                    monkeypatch):
    monkeypatch.setattr(iscsi_manifest, "HEADER_REREAD_S", 0.01)
    manifest, data = manifest_bytes
    lun = LunStandIn(data, torn=iscsi_manifest.HEADER_READS - 1)
    got = asyncio.run(iscsi_manifest.read_manifest(lun, "iqn.x", 2))
    assert lun.header_reads == iscsi_manifest.HEADER_READS
    assert got.identity() == manifest.identity()


def test_a_header_that_stays_broken_is_refused(manifest_bytes, monkeypatch):
    monkeypatch.setattr(iscsi_manifest, "HEADER_REREAD_S", 0.01)
    _, data = manifest_bytes
    lun = LunStandIn(data, torn=iscsi_manifest.HEADER_READS)
    with pytest.raises(BlockError) as info:
        asyncio.run(iscsi_manifest.read_manifest(lun, "iqn.x", 2))
    assert info.value.errno == errno.EINVAL
    assert "manifest LUN 2 of iSCSI target iqn.x" in str(info.value)
    assert lun.header_reads == iscsi_manifest.HEADER_READS
