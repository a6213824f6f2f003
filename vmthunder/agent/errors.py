"""What the agent refuses, by kind; api.py maps each kind to its HTTP
status. Every message says what was wrong and what to do; a refused
request changes nothing."""

from __future__ import annotations


class AgentError(Exception):
    """A request the agent refuses or cannot carry out."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(AgentError):
    """The request is wrong in itself (a bad name, origin, size, body)."""


class NotFound(AgentError):
    """It names an image or VM the agent does not have."""


class Conflict(AgentError):
    """It clashes with the agent's state (exists already, still in use)."""


class OriginUnavailable(AgentError):
    """The image's origin could not be reached or read."""


class AgentFailure(AgentError):
    """The agent itself failed (its disk, its state file)."""


def message_of(exc: BaseException) -> str:
    """What an exception says, or its type when it says nothing."""
    return str(exc) or type(exc).__name__
