"""``[vmthunder] precache_base``: Nova's own image cache filled through the
swarm.

For deployers who prefer local copies: instances get Nova's ordinary
root disks ([libvirt] images_type, a qcow2 over the base image with the
default settings), and the base image ``<instances_path>/_base/<sha1 of
the image id>`` is filled through this host's vmthunder-agent instead of
downloaded from Glance. The agent attaches the image's vmthunder origin
(the same rules as for vmthunder disks: the image's origin_property,
cinder_origin, origin_template) and warms its cache (peers that hold a
chunk first, the origin last, every chunk checked against the manifest);
``vmthunder.transfer.copy('vmthunder://IMAGE', base)`` then reads it
from the agent into the base file, written under a temporary name and
renamed only when complete: a failed or killed copy never leaves a base
file that looks finished. So the origin (and Glance) send an image once
per swarm, not once per host, and the instance runs from local disk.

Nova calls :func:`fetch_base` where it would call
``libvirt_utils.fetch_image`` for an image's base (spawn, and the image
precache API through :func:`cache_image`); an image without a vmthunder
origin, or an agent that cannot be reached, is downloaded from Glance
when ``fallback_to_download`` is set and fails the build otherwise.
"""

from __future__ import annotations

import os
import time

from oslo_log import log as logging
from oslo_utils import fileutils

import nova.conf
from nova.compute import utils as compute_utils
from nova import exception
from nova.i18n import _
import nova.privsep.path
from nova import utils
from nova.virt.libvirt import imagecache
from nova.virt.libvirt import utils as libvirt_utils

from nova_driver import imagebackend
from vmthunder.agent import client as agent_client

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


def enabled() -> bool:
    return bool(CONF.vmthunder.precache_base)


def base_path(image_id: str) -> str:
    """Where Nova keeps the base image of ``image_id``."""
    return os.path.join(CONF.instances_path,
                        CONF.image_cache.subdirectory_name,
                        imagecache.get_cache_fname(image_id))


def _download(context, target, image_id, trusted_certs, why: str) -> None:
    LOG.warning("vmthunder: %s; [vmthunder] fallback_to_download is set: "
                "downloading image %s from the image service into %s",
                why, image_id, target)
    libvirt_utils.fetch_image(context, target, image_id, trusted_certs)


def fetch_base(context, target, image_id, trusted_certs=None) -> None:
    """Fill ``target`` (a base image file) with image ``image_id``
    through the agent (Nova's fetch_image signature)."""
    fallback = CONF.vmthunder.fallback_to_download
    origin, _image = imagebackend.image_origin(context, image_id)
    if origin is None:
        reason = imagebackend.no_origin_reason(image_id)
        if fallback:
            return _download(context, target, image_id, trusted_certs,
                             reason)
        raise exception.ImageUnacceptable(image_id=image_id, reason=reason)
    client = imagebackend._agent()
    try:
        info = imagebackend.attach_image(client, image_id, origin)
    except agent_client.AgentUnavailable as exc:
        if fallback:
            return _download(context, target, image_id, trusted_certs,
                             str(exc))
        raise imagebackend._unavailable(exc)
    except agent_client.AgentError as exc:
        if exc.status == 400:
            raise exception.ImageUnacceptable(image_id=image_id, reason=_(
                "its vmthunder origin %(o)s was refused by the agent: "
                "%(msg)s") % {"o": imagebackend.redact(origin), "msg": exc})
        raise imagebackend._failed(_("cannot attach image %(id)s from "
                                     "%(o)s") % {
            "id": image_id, "o": imagebackend.redact(origin)}, exc)
    _copy(info["name"], target, image_id)


def _copy(name: str, target: str, image_id: str) -> None:
    from vmthunder import transfer
    timeout = CONF.vmthunder.precache_timeout or None
    started = time.monotonic()
    with compute_utils.disk_ops_semaphore:
        task = transfer.copy(f"vmthunder://{name}", target,
                             agent_socket=CONF.vmthunder.agent_socket,
                             timeout=CONF.vmthunder.agent_timeout)
        try:
            result = task.wait(timeout)
        except TimeoutError:
            task.cancel()
            try:
                task.wait(60)
            except (transfer.TransferError, TimeoutError):
                pass
            raise imagebackend.VMThunderError(reason=_(
                "filling the image cache with image %(id)s through the "
                "agent took over %(t)g s ([vmthunder] precache_timeout); "
                "nothing was kept") % {"id": image_id, "t": timeout})
        except transfer.TransferError as exc:
            raise imagebackend.VMThunderError(reason=_(
                "cannot fill the image cache with image %(id)s through "
                "the agent: %(msg)s") % {"id": image_id, "msg": exc})
    by = result.by_source
    LOG.info("Image %(id)s cached in %(path)s through vmthunder: %(size)d "
             "bytes in %(s).1f s (the agent fetched %(peers)d bytes from "
             "peers, %(origin)d from the origin, had %(held)d already); "
             "verified: %(v)s",
             {"id": image_id, "path": target, "size": result.size,
              "s": time.monotonic() - started, "peers": by.get("peers", 0),
              "origin": by.get("origin", 0), "held": by.get("held", 0),
              "v": result.verified or "by the agent, chunk by chunk"})


def cache_image(context, image_id) -> bool:
    """The image precache API (LibvirtDriver.cache_image) with the base
    filled through the agent: True when it was fetched, False when Nova's
    cache had it (its time stamp renewed, as Nova does)."""
    path = base_path(image_id)
    cache_dir = os.path.dirname(path)
    fileutils.ensure_tree(cache_dir)
    filename = os.path.basename(path)

    # The lock Nova's image backend takes on this base while it fills it.
    @utils.synchronized(filename, external=True,
                        lock_path=os.path.join(CONF.instances_path, "locks"))
    def fill() -> bool:
        if os.path.exists(path):
            LOG.info("Image %s already cached; updating timestamp",
                     image_id)
            nova.privsep.path.utime(path)
            return False
        LOG.info("Caching image %s by request, through vmthunder",
                 image_id)
        fetch_base(context, path, image_id)
        return True

    return fill()
