"""What a failed copy raises: which side failed, and why.

Every error a :class:`~vmthunder.transfer.Task` ends with is a
:class:`TransferError`; ``side`` is ``"source"`` or ``"destination"``
(None for a cancelled copy or bad options), ``where`` the side's URI with
any password hidden, ``reason`` the cause in words::

    source http://img.example/x.raw: connection reset after 3.0 MiB
    destination /var/lib/images/x.raw: No space left on device
"""

from __future__ import annotations


class TransferError(Exception):
    """A copy failed; the message names the side and says why."""

    side: str | None = None

    def __init__(self, where: str | None, reason: str):
        self.where = where
        self.reason = reason
        if self.side and where:
            text = f"{self.side} {where}: {reason}"
        elif where:
            text = f"{where}: {reason}"
        else:
            text = reason
        super().__init__(text)


class SourceError(TransferError):
    """The source could not be opened or read, or sent wrong data."""

    side = "source"


class VerificationError(SourceError):
    """The source's bytes do not match the digests it offers (a chunk's
    manifest digest, the whole image's hash): nothing is committed."""


class DestinationError(TransferError):
    """The destination could not be created, written or committed."""

    side = "destination"


class TransferCancelled(TransferError):
    """The copy was cancelled (Task.cancel()); nothing is committed."""

    def __init__(self, where: str | None = None,
                 reason: str = "the copy was cancelled; no destination "
                               "was committed"):
        super().__init__(where, reason)
