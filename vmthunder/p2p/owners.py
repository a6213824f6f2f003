"""Chunk owners: which host fetches a chunk from the origin for everyone.

The hosts that announced an image form its owner set, each named by a
stable key (its member id). A chunk's owner is the key maximising
``hash(key, image, chunk)`` (rendezvous, or highest-random-weight,
hashing): every host computes the same owner from the same member list
without talking to anyone, and a member joining or leaving moves only
the chunks it wins or owned (about 1/n of them), never the others.

In a boot storm, when nobody holds a chunk yet, a host reads a chunk it
does not own from the chunk's owner, which fetches it from the origin
(once, however many hosts ask): each chunk leaves the origin about once
(ImageVolume, PeerExport).

Ownership goes by *regions* of consecutive chunks (OwnerTable
``region_chunks``; ImageVolume makes a region ``owner_region`` bytes,
256 KiB): with small chunks, a guest's 128 KiB read still goes to one
owner in one piece, not to a different host every 4 KiB.

``serving_peer`` is set while a PeerExport reads through its cache for a
peer: an ImageVolume fetching in that context never asks another owner
(a peer's read costs at most one more hop, even when two hosts' member
lists disagree for a moment).
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterable

# Chunks are owned by regions of this many bytes: a guest's 128 KiB read
# goes to one owner in one piece, however small the chunks.
OWNER_REGION = 256 * 1024

# True while a read is made on behalf of a peer (see the module doc).
serving_peer: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "vmthunder_serving_peer", default=False)


def weight(key: str, image: str, index: int) -> int:
    """The rendezvous weight of ``key`` for chunk ``index`` of ``image``:
    the same in every process and on every host."""
    digest = hashlib.blake2b(
        f"{key}\0{image}\0{index}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(keys: Iterable[str], image: str, index: int) -> str | None:
    """The key owning chunk ``index`` of ``image`` (None without keys)."""
    best = None
    for key in keys:
        w = (weight(key, image, index), key)
        if best is None or w > best:
            best = w
    return None if best is None else best[1]


class OwnerTable:
    """The owners of one image's chunks for the current member list,
    computed once per region of ``region_chunks`` chunks and forgotten
    when the list changes."""

    def __init__(self, image: str, region_chunks: int = 1):
        self.image = image
        self.region_chunks = max(1, region_chunks)
        self._keys: tuple[str, ...] = ()
        self._given: object = None      # the last ``keys`` object given
        self._owner: dict[int, str] = {}

    def owner(self, keys: Iterable[str], index: int) -> str | None:
        """The owner of chunk ``index`` among ``keys`` (any iterable of
        keys; a dict's keys do)."""
        if keys is not self._given:
            ordered = tuple(sorted(set(keys)))
            if ordered != self._keys:
                self._keys = ordered
                self._owner = {}
            self._given = keys
        keys = self._keys
        if not keys:
            return None
        region = index // self.region_chunks
        owner = self._owner.get(region)
        if owner is None:
            owner = self._owner[region] = owner_of(keys, self.image, region)
        return owner
