"""Byte sizes as people write them on command lines."""

from __future__ import annotations

import argparse

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"k": KiB, "m": MiB, "g": GiB, "t": GiB << 10}


def parse_size(text: str) -> int:
    """4096, 64K, 1.5M, 1G, 1GiB (powers of 1024); positive.

    An argparse ``type``: a bad value is an ArgumentTypeError that says
    what was wrong.
    """
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in _UNITS:
            value = int(float(t[:-1]) * _UNITS[t[-1]])
        else:
            value = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 65536, 64K, 1M, 1G)") \
            from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be positive")
    return value
