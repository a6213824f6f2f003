"""A file-backed Cinder volume driver, exported by Cinder's own tgtadm target.

For storage nodes without LVM (no device-mapper: containers, sandboxes,
small labs, the machines vmthunder's tests run on), where none of the
drivers Cinder ships fits: LVM needs device-mapper, NFS needs mount, and
the test suite's fake driver exports nothing. Each volume is a sparse file
``<vmthunder_file_volumes_dir>/<volume name>``; Cinder's ``tgtadm`` target
helper (``target_helper = tgtadm``, ``volumes_dir``, a tgtd that reads
``/etc/tgt/conf.d/*.conf``) exports it as an iSCSI target with CHAP, like
the LVM driver exports a logical volume. See ``docs/cinder-file-driver.md``.

cinder.conf, in a backend section::

    [file-1]
    volume_driver = vmthunder.cinder.file_driver.FileVolumeDriver
    volume_backend_name = file-1
    vmthunder_file_volumes_dir = /var/lib/cinder/file-volumes
    target_helper = tgtadm
    target_ip_address = 192.0.2.10
    target_port = 3260
    volumes_dir = /var/lib/cinder/volumes

What it does: create, delete and extend volumes (sparse files, so a volume
costs only what was written); clone and create from a snapshot (copies);
snapshots (copies); images to volumes (Glance image fetched and converted
to raw straight into the volume's file, ``copy_image_to_volume``); exports
through the target helper (``create_export`` returns ``provider_location``
and ``provider_auth``, so attachments get the portal, IQN, LUN and CHAP
credentials); it reports ``multiattach`` in its stats, so a volume type with
``multiattach='<is> True'`` lands here and a volume can be attached by many
hosts at once (read-only ones, for vmthunder's image volumes).

Loaded by cinder-volume, which imports it under eventlet: only Cinder's own
libraries are used here, nothing of vmthunder's asyncio code.
"""

from __future__ import annotations

import os
import shutil

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import importutils
from oslo_utils import units

from cinder import exception
from cinder.image import image_utils
from cinder import interface
from cinder.volume import configuration
from cinder.volume import driver
from cinder.volume import volume_utils

LOG = logging.getLogger(__name__)

file_opts = [
    cfg.StrOpt('vmthunder_file_volumes_dir',
               default='$state_path/file-volumes',
               help='Directory holding the volumes of the file-backed '
                    'driver, one sparse file each.'),
]

CONF = cfg.CONF
CONF.register_opts(file_opts, group=configuration.SHARED_CONF_GROUP)


@interface.volumedriver
class FileVolumeDriver(driver.VolumeDriver):
    """Volumes as sparse files, exported through Cinder's target helper."""

    VERSION = '1.0.0'
    # Not a vendor driver: no third-party CI.
    CI_WIKI_NAME = 'vmthunder'
    SUPPORTED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(file_opts)
        self.backend_name = (
            self.configuration.safe_get('volume_backend_name') or
            'vmthunder-file')
        helper = self.configuration.safe_get('target_helper')
        target = self.target_mapping.get(helper)
        if target is None:
            raise exception.InvalidConfigurationValue(
                option='target_helper', value=helper)
        self.target_driver = importutils.import_object(
            target, configuration=self.configuration,
            executor=self._execute)
        self.protocol = self.target_driver.protocol

    # -- where volumes live --------------------------------------------

    @property
    def _dir(self) -> str:
        return self.configuration.vmthunder_file_volumes_dir

    def local_path(self, volume) -> str:
        return os.path.join(self._dir, volume['name'])

    def _snapshot_path(self, snapshot) -> str:
        return os.path.join(self._dir, snapshot['name'])

    def do_setup(self, context):
        os.makedirs(self._dir, exist_ok=True)

    def check_for_setup_error(self):
        if not os.access(self._dir, os.W_OK):
            raise exception.VolumeBackendAPIException(
                data=f'{self._dir} is not writable')

    # -- volumes -------------------------------------------------------

    def _create_file(self, path: str, size_gb: int) -> None:
        with open(path, 'xb') as f:
            f.truncate(size_gb * units.Gi)

    def create_volume(self, volume):
        self._create_file(self.local_path(volume), volume['size'])
        return {}

    def delete_volume(self, volume):
        try:
            os.unlink(self.local_path(volume))
        except FileNotFoundError:
            pass

    def extend_volume(self, volume, new_size):
        with open(self.local_path(volume), 'r+b') as f:
            f.truncate(new_size * units.Gi)

    def _copy(self, src: str, dst: str, size_gb: int) -> None:
        tmp = dst + '.part'
        shutil.copyfile(src, tmp)
        with open(tmp, 'r+b') as f:
            if size_gb * units.Gi > os.fstat(f.fileno()).st_size:
                f.truncate(size_gb * units.Gi)
            os.fsync(f.fileno())
        os.rename(tmp, dst)

    def create_cloned_volume(self, volume, src_vref):
        self._copy(self.local_path(src_vref), self.local_path(volume),
                   volume['size'])
        return {}

    def create_snapshot(self, snapshot):
        self._copy(self.local_path(snapshot.volume),
                   self._snapshot_path(snapshot), snapshot['volume_size'])

    def delete_snapshot(self, snapshot):
        try:
            os.unlink(self._snapshot_path(snapshot))
        except FileNotFoundError:
            pass

    def create_volume_from_snapshot(self, volume, snapshot):
        self._copy(self._snapshot_path(snapshot), self.local_path(volume),
                   volume['size'])
        return {}

    def copy_image_to_volume(self, context, volume, image_service,
                             image_id, disable_sparse=False):
        """The Glance image, converted to raw, into the volume's file."""
        image_utils.fetch_to_raw(
            context, image_service, image_id, self.local_path(volume),
            self.configuration.volume_dd_blocksize, size=volume['size'],
            disable_sparse=disable_sparse)

    def copy_volume_to_image(self, context, volume, image_service,
                             image_meta):
        volume_utils.upload_volume(context, image_service, image_meta,
                                   self.local_path(volume), volume)

    # -- exports (the target helper does the work) -----------------------

    def create_export(self, context, volume, connector):
        info = self.target_driver.create_export(context, volume,
                                                self.local_path(volume))
        return {'provider_location': info['location'],
                'provider_auth': info['auth']}

    def ensure_export(self, context, volume):
        self.target_driver.ensure_export(context, volume,
                                         self.local_path(volume))

    def remove_export(self, context, volume):
        self.target_driver.remove_export(context, volume)

    def initialize_connection(self, volume, connector, **kwargs):
        return self.target_driver.initialize_connection(volume, connector)

    def validate_connector(self, connector):
        return self.target_driver.validate_connector(connector)

    def terminate_connection(self, volume, connector, **kwargs):
        """True while other attachments share the export: the volume
        manager then keeps it (else it removes the target under the other
        hosts of a multiattach volume). As Cinder's LVM driver does."""
        def same_connector(attachment):
            return (attachment.connector and
                    self.target_driver.are_same_connector(
                        attachment.connector, connector))

        attachments = volume.volume_attachment
        if volume.multiattach and \
                sum(1 for a in attachments if same_connector(a)) > 1:
            return True
        self.target_driver.terminate_connection(volume, connector, **kwargs)
        return len(attachments) > 1

    # -- stats ---------------------------------------------------------

    def _update_volume_stats(self):
        st = os.statvfs(self._dir)
        total = st.f_blocks * st.f_frsize / units.Gi
        free = st.f_bavail * st.f_frsize / units.Gi
        self._stats = {
            'volume_backend_name': self.backend_name,
            'vendor_name': 'vmthunder',
            'driver_version': self.VERSION,
            'storage_protocol': self.protocol,
            'total_capacity_gb': round(total, 2),
            'free_capacity_gb': round(free, 2),
            'reserved_percentage':
                self.configuration.safe_get('reserved_percentage') or 0,
            'thin_provisioning_support': True,
            'thick_provisioning_support': False,
            'max_over_subscription_ratio':
                self.configuration.safe_get('max_over_subscription_ratio')
                or 20.0,
            'multiattach': True,
            'QoS_support': False,
        }
