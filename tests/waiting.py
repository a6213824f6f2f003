"""Bounded waits on a condition, for tests.

A test that needs "until X happened" waits for X, with a deadline that
fails the test, instead of sleeping a fixed time and hoping X happened
(too short on a loaded machine, too long everywhere else).
"""

from __future__ import annotations

import asyncio
import time


class _Poll:
    """One wait: :meth:`done` checks the condition, raises AssertionError
    naming ``what`` once ``timeout`` seconds have passed."""

    def __init__(self, predicate, what: str, timeout: float):
        self.predicate = predicate
        self.what = what
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.value = None

    def done(self) -> bool:
        self.value = self.predicate()
        if self.value:
            return True
        if time.monotonic() > self.deadline:
            raise AssertionError(f"timed out after {self.timeout} s waiting "
                                 f"for {self.what} (last: {self.value!r})")
        return False


def wait_until(predicate, what: str, timeout: float = 10.0,
               poll: float = 0.01):
    """Poll ``predicate()`` until it returns something true; that value."""
    p = _Poll(predicate, what, timeout)
    while not p.done():
        time.sleep(poll)
    return p.value


async def until(predicate, what: str, timeout: float = 10.0,
                poll: float = 0.001):
    """:func:`wait_until` for a coroutine: the event loop runs while it
    waits."""
    p = _Poll(predicate, what, timeout)
    while not p.done():
        await asyncio.sleep(poll)
    return p.value
