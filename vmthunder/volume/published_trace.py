"""Boot traces as data of an image: published with its export, read by hosts.

A trace (vmthunder/trace.py: what a boot of the image read, in order) is
published beside the manifest of a `vmthunder export`: the trace file's
bytes, as they are (gzip or text), become ``trace.lun`` in the export's
directory, served read-only as LUN 3 of the image's target, and the
manifest's header names it::

    "trace": {"lun": 3, "bytes": N, "digest": "<hex>", "compressed": true}

with the digest (the manifest's own algorithm, full length) of those N
bytes. So a host that trusts the manifest header (the root of trust of an
export, read at attach) trusts the trace: a trace that does not match the
digest (changed on the LUN, or forged by whoever answers for it) is
refused (:class:`PublishedTraceError`), never used. The manifest's
identity does not cover the header's trace entry: publishing a trace
changes no cache key, and caches of the image stay valid.

Export side: :func:`publish` (`vmthunder trace publish NAME TRACE`).
Host side: :func:`read` (the agent, at a VM's create, for prefetch).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os

from vmthunder import blockdev
from vmthunder import privileged
from vmthunder import trace as trace_mod
from vmthunder.volume import export as export_mod
from vmthunder.volume import manifest as manifest_mod

LOG = logging.getLogger(__name__)

MAX_TRACE_BYTES = manifest_mod.MAX_TRACE_BYTES
# What a published trace may hold once read (the agent's precache bounds).
MAX_TEXT_BYTES = 32 * 1024 * 1024
MAX_REQUESTS = 250_000
# Bytes per READ command when a host reads the trace LUN.
_READ_STEP = 256 * 1024


class PublishedTraceError(blockdev.BlockError):
    """The published trace is unreadable, malformed, or does not match
    the digest the manifest gives for it (EIO)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def _print(text: str) -> None:
    print(text, flush=True)


# -- export side -----------------------------------------------------------


def publish(cfg: export_mod.ExportConfig, name: str, trace_path: str,
            out=_print) -> dict:
    """Publish ``trace_path`` with export ``name``: trace.lun, LUN 3,
    then the manifest header's trace entry (last: a host sees the entry
    only once the LUN serves it). Publishing again replaces the trace.
    Returns the header's entry."""
    export_mod.check_name(name)
    try:
        trace = trace_mod.load(trace_path, max_file_bytes=MAX_TRACE_BYTES,
                               max_text_bytes=MAX_TEXT_BYTES,
                               max_requests=MAX_REQUESTS)
        with open(trace_path, "rb") as f:
            data = f.read(MAX_TRACE_BYTES + 1)
    except (trace_mod.TraceError, OSError) as exc:
        raise export_mod.ExportError(f"cannot publish trace: {exc}") \
            from None
    if len(data) > MAX_TRACE_BYTES or not data:
        raise export_mod.ExportError(
            f"trace {trace_path} has {len(data)} bytes; a published trace "
            f"has 1 to {MAX_TRACE_BYTES}")
    privileged.require_root("vmthunder trace publish")
    with export_mod._locked(cfg, out):
        record = export_mod.read_record(cfg, name)
        if record is None:
            raise export_mod.ExportError(
                f"no export named {name!r} in {cfg.export_dir}; "
                "`vmthunder exports` lists them")
        if trace.image_size > record.size:
            raise export_mod.ExportError(
                f"trace {trace_path} is of an image of {trace.image_size} "
                f"bytes; export {name} has {record.size}: is it a trace "
                "of this image?")
        directory = cfg.dir_of(name)
        manifest_path = os.path.join(directory, export_mod.MANIFEST)
        lun_path = os.path.join(directory, export_mod.MANIFEST_LUN)
        try:
            with open(manifest_path, "rb") as f:
                block = f.read(manifest_mod.HEADER_BYTES)
            head = manifest_mod.parse_header(block, manifest_path)
        except (OSError, manifest_mod.ManifestError) as exc:
            raise export_mod.ExportError(
                f"export {name}: cannot read its manifest ({exc}); "
                "re-export the image") from None
        if head is None:
            raise export_mod.ExportError(
                f"export {name} has a version 1 manifest, which cannot "
                "name a trace; unexport and export the image again")
        doc = json.loads(bytes(block).split(b"\0", 1)[0])
        entry = {"lun": export_mod.LUN_TRACE, "bytes": len(data),
                 "digest": manifest_mod.HASHES[head["algorithm"]](
                     data).hexdigest(),
                 "compressed": trace_path.endswith(".gz")}
        doc["trace"] = entry
        text = json.dumps(doc, separators=(",", ":")).encode()
        if len(text) > manifest_mod.HEADER_BYTES:
            raise export_mod.ExportError(
                f"export {name}: the manifest header with the trace entry "
                f"is {len(text)} bytes (at most "
                f"{manifest_mod.HEADER_BYTES})")
        padded = data + b"\0" * (-len(data) % export_mod.SECTOR)
        trace_lun = os.path.join(directory, export_mod.TRACE_LUN)
        tmp = trace_lun + ".tmp"
        export_mod._write(tmp, padded)
        os.replace(tmp, trace_lun)
        export_mod._fsync_dir(directory)
        if record.exported:
            _serve_lun(cfg, record, trace_lun)
        header = text + b"\0" * (manifest_mod.HEADER_BYTES - len(text))
        for path in (manifest_path, lun_path):
            # In place: tgtd keeps the file open (a new file would not be
            # served); one write of the header block.
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, header, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
    out(f"export {name}: trace {trace_path} published as LUN "
        f"{export_mod.LUN_TRACE} ({len(data)} bytes, "
        f"{len(trace.requests)} requests, {head['algorithm']} "
        f"{entry['digest'][:16]}...)")
    return entry


def _serve_lun(cfg, record, path: str) -> None:
    """(Re)create LUN 3 of the export's target on ``path``."""
    tgt = cfg.tgt(record.portal)
    tgt.ensure_running()
    target = tgt.target_named(record.iqn)
    if target is None:
        # tgtd lost the target: re-created whole (with LUN 3).
        export_mod._ensure_target(cfg, tgt, record)
        return
    if target.lun(export_mod.LUN_TRACE) is not None:
        tgt.delete_lun(target.tid, export_mod.LUN_TRACE)
    tgt.add_lun(target.tid, export_mod.LUN_TRACE, path)


# -- host side -------------------------------------------------------------


async def read(source) -> trace_mod.Trace | None:
    """The trace published with ``source``'s image, checked against the
    digest its manifest gives; None when the manifest names none (or the
    source cannot read LUNs of its target: only iSCSI origins publish).
    PublishedTraceError when it cannot be read or does not match."""
    manifest = getattr(source, "manifest", None)
    ref = getattr(manifest, "trace", None)
    if ref is None:
        return None
    session = getattr(source, "session", None)
    url = getattr(source, "url", None)
    if session is None or url is None:
        LOG.info("%s: its manifest names a boot trace on LUN %d, which "
                 "this origin cannot read; no prefetch",
                 source.describe(), ref["lun"])
        return None
    lun = ref["lun"]
    where = f"trace LUN {lun} of iSCSI target {url.target}"
    nbytes = ref["bytes"]
    try:
        block_size, blocks = await session.read_capacity(lun)
        if block_size * blocks < nbytes:
            raise PublishedTraceError(
                f"{where} has {block_size * blocks} bytes; the manifest "
                f"says the trace has {nbytes}")
        session.set_block_size(lun, block_size)
        buf = bytearray(-(-nbytes // block_size) * block_size)
        view = memoryview(buf)
        step = max(_READ_STEP - _READ_STEP % block_size, block_size)
        await asyncio.gather(*(
            session.read_into(lun, pos // block_size,
                              view[pos:pos + min(step, len(buf) - pos)],
                              f"{where} at offset {pos}")
            for pos in range(0, len(buf), step)))
    except PublishedTraceError:
        raise
    except blockdev.BlockError as exc:
        raise PublishedTraceError(f"cannot read the {where}: {exc}") \
            from None
    data = bytes(view[:nbytes])
    if manifest_mod.HASHES[manifest.algorithm](data).hexdigest() \
            != ref["digest"]:
        raise PublishedTraceError(
            f"{where} does not match the digest the image's manifest "
            "gives for it: the trace was changed or forged; it is not "
            "used (publish it again with `vmthunder trace publish`)")

    def parse():
        return trace_mod.loads(data, where, compressed=ref["compressed"],
                               max_text_bytes=MAX_TEXT_BYTES,
                               max_requests=MAX_REQUESTS)
    try:
        trace = await asyncio.to_thread(parse)
    except trace_mod.TraceError as exc:
        raise PublishedTraceError(str(exc)) from None
    if trace.image_size > manifest.size:
        raise PublishedTraceError(
            f"{where} is a trace of an image of {trace.image_size} bytes; "
            f"this image has {manifest.size}")
    return trace
