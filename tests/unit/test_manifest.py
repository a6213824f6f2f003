"""The chunk manifest: digests, verification, the JSON format."""

import pytest

from vmthunder.volume import manifest as mf

CS = 4096


def make(tmp_path, data: bytes) -> str:
    path = tmp_path / "img"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("algorithm", sorted(mf.HASHES))
def test_round_trip_and_verify(tmp_path, algorithm):
    data = bytes(range(256)) * 40 + b"tail"           # 10244: short last
    m = mf.build_manifest(make(tmp_path, data), "img", CS,
                          algorithm=algorithm)
    assert (m.size, m.chunks, m.algorithm) == (len(data), 3, algorithm)
    again = mf.Manifest.from_bytes(m.to_bytes() + b"\0" * 100)
    assert again == m and again.identity() == m.identity()
    for i in range(3):
        again.verify(i, data[i * CS:(i + 1) * CS])
    bad = bytearray(data[CS:2 * CS])
    bad[7] ^= 1
    with pytest.raises(mf.ChunkMismatch, match="chunk 1 .*digest"):
        again.verify(1, bad)
    with pytest.raises(mf.ChunkMismatch, match="has 10 bytes"):
        again.verify(2, b"0123456789")
    with pytest.raises(mf.ChunkMismatch, match="not in the manifest"):
        again.verify(3, b"")


def test_algorithms_give_different_identities(tmp_path):
    if len(mf.HASHES) < 2:
        pytest.skip("blake3 is not installed")
    path = make(tmp_path, b"x" * 5000)
    a = mf.build_manifest(path, "img", CS, algorithm="sha256")
    b = mf.build_manifest(path, "img", CS, algorithm="blake3")
    assert a.identity() != b.identity()
    assert mf.ALGORITHM == "blake3"


def test_unknown_algorithm_is_refused(tmp_path):
    m = mf.build_manifest(make(tmp_path, b"x" * 5000), "img", CS)
    raw = m.to_bytes().replace(m.algorithm.encode(), b"md5")
    with pytest.raises(mf.ManifestError, match="'md5'"):
        mf.Manifest.from_bytes(raw, "LUN 2")
