"""Unit tests: no root, no network, no external binaries."""
