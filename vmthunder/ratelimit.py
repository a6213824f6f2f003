"""Byte-rate limits: a token bucket for asyncio, and rates as people write
them in a config file.

One :class:`RateLimit` is shared by everything that must stay under one
rate together (every peer connection of an agent, every background
fetch): each ``acquire(n)`` books ``n`` bytes on the bucket's time line,
in call order, and sleeps until its turn. Long-run, at most ``rate``
bytes per second pass; after an idle spell up to ``burst`` seconds' worth
pass at once.

Rates (:func:`parse_rate`, the oslo.config type :class:`Rate`): tc(8)
units ending in ``bit`` or ``bps`` ("50mbit" = 50 Mbit/s, "10mbps" = 10
MB/s), else a byte size per second as the command line takes them
("6250000", "64K", "1.5M": powers of 1024). 0 means no limit.
"""

from __future__ import annotations

import asyncio
import re
import time

from oslo_config import types

# tc(8) rate units, in bits per second ("bps" is bytes per second).
_TC_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
    "tbps": 8 * 10**12, "kibps": 8 * 2**10, "mibps": 8 * 2**20,
    "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_RATE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*")

DEFAULT_BURST_SECONDS = 0.25


def parse_rate(text: str | int | float) -> float:
    """Bytes per second of a rate: "50mbit", "10mbps" (tc units), "64K",
    "6250000" (bytes per second); 0 is no limit. ValueError, naming the
    value and the forms accepted, on anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _RATE_RE.fullmatch(str(text).lower())
        unit = m.group(2) if m else None
        if unit is not None and unit in _TC_UNITS:
            value = float(m.group(1)) * _TC_UNITS[unit] / 8
        elif unit is not None and \
                unit.removesuffix("ib").removesuffix("b") in _SIZE_UNITS:
            value = float(m.group(1)) * \
                _SIZE_UNITS[unit.removesuffix("ib").removesuffix("b")]
        else:
            raise ValueError(
                f"{text!r} is not a rate: write a tc rate such as '50mbit' "
                "or '10mbps' (bytes/s), or bytes per second such as "
                "'6250000' or '6M'; 0 for no limit")
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"rate {text!r} must be a finite number >= 0 "
                         "(0: no limit)")
    return value


def format_rate(rate: float | None) -> str:
    """"50 Mbit/s (6.25 MB/s)", or "unlimited" for 0/None."""
    if not rate:
        return "unlimited"
    bits = rate * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.4g} {unit} ({rate / 1e6:.4g} MB/s)"
    return f"{bits:.4g} bit/s ({rate:.4g} B/s)"


class Rate(types.ConfigType):
    """oslo.config type of a rate option: its value is bytes per second
    (a float, 0 = no limit); see :func:`parse_rate`."""

    def __init__(self, type_name: str = "rate value"):
        super().__init__(type_name=type_name)

    def __call__(self, value):
        return parse_rate(value)

    def _formatter(self, value):
        return str(value)

    def __eq__(self, other):
        return self.__class__ == other.__class__

    def __repr__(self):
        return "Rate"


class RateLimit:
    """At most ``rate`` bytes per second, ``burst`` seconds of burst.

    ``acquire(n)`` waits for the turn of ``n`` bytes; callers are served
    in call order. ``bytes`` and ``waited`` (seconds spent sleeping, summed
    over callers) count what went through, for status and metrics.
    """

    def __init__(self, rate: float, burst: float = DEFAULT_BURST_SECONDS,
                 clock=time.monotonic):
        if not rate or rate <= 0:
            raise ValueError(f"rate limit {rate!r} must be positive")
        if burst < 0:
            raise ValueError(f"burst {burst!r} must be >= 0 seconds")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._next = clock()
        self.bytes = 0
        self.waited = 0.0

    def reserve(self, n: int) -> float:
        """Book ``n`` bytes; the seconds the caller must wait before
        sending them (0 within the burst)."""
        now = self._clock()
        start = max(self._next, now - self.burst)
        self._next = start + n / self.rate
        self.bytes += n
        wait = start - now
        if wait > 0:
            self.waited += wait
            return wait
        return 0.0

    def backlog(self) -> float:
        """Seconds a caller booking now would wait before its bytes pass
        (0 while the burst lasts)."""
        return max(0.0, self._next - self._clock())

    async def acquire(self, n: int) -> None:
        wait = self.reserve(n)
        if wait > 0:
            await asyncio.sleep(wait)
