"""vmthunder's Nova compute driver: Nova's libvirt driver whose instances
get their root disks from the host's vmthunder-agent.

nova.conf::

    [DEFAULT]
    compute_driver = vmthunder.VMThunderLibvirtDriver
    [vmthunder]
    agent_socket = /run/vmthunder/agent.sock

run with ``vmthunder-nova-compute`` (nova_driver/cmd.py: Nova loads
compute drivers from ``nova.virt`` only).

What differs from LibvirtDriver:

- ``image_backend``: the root disk ``disk`` is a :class:`VMThunderImage`
  (an NBD disk on the agent), everything else is Nova's.
- ``_cleanup``: with the instance's disks, its vmthunder disk is deleted
  (only it: the image's cache stays for other instances).
- ``snapshot``: the disk is read through its NBD export (guest paused
  meanwhile) into the format Nova asks for and uploaded; the new image does
  not carry the parent's origin property.
- ``cache_image`` (the compute API's image precache): attach the image on
  the agent and warm its cache.
- ``[vmthunder] precache_base``: root disks are Nova's own (a qcow2 over
  ``_base``), and the base is filled through the agent instead of
  downloaded from Glance (spawn and cache_image; precache_base.py).
- live migration, cold migration and resize of an instance with a
  vmthunder root disk: refused before anything moves
  (MigrationPreCheckError), as Nova does for LVM-backed instances.
"""

from __future__ import annotations

import os

from oslo_log import log as logging
from oslo_utils import fileutils

import nova.conf
from nova.compute import power_state
from nova.compute import task_states
from nova.compute import utils as compute_utils
from nova import exception
from nova.i18n import _
from nova import utils
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import utils as libvirt_utils

from nova_driver import imagebackend
from nova_driver import precache_base
from vmthunder.agent import client as agent_client

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


class VMThunderLibvirtDriver(libvirt_driver.LibvirtDriver):

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self.image_backend = imagebackend.Backend(CONF.use_cow_images)

    # -- destroy ------------------------------------------------------------

    def _cleanup(self, context, instance, network_info, block_device_info=None,
                 destroy_vifs=True, cleanup_instance_dir=False,
                 cleanup_instance_disks=False, destroy_secrets=True):
        if cleanup_instance_disks:
            # Before Nova removes the instance directory (the record of the
            # disk lives there): if the agent is down this fails, and the
            # delete can be retried once it is back.
            imagebackend.delete_root_disk(instance)
        return super()._cleanup(
            context, instance, network_info,
            block_device_info=block_device_info, destroy_vifs=destroy_vifs,
            cleanup_instance_dir=cleanup_instance_dir,
            cleanup_instance_disks=cleanup_instance_disks,
            destroy_secrets=destroy_secrets)

    # -- snapshot -----------------------------------------------------------

    def snapshot(self, context, instance, image_id, update_task_state):
        if not imagebackend.has_root_disk(instance):
            return super().snapshot(context, instance, image_id,
                                    update_task_state)
        try:
            guest = self._host.get_guest(instance)
        except exception.InstanceNotFound:
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        snapshot = self._image_api.get(context, image_id)
        image_format = CONF.libvirt.snapshot_image_format or "raw"
        metadata = self._create_snapshot_metadata(
            instance.image_meta, instance, image_format, snapshot["name"])
        # The record the compute API made inherited the parent image's
        # properties, its vmthunder origin too: that origin is the parent's
        # export, not this image. Keep the others, drop it.
        origin_property = CONF.vmthunder.origin_property
        inherited = dict(snapshot.get("properties") or {})
        inherited.pop(origin_property, None)
        metadata["properties"] = dict(inherited, **metadata["properties"])
        root_disk = self.image_backend.by_name(instance, "disk")

        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        snapshot_name = snapshot["name"] or image_id
        paused = False
        fileutils.ensure_tree(CONF.libvirt.snapshots_directory)
        with utils.tempdir(dir=CONF.libvirt.snapshots_directory) as tmpdir:
            out_path = os.path.join(tmpdir, "snapshot")
            try:
                # A consistent point: QEMU drains and flushes the disk when
                # the guest pauses; the copy reads a second NBD connection.
                if guest.get_power_state(self._host) == power_state.RUNNING:
                    guest.pause()
                    paused = True
                LOG.info("Snapshot %s: copying the vmthunder disk (%s)",
                         snapshot_name, image_format, instance=instance)
                root_disk.snapshot_extract(out_path, image_format)
            finally:
                if paused:
                    guest.resume()
            update_task_state(task_state=task_states.IMAGE_UPLOADING,
                              expected_state=task_states.IMAGE_PENDING_UPLOAD)
            with libvirt_utils.file_open(out_path, "rb") as image_file:
                with compute_utils.disk_ops_semaphore:
                    self._image_api.update(context, image_id, metadata,
                                           image_file, purge_props=True)
        LOG.info("Snapshot image upload complete", instance=instance)

    # -- Nova's image cache through the swarm ([vmthunder] precache_base) ---

    def _try_fetch_image_cache(self, image, fetch_func, context, filename,
                               image_id, instance, size,
                               fallback_from_host=None):
        if precache_base.enabled() and fetch_func is libvirt_utils.fetch_image:
            fetch_func = precache_base.fetch_base
        return super()._try_fetch_image_cache(
            image, fetch_func, context, filename, image_id, instance, size,
            fallback_from_host=fallback_from_host)

    # -- precache -----------------------------------------------------------

    def cache_image(self, context, image_id):
        """Attach ``image_id`` on the agent and warm its cache (the whole
        image, or the chunks of its recorded boot trace); True when chunks
        were fetched, False when the host held them all already. With
        [vmthunder] precache_base: fill Nova's image cache (_base) with it
        through the agent (nova_driver/precache_base.py)."""
        if precache_base.enabled():
            return precache_base.cache_image(context, image_id)
        origin, _image = imagebackend.image_origin(context, image_id)
        fallback = CONF.vmthunder.fallback_to_download
        if origin is None:
            if fallback:
                return super().cache_image(context, image_id)
            raise exception.ImageUnacceptable(
                image_id=image_id,
                reason=imagebackend.no_origin_reason(image_id))
        client = imagebackend._agent()
        try:
            info = imagebackend.attach_image(client, image_id, origin)
        except agent_client.AgentUnavailable as exc:
            if fallback:
                LOG.warning("vmthunder: %s; precaching by download", exc)
                return super().cache_image(context, image_id)
            raise imagebackend._unavailable(exc)
        except agent_client.AgentError as exc:
            raise imagebackend._failed(
                _("cannot attach image %s") % image_id, exc)
        trace = self._boot_trace(image_id)
        try:
            progress = client.precache(info["name"], trace)
            timeout = CONF.vmthunder.precache_timeout
            if timeout > 0:
                progress = imagebackend.wait_precache(client, info["name"],
                                                      timeout)
        except agent_client.AgentError as exc:
            raise imagebackend._failed(
                _("cannot precache image %s") % image_id, exc)
        if progress.get("state") not in ("done", "running"):
            raise imagebackend.VMThunderError(reason=_(
                "precache of image %(id)s %(state)s: %(error)s") % {
                    "id": image_id, "state": progress.get("state"),
                    "error": progress.get("error")})
        LOG.info("Image %(id)s precached through vmthunder%(trace)s: "
                 "%(n)d chunk(s), %(bytes)d bytes fetched (%(peers)d from "
                 "peers)", {"id": image_id,
                            "trace": f" (boot trace {trace})" if trace else "",
                            "n": progress.get("chunks_total", 0),
                            "bytes": progress.get("bytes_fetched", 0),
                            "peers": progress.get("from_peers", 0)})
        return progress.get("chunks_total", 0) > 0

    @staticmethod
    def _boot_trace(image_id) -> str | None:
        directory = CONF.vmthunder.precache_trace_dir
        if not directory:
            return None
        for name in (f"{image_id}.trace.gz", f"{image_id}.trace"):
            path = os.path.abspath(os.path.join(directory, name))
            if os.path.isfile(path):
                return path
        return None

    # -- moves: refused -------------------------------------------------------

    @staticmethod
    def _refuse_move(instance, what):
        if imagebackend.has_root_disk(instance):
            raise exception.MigrationPreCheckError(reason=_(
                "%(what)s of instance %(uuid)s is not supported: its root "
                "disk is a vmthunder disk (a copy-on-write snapshot held by "
                "this host's vmthunder-agent) that cannot move to another "
                "host yet. Snapshot the instance and boot the snapshot "
                "elsewhere instead") % {"what": what, "uuid": instance.uuid})

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data,
                                      block_device_info=None):
        self._refuse_move(instance, _("Live migration"))
        return super().check_can_live_migrate_source(
            context, instance, dest_check_data,
            block_device_info=block_device_info)

    def migrate_disk_and_power_off(self, context, instance, dest,
                                   flavor, network_info,
                                   block_device_info=None,
                                   timeout=0, retry_interval=0):
        try:
            self._refuse_move(instance, _("Resize or cold migration"))
        except exception.MigrationPreCheckError as exc:
            # Before the guest is touched: the instance stays ACTIVE on
            # this host, with the reason as its fault.
            raise exception.InstanceFaultRollback(exc)
        return super().migrate_disk_and_power_off(
            context, instance, dest, flavor, network_info,
            block_device_info=block_device_info, timeout=timeout,
            retry_interval=retry_interval)
