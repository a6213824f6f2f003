"""Where an image's layer stack is assembled, the one place.

    origin text --Origin.parse--> Origin --open_source--> source
    source (+ its manifest) --open_cache--> CacheLayer
    CacheLayer --open_snapshot--> SnapshotLayer (one per VM)

`vmthunder serve`, `vmthunder boot`, the agent (which puts its peers
between the source and the cache, vmthunder/p2p/) and the Nova driver
all build their stacks with these functions, so an origin means the same
everywhere and a cache always checks what its manifest covers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from vmthunder import blockdev
from vmthunder.cache.cache_layer import CacheLayer
from vmthunder.redaction import redact_url
from vmthunder.cache.snapshot import SnapshotLayer
from vmthunder.volume.file_source import FileSource

LOG = logging.getLogger(__name__)

ORIGIN_FORMS = ("a raw image file or block device (an absolute path for "
                "the agent), iscsi://[USER@]HOST[:PORT]/IQN/LUN, "
                "export:NAME (an image `vmthunder export` published), or "
                "cinder://VOLUME_ID (an image volume `vmthunder export "
                "glance://ID --cinder` made)")
# A Cinder volume id (a UUID; any id of letters, digits and '-').
CINDER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class OriginError(ValueError):
    """Text that is no origin; the message says what is accepted."""


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where an image's bytes come from, parsed once.

    ``kind`` is "file" (``target`` a path), "iscsi" (``target`` the
    iscsi:// URL, maybe with credentials), "export" (``target`` the
    name of an export of this host's [export] settings) or "cinder"
    (``target`` a Cinder volume id, reached through [cinder])."""

    kind: str
    target: str

    @classmethod
    def parse(cls, text, *, absolute: bool = False) -> Origin:
        """``absolute``: a file must be given by an absolute path (the
        agent does not run in its caller's directory)."""
        if not isinstance(text, str) or not text:
            raise OriginError(f"an origin must be a non-empty string: "
                              f"{ORIGIN_FORMS}")
        if any(ch in text for ch in "\0\n\r"):
            raise OriginError(f"origin contains control characters; give "
                              f"{ORIGIN_FORMS}")
        if text.startswith("export:"):
            from vmthunder.volume import export as export_mod
            name = text.removeprefix("export:")
            try:
                export_mod.check_name(name)
            except export_mod.ExportError as exc:
                raise OriginError(f"origin {text!r}: {exc}") from None
            return cls("export", name)
        if text.startswith("iscsi://"):
            from vmthunder.volume.iscsi_url import parse_iscsi_url
            try:
                parse_iscsi_url(text)
            except ValueError as exc:
                raise OriginError(f"origin {redact_url(text)!r}: {exc}") \
                    from None
            return cls("iscsi", text)
        if text.startswith("cinder://"):
            volume_id = text.removeprefix("cinder://").rstrip("/")
            if not CINDER_ID_RE.match(volume_id):
                raise OriginError(f"origin {text!r}: {volume_id!r} is not "
                                  "a Cinder volume id (cinder://UUID)")
            return cls("cinder", volume_id)
        if "://" in text:
            raise OriginError(f"origin {text!r} has an unknown scheme; give "
                              f"{ORIGIN_FORMS}")
        if absolute and not os.path.isabs(text):
            raise OriginError(f"origin {text!r} is a relative path; give an "
                              "absolute path (the agent does not run in "
                              "your working directory)")
        return cls("file", text)

    def __str__(self) -> str:
        if self.kind == "cinder":
            return f"cinder://{self.target}"
        return f"export:{self.target}" if self.kind == "export" \
            else self.target

    def redacted(self) -> str:
        """For logs and errors: no password."""
        return redact_url(str(self))

    def default_name(self) -> str:
        """A name for the image: the file's name without extension, the
        export's name, the iSCSI target's last name part, or the Cinder
        volume's id."""
        if self.kind in ("export", "cinder"):
            return self.target
        if self.kind == "iscsi":
            return self.target.rstrip("/").split("/")[-2].rsplit(":", 1)[-1]
        return os.path.splitext(os.path.basename(self.target))[0]


async def open_source(origin: Origin, iscsi=None, exports=None,
                      cinder=None) -> blockdev.BlockDevice:
    """The bottom layer of ``origin``. ``iscsi``: the [iscsi] options
    (None: defaults); ``exports``: the [export] settings that resolve
    export:NAME; ``cinder``: the [cinder] options (or a CinderSettings)
    that reach cinder://ID. Raises BlockError, OriginError or OSError."""
    if origin.kind == "file":
        return FileSource(origin.target)
    if origin.kind == "iscsi":
        return await _open_iscsi(origin.target, iscsi, None)
    if origin.kind == "cinder":
        return await _open_cinder(origin.target, iscsi, cinder)
    if exports is None:
        raise OriginError(f"{origin}: no [export] settings to resolve it")
    from vmthunder.volume import export as export_mod
    name = origin.target
    url = export_mod.iscsi_url(exports.portal, exports.iqn_of(name), 1)
    password = None
    try:
        # On the origin host itself the export's CHAP secret is local.
        user, password = export_mod.read_chap(exports, name)
        url = url.replace("iscsi://", f"iscsi://{user}@", 1)
    except (OSError, ValueError, export_mod.ExportError):
        pass
    return await _open_iscsi(url, iscsi, password)


async def _open_cinder(volume_id: str, iscsi, cinder):
    from vmthunder.cinder.client import CinderSettings
    from vmthunder.volume.cinder_source import CinderSource
    if cinder is None:
        raise OriginError(f"cinder://{volume_id}: no [cinder] settings to "
                          "reach Cinder")
    settings = cinder if isinstance(cinder, CinderSettings) \
        else CinderSettings.from_conf(cinder)
    kwargs = {}
    if iscsi is not None:
        kwargs = dict(timeout=iscsi.login_timeout,
                      reconnect_timeout=iscsi.reconnect_timeout)
    return await CinderSource.open(volume_id, settings, **kwargs)


async def _open_iscsi(url: str, iscsi, password):
    from vmthunder.volume import osbrick_source
    from vmthunder.volume.iscsi_source import IscsiSource
    if iscsi is not None:
        if iscsi.chap_user and "@" not in url.split("/")[2]:
            url = url.replace("iscsi://", f"iscsi://{iscsi.chap_user}@", 1)
        if password is None and iscsi.chap_secret_file:
            with open(iscsi.chap_secret_file) as f:
                password = f.read().strip()
        kwargs = dict(manifest_lun=iscsi.manifest_lun or None,
                      portals=list(iscsi.portals),
                      timeout=iscsi.login_timeout,
                      reconnect_timeout=iscsi.reconnect_timeout)
        attach = iscsi.attach
    else:
        kwargs = dict(manifest_lun=2)
        attach = "auto"
    where = url.split("@")[-1]
    if kwargs["manifest_lun"] is None:
        LOG.warning("%s: no manifest LUN configured; chunks from the "
                    "origin are not verified", where)
    how, why = osbrick_source.choose_attach(attach or "auto")
    LOG.info("%s: %s initiator (%s)", where, how, why)
    if how == "kernel":
        if kwargs.get("portals"):
            LOG.warning("[iscsi] portals are not used by the kernel "
                        "attach (os-brick, single path)")
        return await osbrick_source.OsBrickSource.open(
            url, password=password, manifest_lun=kwargs["manifest_lun"])
    return await IscsiSource.open(url, password=password, **kwargs)


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """How a host cache is kept (the [cache] options)."""

    directory: str
    chunk_size: int = 256 * 1024     # for sources without a manifest
    max_pending_writes: int = 32
    sync_interval: float = 2.0

    @classmethod
    def from_conf(cls, conf_cache, **overrides) -> "CacheOptions":
        """From the [cache] option group; ``overrides`` (a command line's
        values) win where they are not None."""
        values = dict(directory=conf_cache.cache_dir,
                      chunk_size=conf_cache.chunk_size,
                      max_pending_writes=conf_cache.max_pending_writes,
                      sync_interval=conf_cache.sync_interval)
        values.update((k, v) for k, v in overrides.items() if v is not None)
        return cls(**values)


async def open_cache(source: blockdev.BlockDevice, options: CacheOptions,
                     *, checks_itself: bool = False) -> CacheLayer:
    """The copy-on-read cache over ``source``. With a manifest (the
    source's), the cache's chunks are the manifest's and each fetched
    chunk is checked against exactly one digest before it is stored or
    served; ``checks_itself``: the source verifies every chunk it returns
    (the agent's peer volume), the cache need not. Closes ``source`` if
    the cache cannot be opened."""
    manifest = source.manifest
    verify = manifest is not None and not checks_itself
    try:
        return CacheLayer(
            source, options.directory,
            chunk_size=(manifest.chunk_size if manifest is not None
                        else options.chunk_size),
            max_pending_writes=options.max_pending_writes,
            sync_interval=options.sync_interval,
            verify=manifest.verify if verify else None,
            verify_many=manifest.verify_run if verify else None,
            prepare_verify=manifest.load if verify else None)
    except BaseException:
        await source.close()
        raise


def snapshot_dir(cache: CacheLayer) -> str:
    """Where the VMs' snapshots of ``cache`` live (serve and the agent
    alike, so snapshot-delete finds them)."""
    return os.path.join(cache.directory, "snapshots")


def open_snapshot(cache: CacheLayer, name: str, *, block_size: int = 4096,
                  size: int | None = None) -> SnapshotLayer:
    """VM ``name``'s copy-on-write snapshot on ``cache`` (created, or
    reopened with what it holds); ``size`` above the image's gives the VM
    a larger disk."""
    return SnapshotLayer(cache, snapshot_dir(cache), name,
                         block_size=block_size, size=size)
