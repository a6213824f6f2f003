"""A Cinder volume as the bottom layer: the origin ``cinder://VOLUME_ID``.

:meth:`CinderSource.open` attaches the image's volume and its manifest
volume read-only through Cinder's attachments API (microversion 3.54,
this host's connector: :func:`vmthunder.cinder.client.connector`), logs
in to both with the userspace initiator and the CHAP credentials of each
attachment's ``connection_info``, reads the manifest's header and page
digests (the table lazily, as from a tgtd export's manifest LUN) and
checks its identity against the one recorded on the volume
(``vmthunder_manifest_identity``, written by `vmthunder export
glance://ID --cinder`): the root of trust is the volume's metadata in
Cinder. The cache above checks every chunk against the manifest.
:meth:`CinderSource.close` logs out and deletes both attachments.

The CHAP secrets live in the sessions only: they are not logged, and not
in any error or repr.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from vmthunder import blockdev
from vmthunder.blockdev import BlockError
from vmthunder.cinder import client as cc
from vmthunder.cinder import export as cinder_export
from vmthunder.volume.iscsi_manifest import read_manifest
from vmthunder.volume.iscsi_session import (DEFAULT_RECONNECT_TIMEOUT,
                                            DEFAULT_TIMEOUT, IscsiSession)
from vmthunder.volume.iscsi_source import IscsiSource
from vmthunder.volume.iscsi_url import parse_portal

LOG = logging.getLogger(__name__)


class CinderSource(blockdev.BlockDevice):
    """Read-only: the image volume through an :class:`IscsiSource`, sized
    and named by the manifest (a volume is whole GiB, the image is not)."""

    capabilities = blockdev.Capabilities(writable=False)

    def __init__(self, volume_id: str, image: IscsiSource,
                 manifest_session: IscsiSession, manifest, detach):
        self.volume_id = volume_id
        self.image = image
        self.manifest_session = manifest_session
        self.manifest = manifest
        self.size = manifest.size
        self._detach = detach
        self._closed = False

    @classmethod
    async def open(cls, volume_id: str, settings: cc.CinderSettings, *,
                   timeout: float = DEFAULT_TIMEOUT,
                   reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
                   ) -> CinderSource:
        client = await asyncio.to_thread(_client, settings)
        volume = await _call(settings, client.volumes.get, volume_id)
        meta = getattr(volume, "metadata", {}) or {}
        manifest_id = meta.get(cinder_export.META_MANIFEST_VOLUME)
        identity = meta.get(cinder_export.META_IDENTITY)
        if not manifest_id or not identity:
            raise BlockError(
                errno.EINVAL,
                f"Cinder volume {volume_id} has no vmthunder manifest "
                f"({cinder_export.META_MANIFEST_VOLUME} and "
                f"{cinder_export.META_IDENTITY} in its metadata): export "
                "its image with `vmthunder export glance://IMAGE_ID "
                "--cinder`")
        conn = await asyncio.to_thread(cc.connector, settings)
        attachments: list[cc.Attachment] = []

        async def detach():
            for att in reversed(attachments):
                try:
                    await _call(settings, cc.detach, client, att.id,
                                att.volume_id)
                except BlockError as exc:
                    LOG.error("volume %s: attachment %s not deleted: %s",
                              att.volume_id, att.id, exc)
            attachments.clear()

        image = session = None
        try:
            for vid in (volume_id, manifest_id):
                attachments.append(await _call(settings, cc.attach, client,
                                               vid, conn, mode="ro"))
            image_att, manifest_att = attachments
            session, manifest = await open_manifest(
                manifest_att, identity, initiator=conn["initiator"],
                timeout=timeout, reconnect_timeout=reconnect_timeout)
            image = await IscsiSource.open(
                image_att.url(), password=image_att.password,
                timeout=timeout, reconnect_timeout=reconnect_timeout,
                initiator_name=conn["initiator"])
            if image.lun_size < manifest.size:
                raise BlockError(
                    errno.EINVAL,
                    f"Cinder volume {volume_id} has {image.lun_size} "
                    f"bytes, less than its manifest's {manifest.size}; "
                    "refusing to serve it")
        except BaseException:
            if image is not None:
                await image.close()
            if session is not None:
                await session.close(0)
            await detach()
            raise
        LOG.info("cinder://%s: %s, manifest volume %s (%d chunks)",
                 volume_id, image.describe(), manifest_id, manifest.chunks)
        return cls(volume_id, image, session, manifest, detach)

    def identity(self) -> str:
        return self.manifest.identity()

    def describe(self) -> str:
        return f"cinder://{self.volume_id} ({self.image.describe()})"

    def stats(self) -> dict:
        return self.image.stats()

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return await self.image.read(offset, length)

    async def read_into(self, offset: int, buffer) -> None:
        self.check_range(offset, memoryview(buffer).nbytes)
        await self.image.read_into(offset, buffer)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.image.close()
            await self.manifest_session.close()
        finally:
            await self._detach()


async def open_manifest(att: cc.Attachment, identity: str | None, *,
                        initiator: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT,
                        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT):
    """Log in to the manifest volume of ``att``, read the manifest and
    check it is the one ``identity`` names; (session, manifest)."""
    session = IscsiSession(
        att.iqn, [parse_portal(att.portal)], att.lun,
        username=att.username, password=att.password, timeout=timeout,
        reconnect_timeout=reconnect_timeout, initiator_name=initiator)
    await session.connect()
    try:
        manifest = await asyncio.wait_for(
            read_manifest(session, att.iqn, att.lun), timeout)
        if identity is not None and manifest.identity() != identity:
            raise BlockError(
                errno.EINVAL,
                f"the manifest in volume {att.volume_id} is not the one "
                f"recorded for its image (identity "
                f"{manifest.identity()[:16]}..., recorded "
                f"{identity[:16]}...); export the image again")
    except BaseException:
        await session.close(0)
        raise
    return session, manifest


def _client(settings: cc.CinderSettings):
    return cc.volume_client(settings)


async def _call(settings: cc.CinderSettings, func, *args, **kwargs):
    """A blocking Cinder call in a thread; its errors as BlockError."""
    from cinderclient import exceptions as cexc
    from keystoneauth1 import exceptions as ksexc
    try:
        return await asyncio.to_thread(func, *args, **kwargs)
    except cc.CinderError as exc:
        raise BlockError(errno.EIO, str(exc)) from None
    except cexc.NotFound as exc:
        raise BlockError(errno.ENOENT, f"Cinder: {exc}") from None
    except (cexc.ClientException, ksexc.ClientException) as exc:
        raise BlockError(errno.EIO, cc.describe_error(exc, settings)) \
            from None
