"""Moving image bytes: ``copy(src, dst, **options) -> Task``.

One library for every transport vmthunder knows (files and block
devices, NBD, iSCSI and export:NAME, HTTP(S), Glance, the local agent's
swarm), each a small driver behind one interface (base.py), joined by
one copy loop (engine.py) that gives every copy the same properties:
several requests in flight, holes skipped and left sparse, digests
checked where the source offers them, the destination renamed into
place only when complete and verified, an optional rate limit, and
progress that only grows. ``vmthunder copy`` is its command line
(cli.py).

The drivers (aiohttp among them) are imported on first use of ``copy``,
``Task``, ``Progress`` or ``Result``, so the command line starts fast.
"""

from vmthunder.transfer.errors import (DestinationError, SourceError,
                                       TransferCancelled, TransferError,
                                       VerificationError)

__all__ = ["DestinationError", "Progress", "Result", "SourceError", "Task",
           "TransferCancelled", "TransferError", "VerificationError", "copy"]

_LAZY = {"copy": "task", "Task": "task", "Progress": "engine",
         "Result": "engine"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute "
                             f"{name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
