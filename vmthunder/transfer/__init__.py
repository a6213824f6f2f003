"""Moving image bytes: ``copy(src, dst, **options) -> Task``.

One library for every transport vmthunder knows (files and block
devices, NBD, iSCSI and export:NAME, HTTP(S), Glance, the local agent's
swarm), each a small driver behind one interface (base.py), joined by
one copy loop (engine.py) that gives every copy the same properties:
several requests in flight, holes skipped and left sparse, digests
checked where the source offers them, the destination renamed into
place only when complete and verified, an optional rate limit, and
progress that only grows. ``vmthunder copy`` is its command line.
"""

from vmthunder.transfer.engine import Progress, Result
from vmthunder.transfer.errors import (DestinationError, SourceError,
                                       TransferCancelled, TransferError,
                                       VerificationError)
from vmthunder.transfer.task import Task, copy

__all__ = ["DestinationError", "Progress", "Result", "SourceError", "Task",
           "TransferCancelled", "TransferError", "VerificationError", "copy"]
