"""The choice of driver by URI scheme."""

from __future__ import annotations

from vmthunder.redaction import redact_url
from vmthunder.transfer import agent, destinations, http, sources
from vmthunder.transfer.base import (DESTINATION_FORMS, SOURCE_FORMS,
                                     Destination, Source, file_path,
                                     scheme_of)
from vmthunder.transfer.errors import DestinationError, SourceError

def make_source(uri: str, options: dict) -> Source:
    """The driver for ``uri`` (not opened yet); SourceError for an
    unknown scheme."""
    drivers = {
        "file": sources.FileSource,
        "nbd": sources.NbdSource, "nbd+unix": sources.NbdSource,
        "iscsi": sources.StackSource, "export": sources.StackSource,
        "cinder": sources.StackSource,
        "http": http.HttpSource, "https": http.HttpSource,
        "glance": http.GlanceSource,
        "vmthunder": agent.AgentSource,
    }
    try:
        scheme = scheme_of(uri)
    except ValueError as exc:
        raise SourceError(None, str(exc)) from None
    driver = drivers.get(scheme)
    if driver is None:
        raise SourceError(redact_url(uri), f"unknown scheme {scheme!r}; a "
                          "source is " + "; ".join(SOURCE_FORMS))
    return driver(uri, options)


def make_destination(uri: str, options: dict) -> Destination:
    try:
        scheme = scheme_of(uri)
    except ValueError as exc:
        raise DestinationError(None, str(exc)) from None
    fmt = options.get("dst_format") or "raw"
    if fmt not in ("raw", "qcow2"):
        raise DestinationError(uri, f"dst_format {fmt!r}: raw or qcow2")
    if scheme == "file":
        try:
            path = file_path(uri)
        except ValueError as exc:
            raise DestinationError(uri, str(exc)) from None
        if fmt == "qcow2":
            return destinations.Qcow2FileDestination(path, options)
        return destinations.FileDestination(path, options)
    if scheme in ("nbd", "nbd+unix"):
        if fmt != "raw":
            raise DestinationError(redact_url(uri), "an NBD export "
                                   "receives raw bytes; dst_format "
                                   "qcow2 is for files")
        return destinations.NbdDestination(uri, options)
    raise DestinationError(redact_url(uri), f"cannot write to {scheme!r}; "
                           "a destination is " + "; ".join(
                               DESTINATION_FORMS))


