"""vmthunder's Nova image backend and driver against the real nova package,
with Nova's own unit-test machinery.

- ``VMThunderImageTestCase`` reuses Nova's ``_ImageTestCase`` mixin from
  nova/tests/unit/virt/libvirt/test_imagebackend.py (its tests run on our
  Image: libvirt_info, SCSI units, QoS, fs info...; the ones that assume a
  local file are overridden, as Nova's RbdTestCase does), plus ours: the
  root disk's lifecycle through the agent's API, faults, the fallback.
- ``DriverTestCase``: the domain XML that LibvirtDriver._get_guest_xml
  produces with our backend (Nova's LibvirtFixture: fake libvirt) has the
  NBD disk, on a unix socket and on TCP; snapshot, cache_image, refused
  moves, cleanup, and loading the driver as nova-compute does.

The agent is :class:`FakeAgent`, a stand-in for the agent's API client
(vmthunder.agent.client.AgentClient) that answers as the agent does;
Glance is Nova's GlanceFixture. The real agent, libvirtd and QEMU are in
test_nova_e2e.py.

Importing nova.tests monkey-patches the process (eventlet): this module
runs under ``python -m unittest`` (or stestr) in a process of its own,
never under pytest (tests/nova/conftest.py keeps pytest out of it;
tests/functional/test_nova.py runs it).
"""

import copy
import os
from unittest import mock

import ddt
import fixtures
from lxml import etree
from oslo_utils.fixture import uuidsentinel as uuids
from oslo_utils import units

from nova.compute import power_state
from nova.compute import task_states
from nova import context as nova_context
from nova import exception
from nova import objects
from nova import test
from nova.tests import fixtures as nova_fixtures
from nova.tests.unit import fake_processutils
from nova.tests.unit.virt.libvirt import test_driver as nova_driver_tests
from nova.tests.unit.virt.libvirt import test_imagebackend as nova_ib_tests
from nova.virt import fake
from nova.virt.libvirt import blockinfo
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import imagebackend as nova_imagebackend

from nova_driver import cmd
from nova_driver import driver
from nova_driver import imagebackend
from vmthunder.agent import client as agent_client

CONF = imagebackend.CONF
UNIX_SOCKET = "/run/vmthunder/nbd.sock"
IMAGE_SIZE = 300 * units.Mi
ORIGIN = "export:debian-12"


class FakeAgent:
    """Answers like the agent's API (vmthunder/agent/api.py) through the
    AgentClient methods the driver calls; ``down`` makes every call fail
    like a missing socket."""

    def __init__(self, hypervisor=f"unix:{UNIX_SOCKET}"):
        self.hypervisor = hypervisor
        self.attached = {}      # image name -> info
        self.disks = {}         # VM name -> info
        self.last_run = {}      # image name -> chunks its precache fetches
        self.down = False
        self.calls = []
        self.held = set()       # images whose chunks are all cached
        self.fail_create = None

    def _call(self, name, *args):
        self.calls.append((name,) + args)
        if self.down:
            raise agent_client.AgentUnavailable(
                0, "cannot reach the vmthunder agent at /run/x.sock (no "
                   "such socket); is vmthunder-agent running?")

    def uri(self, vm):
        kind, _, rest = self.hypervisor.partition(":")
        if kind == "unix":
            return f"nbd+unix:///{vm}?socket={rest}"
        return f"nbd://{rest}/{vm}"

    # the API
    def status(self):
        self._call("status")
        return {"hypervisor_nbd": self.hypervisor,
                "images": copy.deepcopy(self.attached),
                "vms": copy.deepcopy(self.disks)}

    def images(self):
        self._call("images")
        return [dict(i) for i in self.attached.values()]

    def vms(self):
        self._call("vms")
        return [dict(v) for v in self.disks.values()]

    def attach_image(self, name, origin):
        self._call("attach_image", name, origin)
        image = self.attached.get(name)
        if image is not None and image["origin"] != origin:
            raise agent_client.AgentError(
                409, f"image {name!r} is already attached from "
                     f"{image['origin']}, not {origin}")
        for other in self.attached.values():
            if other["origin"] == origin and other["name"] != name:
                raise agent_client.AgentError(
                    409, f"origin {origin} is already attached as image "
                         f"{other['name']!r}; use that name")
        # Exactly this origin: image ids are random UUIDs, and one in 4096
        # starts with "bad" (a CI run drew bad0fbd4-...).
        if origin == "export:no-such-export":
            raise agent_client.AgentError(
                400, f"cannot attach image {name!r} from {origin}: no such "
                     "export")
        created = image is None
        image = self.attached.setdefault(name, {
            "name": name, "origin": origin, "state": "attached",
            "size": IMAGE_SIZE, "vms": []})
        return dict(image, created=created)

    def create_vm(self, name, image, size=None):
        self._call("create_vm", name, image, size)
        if self.fail_create:
            raise self.fail_create
        if name in self.disks:
            raise agent_client.AgentError(409, f"VM {name!r} exists "
                                               "already")
        if image not in self.attached:
            raise agent_client.AgentError(404, f"image {image!r} is not "
                                               "attached")
        self.disks[name] = {"name": name, "image": image, "state": "ready",
                          "nbd": self.uri(name),
                          "size": size or self.attached[image]["size"]}
        return dict(self.disks[name])

    def delete_vm(self, name):
        self._call("delete_vm", name)
        if name not in self.disks:
            raise agent_client.AgentError(404, f"no VM {name!r}")
        del self.disks[name]
        return {"name": name, "deleted": True}

    def precache(self, name, trace=None):
        self._call("precache", name, trace)
        if name not in self.attached:
            raise agent_client.AgentError(404, f"no image {name!r}")
        todo = 0 if name in self.held else 100
        self.held.add(name)
        self.last_run[name] = todo
        return {"image": name, "trace": trace, "state": "running",
                "chunks_total": todo, "chunks_done": 0, "started": True}

    def precache_progress(self, name):
        self._call("precache_progress", name)
        todo = self.last_run[name]
        return {"image": name, "state": "done", "chunks_total": todo,
                "chunks_done": todo, "bytes_fetched": todo * 8192,
                "from_peers": 0}


class _AgentMixin:
    """A FakeAgent behind imagebackend._agent(), Glance images with and
    without an origin (Nova's GlanceFixture)."""

    def use_agent(self, **kwargs):
        self.agent = FakeAgent(**kwargs)
        self.useFixture(fixtures.MockPatch(
            "nova_driver.imagebackend._agent", return_value=self.agent))
        return self.agent

    def make_images(self, glance):
        ctx = nova_context.get_admin_context()
        self.image_with_origin = glance.create(ctx, {
            "name": "debian-12", "disk_format": "raw",
            "container_format": "bare", "status": "active",
            "properties": {"vmthunder_origin": ORIGIN}})["id"]
        self.image_without_origin = glance.create(ctx, {
            "name": "plain", "disk_format": "raw",
            "container_format": "bare", "status": "active",
            "properties": {}})["id"]
        return ctx


@ddt.ddt
class VMThunderImageTestCase(_AgentMixin, nova_ib_tests._ImageTestCase,
                             test.NoDBTestCase):
    """Nova's image backend test patterns on vmthunder's Image."""

    SIZE = 1 * units.Gi

    def setUp(self):
        self.image_class = imagebackend.VMThunderImage
        super().setUp()
        self.use_agent()
        self.glance = self.useFixture(nova_fixtures.GlanceFixture(self))
        self.ctx = self.make_images(self.glance)
        # The mixin's libvirt_info tests build the XML of a disk that
        # exists: the agent has the VM.
        self.agent.attached["img"] = {"name": "img", "origin": "export:img",
                                    "state": "attached", "size": IMAGE_SIZE}
        self.agent.disks[self.INSTANCE.uuid] = {
            "name": self.INSTANCE.uuid, "image": "img", "state": "ready",
            "nbd": self.agent.uri(self.INSTANCE.uuid), "size": self.SIZE}
        self.fetch = mock.Mock(name="fetch_func")

    def new_instance(self):
        return objects.Instance(id=2, uuid=uuids.new_instance)

    def cache(self, image, image_id, size=None):
        image.cache(self.fetch, "cache-fname", size=size,
                    context=self.ctx, image_id=image_id,
                    trusted_certs=None)

    # -- the mixin's tests that assume a local file -------------------------

    def test_prealloc_image(self):
        # As Nova's RbdTestCase: a network disk is never fallocate'd.
        CONF.set_override("preallocate_images", "space")
        fake_processutils.fake_execute_clear_log()
        fake_processutils.stub_out_processutils_execute(self)
        instance = self.new_instance()
        image = self.image_class(instance, self.NAME)
        self.cache(image, self.image_with_origin, self.SIZE)
        self.cache(image, self.image_with_origin, self.SIZE)
        self.assertEqual([], fake_processutils.fake_execute_get_log())

    def test_prealloc_image_without_write_access(self):
        self.test_prealloc_image()

    def test_get_disk_size(self):
        # As Nova's RbdTestCase: the size is the disk's, whatever the name.
        image = self.image_class(self.INSTANCE, self.NAME)
        self.assertEqual(self.SIZE, image.get_disk_size(image.path))
        self.assertEqual(self.SIZE, image.get_disk_size("/no/such/file"))

    def test_parent_compatible(self):
        import inspect
        for name in ("libvirt_info", "cache", "create_image",
                     "resize_image", "snapshot_extract", "get_model"):
            self.assertEqual(
                inspect.getfullargspec(getattr(nova_imagebackend.Image,
                                               name)),
                inspect.getfullargspec(getattr(self.image_class, name)),
                name)

    # -- the root disk's lifecycle ------------------------------------------

    def test_cache_creates_the_vm_disk_on_the_agent(self):
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        self.assertFalse(image.exists())
        self.cache(image, self.image_with_origin, self.SIZE)
        self.assertIn(("attach_image", self.image_with_origin, ORIGIN),
                      self.agent.calls)
        self.assertIn(("create_vm", instance.uuid, self.image_with_origin,
                       self.SIZE), self.agent.calls)
        self.fetch.assert_not_called()           # nothing downloaded
        self.assertTrue(image.exists())
        self.assertEqual(self.SIZE, image.get_disk_size(image.path))
        record = imagebackend.read_record(instance)
        self.assertEqual("ready", record["state"])
        self.assertEqual(self.agent.uri(instance.uuid), record["nbd"])
        # No file in the instance directory but the record.
        self.assertEqual([imagebackend.RECORD_NAME], os.listdir(
            os.path.dirname(imagebackend.record_path(instance))))

    def test_cache_again_keeps_the_disk(self):
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        self.cache(image, self.image_with_origin, self.SIZE)
        self.agent.calls.clear()
        # nova-compute restarted, hard reboot: a new Image object.
        self.cache(self.image_class(instance, "disk"),
                   self.image_with_origin, self.SIZE)
        self.assertEqual([], [c for c in self.agent.calls
                              if c[0] in ("create_vm", "delete_vm")])

    def test_cache_flavor_size_zero_is_the_image_size(self):
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        self.cache(image, self.image_with_origin, None)
        self.assertIn(("create_vm", instance.uuid, self.image_with_origin,
                       None), self.agent.calls)
        self.assertEqual(IMAGE_SIZE, image.get_disk_size(image.path))

    def test_create_image_too_small(self):
        # Nova's pattern (Flat, Qcow2, Rbd): the flavor's root disk is
        # smaller than the image.
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        self.assertRaises(exception.FlavorDiskSmallerThanImage,
                          image.create_image, self.fetch, "base",
                          IMAGE_SIZE - 1, context=self.ctx,
                          image_id=self.image_with_origin)
        self.assertEqual({}, {k: v for k, v in self.agent.disks.items()
                              if k == instance.uuid})
        self.assertIsNone(imagebackend.read_record(instance))

    def test_origin_template(self):
        self.flags(origin_template="export:{image_id}", group="vmthunder")
        instance = self.new_instance()
        self.cache(self.image_class(instance, "disk"),
                   self.image_without_origin, self.SIZE)
        self.assertIn(("attach_image", self.image_without_origin,
                       f"export:{self.image_without_origin}"),
                      self.agent.calls)

    def test_origin_attached_under_another_name_is_used(self):
        self.agent.attached["debian"] = {"name": "debian", "origin": ORIGIN,
                                       "state": "attached",
                                       "size": IMAGE_SIZE}
        instance = self.new_instance()
        self.cache(self.image_class(instance, "disk"),
                   self.image_with_origin, self.SIZE)
        self.assertEqual("debian", self.agent.disks[instance.uuid]["image"])

    # -- faults: nothing is left behind ---------------------------------------

    def assert_nothing_made(self, instance):
        self.assertNotIn(instance.uuid, self.agent.disks)
        self.assertIsNone(imagebackend.read_record(instance))
        self.assertFalse(os.path.exists(imagebackend.record_path(instance)))

    def test_image_without_origin_is_refused(self):
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        exc = self.assertRaises(exception.ImageUnacceptable, self.cache,
                                image, self.image_without_origin, self.SIZE)
        self.assertIn("has no vmthunder origin", str(exc))
        self.assertIn("vmthunder_origin", str(exc))
        self.assertIn("fallback_to_download", str(exc))
        self.assert_nothing_made(instance)
        self.fetch.assert_not_called()

    def test_unknown_image(self):
        instance = self.new_instance()
        self.assertRaises(exception.ImageNotFound, self.cache,
                          self.image_class(instance, "disk"), uuids.nothing,
                          self.SIZE)
        self.assert_nothing_made(instance)

    def test_agent_down(self):
        self.agent.down = True
        instance = self.new_instance()
        exc = self.assertRaises(imagebackend.AgentUnavailable, self.cache,
                                self.image_class(instance, "disk"),
                                self.image_with_origin, self.SIZE)
        self.assertIn("Start vmthunder-agent", str(exc))
        self.agent.down = False
        self.assert_nothing_made(instance)

    def test_origin_refused_by_the_agent(self):
        ctx = self.ctx
        bad = self.glance.create(ctx, {
            "name": "bad", "status": "active", "disk_format": "raw",
            "properties": {"vmthunder_origin": "export:no-such-export"}})["id"]
        instance = self.new_instance()
        exc = self.assertRaises(exception.ImageUnacceptable, self.cache,
                                self.image_class(instance, "disk"), bad,
                                self.SIZE)
        self.assertIn("no such export", str(exc))
        self.assert_nothing_made(instance)

    def test_duplicate_uuid_is_refused_and_kept(self):
        instance = self.new_instance()
        self.agent.disks[instance.uuid] = {"name": instance.uuid,
                                         "image": "img", "state": "ready",
                                         "nbd": "x", "size": 1}
        exc = self.assertRaises(imagebackend.DiskExists, self.cache,
                                self.image_class(instance, "disk"),
                                self.image_with_origin, self.SIZE)
        self.assertIn("vmthunder vm delete", str(exc))
        self.assertEqual("img", self.agent.disks[instance.uuid]["image"])
        self.assertIsNone(imagebackend.read_record(instance))
        # ... and a cleanup after the failed spawn leaves it too.
        self.assertFalse(imagebackend.delete_root_disk(instance))
        self.assertIn(instance.uuid, self.agent.disks)

    def test_create_failure_leaves_nothing(self):
        self.agent.fail_create = agent_client.AgentError(
            500, "cannot create the snapshot of VM: disk full")
        instance = self.new_instance()
        exc = self.assertRaises(imagebackend.VMThunderError, self.cache,
                                self.image_class(instance, "disk"),
                                self.image_with_origin, self.SIZE)
        self.assertIn("disk full", str(exc))
        self.assert_nothing_made(instance)

    def test_agent_answers_lost_then_disk_undone(self):
        self.agent.fail_create = agent_client.AgentError(
            0, "did not answer POST /vms within 120 s")
        instance = self.new_instance()
        self.assertRaises(imagebackend.VMThunderError, self.cache,
                          self.image_class(instance, "disk"),
                          self.image_with_origin, self.SIZE)
        self.assertIn(("delete_vm", instance.uuid), self.agent.calls)
        self.assert_nothing_made(instance)

    def test_wrong_transport_is_refused_before_anything(self):
        self.flags(nbd_transport="tcp", group="vmthunder")
        instance = self.new_instance()
        exc = self.assertRaises(imagebackend.VMThunderError, self.cache,
                                self.image_class(instance, "disk"),
                                self.image_with_origin, self.SIZE)
        self.assertIn("nbd_transport is tcp", str(exc))
        self.assertNotIn("attach_image", [c[0] for c in self.agent.calls])
        self.assert_nothing_made(instance)

    # -- the fallback to Nova's download ------------------------------------

    def _fallback(self, image_id, down=False):
        self.flags(fallback_to_download=True, group="vmthunder")
        self.agent.down = down
        instance = self.new_instance()
        image = self.image_class(instance, "disk")
        with mock.patch.object(nova_imagebackend.Backend,
                               "by_name") as by_name:
            self.cache(image, image_id, self.SIZE)
        by_name.assert_called_once_with(instance, "disk",
                                        disk_info_mapping=None)
        by_name.return_value.cache.assert_called_once_with(
            self.fetch, "cache-fname", self.SIZE, False, context=self.ctx,
            image_id=image_id, trusted_certs=None)
        self.agent.down = False
        self.assert_nothing_made(instance)

    def test_fallback_download_without_origin(self):
        self._fallback(self.image_without_origin)

    def test_fallback_download_agent_down(self):
        self._fallback(self.image_with_origin, down=True)

    # -- the other abstract methods ------------------------------------------

    def test_resize_image(self):
        image = self.image_class(self.INSTANCE, "disk")
        image.resize_image(self.SIZE)            # no growth: nothing to do
        self.assertRaises(exception.ResizeError, image.resize_image,
                          self.SIZE + 1)

    @mock.patch("nova.virt.images.convert_image")
    def test_snapshot_extract(self, convert):
        image = self.image_class(self.INSTANCE, "disk")
        image.snapshot_extract("/tmp/out", "qcow2")
        convert.assert_called_once_with(self.agent.uri(self.INSTANCE.uuid),
                                        "/tmp/out", "raw", "qcow2")

    def test_get_model(self):
        model = self.image_class(self.INSTANCE, "disk").get_model(
            nova_ib_tests.FakeConn())
        self.assertIsInstance(model, imagebackend.NBDImage)
        self.assertEqual("raw", model.format)
        self.assertEqual(self.agent.uri(self.INSTANCE.uuid), model.uri)

    # -- the disk XML ---------------------------------------------------------

    def _disk_xml(self, transport_uri):
        self.agent.disks[self.INSTANCE.uuid]["nbd"] = transport_uri
        image = self.image_class(self.INSTANCE, "disk", disk_info_mapping={
            "bus": "virtio", "dev": "vda", "type": "disk"})
        disk = image.libvirt_info(cache_mode="none", extra_specs={},
                                  boot_order="1")
        self.assertIsInstance(disk, vconfig.LibvirtConfigGuestDisk)
        return etree.tostring(disk.format_dom(), encoding="unicode")

    def test_libvirt_info_unix_socket(self):
        uuid = self.INSTANCE.uuid
        xml = self._disk_xml(f"nbd+unix:///{uuid}?socket={UNIX_SOCKET}")
        self.assertXmlEqual(f"""
            <disk type="network" device="disk">
              <driver name="qemu" type="raw" cache="none"/>
              <source protocol="nbd" name="{uuid}">
                <host transport="unix" socket="{UNIX_SOCKET}"/>
              </source>
              <target bus="virtio" dev="vda"/>
              <boot order="1"/>
            </disk>""", xml)

    def test_libvirt_info_tcp(self):
        uuid = self.INSTANCE.uuid
        xml = self._disk_xml(f"nbd://127.0.0.1:10809/{uuid}")
        self.assertXmlEqual(f"""
            <disk type="network" device="disk">
              <driver name="qemu" type="raw" cache="none"/>
              <source protocol="nbd" name="{uuid}">
                <host name="127.0.0.1" port="10809"/>
              </source>
              <target bus="virtio" dev="vda"/>
              <boot order="1"/>
            </disk>""", xml)

    def test_nbd_disk_parses_back(self):
        disk = imagebackend.NbdGuestDisk()
        disk.parse_str(self._disk_xml(
            f"nbd+unix:///{self.INSTANCE.uuid}?socket={UNIX_SOCKET}"))
        self.assertEqual(UNIX_SOCKET, disk.source_socket)
        self.assertEqual("nbd", disk.source_protocol)

    def test_libvirt_info_agent_down_uses_the_record(self):
        instance = self.new_instance()
        image = self.image_class(instance, "disk", disk_info_mapping={
            "bus": "virtio", "dev": "vda", "type": "disk"})
        self.cache(image, self.image_with_origin, self.SIZE)
        self.agent.down = True
        disk = image.libvirt_info(cache_mode="none", extra_specs={})
        self.assertEqual(instance.uuid, disk.source_name)
        self.assertEqual(UNIX_SOCKET, disk.source_socket)


class BackendTestCase(test.NoDBTestCase):
    """Which class each disk of an instance gets."""

    def setUp(self):
        super().setUp()
        self.flags(instances_path=self.useFixture(fixtures.TempDir()).path)
        self.instance = objects.Instance(id=1, uuid=uuids.instance,
                                         ephemeral_key_uuid=None)
        self.backend = imagebackend.Backend(True)

    def test_root_disk_is_vmthunder(self):
        self.assertIsInstance(self.backend.by_name(self.instance, "disk"),
                              imagebackend.VMThunderImage)
        self.assertIsInstance(
            self.backend.by_name(self.instance, "disk", "default"),
            imagebackend.VMThunderImage)

    def test_other_disks_are_novas(self):
        for name in ("disk.local", "disk.eph0", "disk.swap", "disk.config",
                     "disk.rescue"):
            self.assertIsInstance(self.backend.by_name(self.instance, name),
                                  nova_imagebackend.Qcow2, name)
        self.assertIsInstance(
            self.backend.by_name(self.instance, "disk", "raw"),
            nova_imagebackend.Flat)

    def test_downloaded_root_disk_stays_novas(self):
        path = os.path.join(CONF.instances_path, self.instance.uuid)
        os.makedirs(path)
        open(os.path.join(path, "disk"), "w").close()
        self.assertIsInstance(self.backend.by_name(self.instance, "disk"),
                              nova_imagebackend.Qcow2)

    def test_by_name_has_no_side_effects(self):
        self.backend.by_name(self.instance, "disk")
        self.assertEqual([], os.listdir(CONF.instances_path))

    def test_precache_base_root_disk_is_novas_unless_vmthunder_made(self):
        """[vmthunder] precache_base: a new root disk is Nova's qcow2 (its
        base filled through the agent); one the agent made stays so."""
        self.flags(precache_base=True, group="vmthunder")
        self.assertIsInstance(self.backend.by_name(self.instance, "disk"),
                              nova_imagebackend.Qcow2)
        imagebackend.write_record(self.instance, state="ready",
                                  image="img", size=1)
        self.assertIsInstance(self.backend.by_name(self.instance, "disk"),
                              imagebackend.VMThunderImage)


class DriverTestCase(_AgentMixin, test.NoDBTestCase):
    """The driver with Nova's fake libvirt (LibvirtFixture), as Nova's own
    test_driver.py builds it."""

    REQUIRES_LOCKING = True

    def setUp(self):
        super().setUp()
        self.context = nova_context.get_admin_context()
        temp_dir = self.useFixture(fixtures.TempDir()).path
        self.flags(instances_path=temp_dir)
        self.flags(snapshots_directory=temp_dir, group="libvirt")
        self.useFixture(nova_fixtures.LibvirtFixture())
        self.useFixture(nova_fixtures.CGroupsFixture())
        self.stub_out("nova.objects.InstanceList.get_by_host",
                      lambda *a, **k: objects.InstanceList(objects=[]))
        self.glance = self.useFixture(nova_fixtures.GlanceFixture(self))
        self.make_images(self.glance)
        self.drvr = driver.VMThunderLibvirtDriver(fake.FakeVirtAPI(), False)
        values = nova_driver_tests._create_test_instance(
            image_ref=self.image_with_origin)
        self.instance = objects.Instance(**values)
        self.instance.info_cache = objects.InstanceInfoCache(
            network_info=nova_driver_tests._fake_network_info(self))

    def spawn_disk(self, **agent):
        """The root disk made as spawn makes it (_create_image)."""
        self.use_agent(**agent)
        self.image_meta = objects.ImageMeta.from_dict({"disk_format": "raw"})
        self.disk_info = blockinfo.get_disk_info(
            CONF.libvirt.virt_type, self.instance, self.image_meta)
        root = self.drvr.image_backend.by_name(
            self.instance, "disk",
            disk_info_mapping=self.disk_info["mapping"]["disk"])
        root.cache(mock.Mock(), "fname",
                   size=self.instance.flavor.root_gb * units.Gi,
                   context=self.context, image_id=self.image_with_origin)
        return root

    def guest_xml(self):
        xml = self.drvr._get_guest_xml(
            self.context, self.instance,
            nova_driver_tests._fake_network_info(self), self.disk_info,
            self.image_meta)
        return etree.fromstring(xml)

    def root_disk(self, tree):
        disks = tree.findall("./devices/disk")
        roots = [d for d in disks if d.find("target").get("dev") == "vda"]
        self.assertEqual(1, len(roots), etree.tostring(tree))
        return roots[0], disks

    def test_image_backend_is_ours(self):
        self.assertIsInstance(self.drvr.image_backend, imagebackend.Backend)

    def test_guest_xml_nbd_unix_socket(self):
        self.spawn_disk()
        root, disks = self.root_disk(self.guest_xml())
        self.assertEqual("network", root.get("type"))
        source = root.find("source")
        self.assertEqual("nbd", source.get("protocol"))
        self.assertEqual(self.instance.uuid, source.get("name"))
        host = source.find("host")
        self.assertEqual({"transport": "unix", "socket": UNIX_SOCKET},
                         dict(host.attrib))
        self.assertEqual("raw", root.find("driver").get("type"))
        # The flavor's ephemeral disk stays Nova's file disk.
        local = [d for d in disks if d is not root and
                 d.get("device") == "disk"]
        self.assertEqual(["file"], [d.get("type") for d in local])

    def test_guest_xml_nbd_tcp(self):
        self.flags(nbd_transport="tcp", group="vmthunder")
        self.spawn_disk(hypervisor="tcp:127.0.0.1:10809")
        root, _disks = self.root_disk(self.guest_xml())
        host = root.find("source/host")
        self.assertEqual({"name": "127.0.0.1", "port": "10809"},
                         dict(host.attrib))
        self.assertEqual(self.instance.uuid, root.find("source").get("name"))

    def test_flavor_root_disk_size(self):
        self.spawn_disk()
        self.assertEqual(10 * units.Gi,
                         self.agent.disks[self.instance.uuid]["size"])

    def test_cleanup_deletes_only_the_vm_disk(self):
        self.spawn_disk()
        self.agent.disks["other"] = {"name": "other", "image": "x"}
        with mock.patch.object(self.drvr, "_undefine_domain"), \
                mock.patch.object(objects.Instance, "save"):
            self.drvr.cleanup(self.context, self.instance, [],
                              destroy_disks=True)
        self.assertNotIn(self.instance.uuid, self.agent.disks)
        self.assertIn("other", self.agent.disks)
        self.assertIn(self.image_with_origin, self.agent.attached)

    def test_cleanup_keeping_disks_keeps_the_vm_disk(self):
        self.spawn_disk()
        with mock.patch.object(self.drvr, "_undefine_domain"):
            self.drvr.cleanup(self.context, self.instance, [],
                              destroy_disks=False)
        self.assertIn(self.instance.uuid, self.agent.disks)

    def test_cleanup_agent_down_keeps_everything_for_a_retry(self):
        self.spawn_disk()
        self.agent.down = True
        with mock.patch.object(self.drvr, "_undefine_domain") as undefine:
            self.assertRaises(imagebackend.AgentUnavailable,
                              self.drvr.cleanup, self.context,
                              self.instance, [], destroy_disks=True)
        undefine.assert_not_called()
        self.assertTrue(imagebackend.has_root_disk(self.instance))

    def test_snapshot_drops_the_origin_property(self):
        self.spawn_disk()
        snap = self.glance.create(self.context, {
            "name": "snap1", "status": "queued",
            "properties": {"vmthunder_origin": ORIGIN,
                           "image_type": "snapshot",
                           "instance_uuid": self.instance.uuid}})
        guest = mock.Mock()
        guest.get_power_state.return_value = power_state.RUNNING
        states = []

        def convert(src, dst, in_fmt, out_fmt):
            self.assertEqual(self.agent.uri(self.instance.uuid), src)
            self.assertEqual(("raw", "raw"), (in_fmt, out_fmt))
            guest.pause.assert_called_once_with()
            guest.resume.assert_not_called()
            with open(dst, "wb") as f:
                f.write(b"disk")

        with mock.patch.object(self.drvr._host, "get_guest",
                               return_value=guest), \
                mock.patch("nova.virt.images.convert_image",
                           side_effect=convert), \
                mock.patch.object(self.glance, "update",
                                  wraps=self.glance.update) as update:
            self.drvr.snapshot(self.context, self.instance, snap["id"],
                               lambda **kw: states.append(kw))
        guest.resume.assert_called_once_with()
        self.assertEqual([task_states.IMAGE_PENDING_UPLOAD,
                          task_states.IMAGE_UPLOADING],
                         [s["task_state"] for s in states])
        props = self.glance.show(self.context, snap["id"])["properties"]
        self.assertNotIn("vmthunder_origin", props)
        self.assertEqual("snapshot", props["image_type"])
        self.assertEqual("snapshot", props["image_location"])
        self.assertTrue(update.call_args.kwargs.get("purge_props"))

    def test_cache_image_attaches_and_precaches(self):
        self.use_agent()
        self.assertTrue(self.drvr.cache_image(self.context,
                                              self.image_with_origin))
        self.assertIn(("precache", self.image_with_origin, None),
                      self.agent.calls)
        # The host holds it all now.
        self.assertFalse(self.drvr.cache_image(self.context,
                                               self.image_with_origin))

    def test_cache_image_with_boot_trace(self):
        self.use_agent()
        trace_dir = self.useFixture(fixtures.TempDir()).path
        trace = os.path.join(trace_dir,
                             f"{self.image_with_origin}.trace.gz")
        open(trace, "wb").close()
        self.flags(precache_trace_dir=trace_dir, group="vmthunder")
        self.drvr.cache_image(self.context, self.image_with_origin)
        self.assertIn(("precache", self.image_with_origin, trace),
                      self.agent.calls)

    def test_cache_image_without_origin(self):
        self.use_agent()
        self.assertRaises(exception.ImageUnacceptable, self.drvr.cache_image,
                          self.context, self.image_without_origin)
        self.assertEqual({}, self.agent.attached)

    def test_cache_image_fallback_downloads(self):
        self.use_agent()
        self.flags(fallback_to_download=True, group="vmthunder")
        with mock.patch("nova.virt.images.fetch_to_raw") as fetch:
            self.assertTrue(self.drvr.cache_image(self.context,
                                                  self.image_without_origin))
        fetch.assert_called_once()

    def test_precache_base_fetches_bases_through_the_agent(self):
        """[vmthunder] precache_base: Nova's base fetch (fetch_image) is
        the agent's (precache_base.fetch_base), spawn and cache_image
        alike; other fetches stay Nova's. (The copy itself, against a
        real agent: test_nova_e2e.py.)"""
        from nova.virt.libvirt import utils as libvirt_utils
        from nova_driver import precache_base
        self.flags(precache_base=True, group="vmthunder")
        image = mock.Mock()
        with mock.patch.object(libvirt_driver.LibvirtDriver,
                               "_try_fetch_image_cache") as parent:
            self.drvr._try_fetch_image_cache(
                image, libvirt_utils.fetch_image, self.context, "f", "id",
                self.instance, None)
            self.drvr._try_fetch_image_cache(
                image, libvirt_utils.fetch_raw_image, self.context, "k",
                "kid", self.instance, None)
        self.assertIs(precache_base.fetch_base, parent.call_args_list[0][0][1])
        self.assertIs(libvirt_utils.fetch_raw_image,
                      parent.call_args_list[1][0][1])
        with mock.patch.object(precache_base, "fetch_base") as fetch, \
                mock.patch("nova.privsep.path.utime") as utime:
            fetch.side_effect = lambda ctx, path, image_id: open(
                path, "w").close()
            self.assertTrue(self.drvr.cache_image(self.context,
                                                  self.image_with_origin))
            utime.assert_not_called()
            self.assertFalse(self.drvr.cache_image(self.context,
                                                   self.image_with_origin))
        path = precache_base.base_path(self.image_with_origin)
        utime.assert_called_once_with(path)
        fetch.assert_called_once_with(self.context, path,
                                      self.image_with_origin)
        self.assertTrue(os.path.exists(path))

    def test_moves_are_refused_early(self):
        self.spawn_disk()
        with mock.patch.object(self.drvr, "power_off") as power_off:
            exc = self.assertRaises(
                exception.InstanceFaultRollback,
                self.drvr.migrate_disk_and_power_off, self.context,
                self.instance, "other-host", self.instance.flavor, [])
        power_off.assert_not_called()
        self.assertIsInstance(exc.inner_exception,
                              exception.MigrationPreCheckError)
        self.assertIn("vmthunder disk", str(exc.inner_exception))
        self.assertRaises(exception.MigrationPreCheckError,
                          self.drvr.check_can_live_migrate_source,
                          self.context, self.instance, None)
        self.assertIn(self.instance.uuid, self.agent.disks)

    def test_moves_of_other_instances_are_novas(self):
        self.use_agent()
        sentinel = mock.sentinel.result
        with mock.patch("nova.virt.libvirt.driver.LibvirtDriver."
                        "check_can_live_migrate_source",
                        return_value=sentinel):
            self.assertIs(sentinel, self.drvr.check_can_live_migrate_source(
                self.context, self.instance, None))

    def test_loaded_as_nova_compute_loads_it(self):
        from nova.virt import driver as virt_driver
        cmd.register()
        loaded = virt_driver.load_compute_driver(
            fake.FakeVirtAPI(), "vmthunder.VMThunderLibvirtDriver")
        self.assertIsInstance(loaded, driver.VMThunderLibvirtDriver)
        # What cmd.py is for: a plain module path is not loadable.
        with mock.patch("sys.exit", side_effect=SystemExit) as exit_:
            self.assertRaises(SystemExit, virt_driver.load_compute_driver,
                              fake.FakeVirtAPI(),
                              "nova_driver.driver.VMThunderLibvirtDriver")
        exit_.assert_called_once_with(1)
