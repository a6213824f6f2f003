"""Chunk map, copy-on-read cache layer, copy-on-write snapshot layer."""
