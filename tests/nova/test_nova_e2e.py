"""End to end: vmthunder's Nova driver with real parts.

- the origin: the whole-disk test guest (MBR + SYSLINUX, boots to
  VMTHUNDER-BOOT-OK on ttyS0) exported by `vmthunder export` on a tgtd of
  this module's own, twice (``nova-boot`` and ``nova-warm``);
- a real vmthunder-agent process (the project's .venv) serving VM disks on
  a unix socket;
- a real libvirtd on qemu:///system (QEMU/TCG;
  tests/functional/libvirt_fixtures.py);
- the driver constructed as nova-compute constructs it: nova's global
  CONF parsed with no files (``CONF([])``) and set as a nova.conf would,
  ``objects.register_all()``, ``init_host()``.

Stand-ins, all named here:

- Glance is :class:`FakeImageService`, a small in-process image service
  put behind Nova's own glance.API (at the seam Nova's GlanceFixture
  uses), that keeps image records and uploaded data in files;
- mocked because they need Nova's database or services:
  ``Instance.save`` (no database), ``Host._init_events`` (libvirt's event
  thread keeps the process from exiting),
  ``LibvirtDriver._build_device_metadata`` and
  ``_register_undefined_instance_details`` (they read block device
  mappings and image properties from the database);
- Nova's privileged helpers (nova.privsep, used by the download
  fallback) run in the test process, which is root, rather than through
  ``sudo privsep-helper``;
- the compute manager: where it would call ``destroy()`` after a failed
  build, the tests do.

Run in .venv-nova (``.venv-nova/bin/python -m pytest tests/nova``), as
tests/functional/test_nova.py does. Needs root, tgtd, libvirtd, QEMU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid as uuid_mod
from unittest import mock

import pytest

from tests.functional import test_export
from tests.functional.conftest import REPO, build_guest_disk, need
from tests.functional.libvirt_fixtures import libvirtd  # noqa: F401

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="tgtd, libvirtd and QEMU need root"),
]

MAIN_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
NOVA_COMPUTE = os.path.join(os.path.dirname(sys.executable),
                            "vmthunder-nova-compute")
GiB = 1024 ** 3
BOOT_TIMEOUT = 120
READY = "vmthunder-agent: ready"


# -- the origin and the agent -------------------------------------------------

class Origin(test_export.Origin):
    """test_export's tgtd and `vmthunder` runner, with the project's
    .venv (where the agent and the exporter run in production too)."""

    def vmt(self, *args, check_rc=None, conf=None):
        proc = subprocess.run(
            [MAIN_PYTHON, "-m", "vmthunder.cli", "--config-file",
             str(conf or self.conf), *map(str, args)],
            capture_output=True, text=True, cwd=REPO, timeout=300)
        if check_rc is not None:
            assert proc.returncode == check_rc, (
                f"vmthunder {' '.join(map(str, args))}: exit "
                f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


class Agent:
    """A vmthunder-agent process on one work directory (restartable)."""

    def __init__(self, workdir: str, origin: Origin):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.api_socket = os.path.join(workdir, "api.sock")
        self.nbd_socket = os.path.join(workdir, "nbd.sock")
        self.cache_dir = os.path.join(workdir, "cache")
        self.conf = os.path.join(workdir, "agent.conf")
        with open(self.conf, "w") as f:
            # export:NAME resolves with the origin's [export] settings.
            f.write("[cache]\nsync_interval = 0\n"
                    "[export]\n"
                    f"export_dir = {origin.export_dir}\n"
                    f"portal = {origin.portal}\n"
                    f"iqn_prefix = {test_export.PREFIX}\n")
        self.proc = None
        self.log = os.path.join(workdir, "agent.log")

    def start(self, hypervisor_listen: str | None = None,
              timeout: float = 60) -> None:
        """Start it; VM disks on ``hypervisor_listen`` (default: the unix
        socket ``nbd_socket``)."""
        argv = [MAIN_PYTHON, "-m", "vmthunder.agent", "--config-file",
                self.conf, "--state-dir", os.path.join(self.workdir, "state"),
                "--api-socket", self.api_socket,
                "--hypervisor-listen",
                hypervisor_listen or f"unix:{self.nbd_socket}",
                "--cache-dir", self.cache_dir]
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL,
                                         text=True, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if line.startswith(READY):
                return
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vmthunder-agent did not start:\n"
                                   f"{open(self.log).read()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdout.close()

    @property
    def client(self):
        from vmthunder.agent.client import AgentClient
        return AgentClient(self.api_socket, timeout=60)

    def status(self) -> dict:
        return self.client.status()


# -- Glance, in process -------------------------------------------------------

class FakeImageService:
    """A stand-in for Glance behind nova.image.glance.API (show, download,
    create, update with purge_props, delete): records in memory, image
    data in files."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        os.makedirs(data_dir, exist_ok=True)
        self.images = {}

    def add(self, name, properties, data_path=None, **fields) -> str:
        image_id = str(uuid_mod.uuid4())
        size = os.path.getsize(data_path) if data_path else 0
        self.images[image_id] = dict(
            id=image_id, name=name, status="active", disk_format="raw",
            container_format="bare", size=size, min_disk=0, min_ram=0,
            properties=dict(properties), **fields)
        if data_path:
            os.symlink(data_path, self.path(image_id))
        return image_id

    def path(self, image_id) -> str:
        return os.path.join(self.data_dir, image_id)

    def show(self, context, image_id, include_locations=False,
             show_deleted=True):
        from nova import exception
        if image_id not in self.images:
            raise exception.ImageNotFound(image_id=image_id)
        image = copy.deepcopy(self.images[image_id])
        if include_locations:
            image["locations"] = []
        return image

    def download(self, context, image_id, data=None, dst_path=None,
                 trusted_certs=None):
        self.show(context, image_id)
        with open(self.path(image_id), "rb") as src:
            if dst_path:
                with open(dst_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                shutil.copyfileobj(src, data, 1 << 20)

    def create(self, context, metadata, data=None):
        image_id = metadata.get("id") or str(uuid_mod.uuid4())
        self.images[image_id] = dict(copy.deepcopy(metadata), id=image_id)
        self.images[image_id].setdefault("properties", {})
        self.images[image_id].setdefault("status", "queued")
        return self.show(context, image_id)

    def update(self, context, image_id, metadata, data=None,
               purge_props=False):
        image = self.images[self.show(context, image_id)["id"]]
        metadata = copy.deepcopy(metadata)
        props = metadata.pop("properties", {})
        if purge_props:
            image["properties"] = props
        else:
            image["properties"].update(props)
        image.update(metadata)
        if data is not None:
            with open(self.path(image_id), "wb") as f:
                shutil.copyfileobj(data, f, 1 << 20)
            image["size"] = os.path.getsize(self.path(image_id))
        return self.show(context, image_id)

    def delete(self, context, image_id):
        self.images.pop(image_id, None)


# -- the environment ----------------------------------------------------------

@dataclasses.dataclass
class Env:
    base: str
    guest: dict
    origin: Origin
    agent: Agent
    libvirtd: object
    glance: FakeImageService
    driver: object
    ctx: object
    images: dict
    instances: list

    # Nova objects
    def instance(self, image_key: str, root_gb: int = 1, uuid=None):
        from nova.network import model as network_model
        from nova import objects
        flavor = objects.Flavor(
            id=1, flavorid="vmt.1", name="vmt.1", memory_mb=256, vcpus=1,
            root_gb=root_gb, ephemeral_gb=0, swap=0, rxtx_factor=1.0,
            vcpu_weight=None, extra_specs={}, is_public=True,
            disabled=False, description=None)
        number = int.from_bytes(os.urandom(3), "big")
        inst = objects.Instance(
            self.ctx, id=number, uuid=uuid or str(uuid_mod.uuid4()),
            project_id="vmt-project", user_id="vmt-user",
            image_ref=self.images.get(image_key, image_key),
            flavor=flavor, old_flavor=None, new_flavor=None,
            memory_mb=256, vcpus=1, root_gb=root_gb, ephemeral_gb=0,
            host="vmt-compute", node="vmt-compute",
            launched_on="vmt-compute", system_metadata={}, metadata={},
            vm_state="building", task_state=None, power_state=0,
            config_drive="", numa_topology=None,
            pci_devices=objects.PciDeviceList(objects=[]),
            pci_requests=objects.InstancePCIRequests(requests=[]),
            vcpu_model=None, ephemeral_key_uuid=None, trusted_certs=None,
            resources=None, migration_context=None, device_metadata=None,
            os_type="linux", kernel_id="", ramdisk_id="", key_data=None,
            display_name="vmt", hostname="vmt", tags=objects.TagList(),
            info_cache=objects.InstanceInfoCache(
                network_info=network_model.NetworkInfo([])),
            keypairs=objects.KeyPairList(objects=[]), cleaned=False,
            availability_zone=None, locked=False, user_data=None,
            security_groups=objects.SecurityGroupList(objects=[]),
            default_ephemeral_device=None,
            default_swap_device=None, root_device_name=None,
            vm_mode=None, auto_disk_config=False, shutdown_terminate=False,
            disable_terminate=False, launch_index=0, reservation_id="r-vmt",
            access_ip_v4=None, access_ip_v6=None, progress=0,
            compute_id=None, hidden=False)
        self.libvirtd.track(inst.name)
        self.instances.append(inst)
        return inst

    def image_meta(self, inst):
        from nova import objects
        image = self.glance.images.get(inst.image_ref) or {
            "id": inst.image_ref, "disk_format": "raw",
            "container_format": "bare"}
        return objects.ImageMeta.from_dict({
            k: image[k] for k in ("id", "name", "disk_format",
                                  "container_format", "size")
            if k in image})

    def spawn(self, inst, driver=None):
        (driver or self.driver).spawn(self.ctx, inst, self.image_meta(inst),
                                      [], None, {}, network_info=[])

    def destroy(self, inst, driver=None):
        (driver or self.driver).destroy(self.ctx, inst, [], None,
                                        destroy_disks=True)

    # what to look at
    def instance_dir(self, inst) -> str:
        from nova.virt.libvirt import utils as libvirt_utils
        return libvirt_utils.get_instance_path(inst)

    def console(self, inst) -> str:
        path = os.path.join(self.instance_dir(inst), "console.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_boot(self, inst, count: int, since: str = "") -> float:
        """Until the guest's console shows boot number ``count`` done
        (its write synced) and the guest has powered off; seconds.
        ``since``: the console before the boot (only what follows counts,
        when the log was appended to)."""
        t0 = time.monotonic()
        want = re.compile(rf"vmthunder-guest: boot-count={count}\s*\r?\n"
                          r"VMTHUNDER-WRITE-OK")

        def new_text():
            text = self.console(inst)
            return text[len(since):] if text.startswith(since) else text

        while not want.search(new_text()):
            text = new_text()
            assert "VMTHUNDER-BOOT-FAILED" not in text, text[-3000:]
            if time.monotonic() - t0 > BOOT_TIMEOUT:
                raise AssertionError(
                    f"no boot {count} of {inst.name} within {BOOT_TIMEOUT} "
                    f"s; console:\n{text[-3000:]}\nQEMU log:\n"
                    f"{self.libvirtd.qemu_log(inst.name)[-3000:]}")
            time.sleep(0.2)
        took = time.monotonic() - t0
        self.wait_state(inst, "shut off")
        return took

    def domain_state(self, inst) -> str:
        proc = self.libvirtd.virsh("domstate", inst.name, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else "absent"

    def wait_state(self, inst, state: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.domain_state(inst) != state:
            assert time.monotonic() < deadline, (
                f"{inst.name} is {self.domain_state(inst)}, not {state}")
            time.sleep(0.2)

    def domain_xml(self, inst) -> str:
        return self.libvirtd.virsh("dumpxml", inst.name).stdout

    def vms(self) -> dict:
        return self.agent.status()["vms"]

    def image_status(self, key) -> dict:
        return self.agent.status()["images"][self.images[key]]

    def assert_nothing_left(self, inst, vms_before: dict) -> None:
        from nova_driver import imagebackend
        assert self.domain_state(inst) == "absent"
        assert set(self.vms()) == set(vms_before)
        assert imagebackend.read_record(inst) is None
        assert not os.path.exists(os.path.join(self.instance_dir(inst),
                                               "disk"))


class _Overrides:
    """Undoes the nova.conf overrides (``stop()``, like a patch): options
    keep overrides in their groups, which other ConfigOpts share
    ([vmthunder]'s OptGroup in tests/nova/test_opts.py)."""

    def __init__(self, conf, overrides):
        self.conf, self.overrides = conf, overrides

    def stop(self):
        import nova.privsep
        for name, _value, group in self.overrides:
            self.conf.clear_override(name, group)
        nova.privsep.sys_admin_pctxt.set_client_mode(True)


def _configure_nova(base: str, agent: Agent, daemon) -> list:
    """nova.conf for this host, as nova-compute would parse it; the
    patches named in the module docstring (started; returned)."""
    import nova.conf
    from nova import objects
    import os_vif

    from nova_driver import driver  # noqa: F401 - registers [vmthunder]

    CONF = nova.conf.CONF
    CONF([], project="nova", default_config_files=[])
    nova.conf.neutron.register_dynamic_opts(CONF)
    objects.register_all()
    os_vif.initialize()
    overrides = (
        ("compute_driver", "vmthunder.VMThunderLibvirtDriver", None),
        ("host", "vmt-compute", None),
        ("my_ip", "127.0.0.1", None),
        ("state_path", os.path.join(base, "nova-state"), None),
        ("instances_path", os.path.join(base, "instances"), None),
        # Domain names libvirt_fixtures knows as test domains.
        ("instance_name_template", "vmthunder-test-nova-%08x", None),
        ("force_raw_images", True, None),
        ("virt_type", "qemu", "libvirt"),
        ("connection_uri", daemon.uri, "libvirt"),
        ("cpu_mode", "none", "libvirt"),
        ("snapshots_directory", os.path.join(base, "snapshots"),
         "libvirt"),
        ("lock_path", os.path.join(base, "locks"), "oslo_concurrency"),
        ("agent_socket", agent.api_socket, "vmthunder"),
        ("precache_timeout", 120, "vmthunder"))
    for name, value, group in overrides:
        CONF.set_override(name, value, group)
    os.makedirs(CONF.state_path, exist_ok=True)  # a packaged Nova has it
    patches = [
        mock.patch("nova.objects.Instance.save"),
        mock.patch("nova.virt.libvirt.host.Host._init_events"),
        mock.patch("nova.virt.libvirt.driver.LibvirtDriver."
                   "_build_device_metadata", return_value=None),
        mock.patch("nova.virt.libvirt.driver.LibvirtDriver."
                   "_register_undefined_instance_details"),
    ]
    for p in patches:
        p.start()
    patches.insert(0, _Overrides(CONF, overrides))
    # Privileged helpers (nova.privsep) run in this process, which is
    # root already, instead of through `sudo privsep-helper`.
    import nova.privsep
    nova.privsep.sys_admin_pctxt.set_client_mode(False)
    return patches


def _new_driver():
    """The driver as nova-compute loads it (load_compute_driver with
    compute_driver = vmthunder.VMThunderLibvirtDriver), host initialised."""
    import nova.conf
    from nova.virt import driver as virt_driver
    from nova.virt import fake
    from nova_driver import cmd
    cmd.register()
    driver = virt_driver.load_compute_driver(fake.FakeVirtAPI())
    driver.init_host(host=nova.conf.CONF.host)
    return driver


@pytest.fixture(scope="module")
def env(tmp_path_factory, libvirtd):  # noqa: F811
    need("tgtd", "tgtadm", "qemu-img", "virsh")
    if not os.access(MAIN_PYTHON, os.X_OK):
        pytest.skip(f"{MAIN_PYTHON} missing: run scripts/install.sh")
    base = str(tmp_path_factory.mktemp("nova"))
    guest = build_guest_disk()
    origin = Origin(tmp_path_factory.mktemp("origin"))
    patches = []
    agent = None
    driver = None
    instances = []
    try:
        # Two images (the agent keeps one cache per content: the second
        # must differ): the guest, and the guest with 1 MiB more at the end.
        warm_disk = os.path.join(base, "warm.img")
        shutil.copyfile(guest["path"], warm_disk)
        with open(warm_disk, "ab") as f:
            f.write(os.urandom(1 << 20))
        origin.export(guest["path"], "nova-boot")
        origin.export(warm_disk, "nova-warm")
        agent = Agent(os.path.join(base, "agent"), origin)
        agent.start()
        patches = _configure_nova(base, agent, libvirtd)
        glance = FakeImageService(os.path.join(base, "glance"))
        images = {
            "boot": glance.add("guest-boot",
                               {"vmthunder_origin": "export:nova-boot"},
                               guest["path"]),
            "warm": glance.add("guest-warm",
                               {"vmthunder_origin": "export:nova-warm"},
                               warm_disk),
            "plain": glance.add("guest-plain", {}, guest["path"]),
        }
        patches += [
            mock.patch("nova.image.glance.get_remote_image_service",
                       lambda context, href: (glance, href)),
            mock.patch("nova.image.glance.get_default_image_service",
                       lambda: glance),
        ]
        for p in patches[-2:]:
            p.start()
        from nova import context as nova_context
        ctx = nova_context.get_admin_context()
        driver = _new_driver()
        yield Env(base, guest, origin, agent, libvirtd, glance, driver, ctx,
                  images, instances)
    finally:
        for inst in instances:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.destroy(ctx, inst, [], None, destroy_disks=True)
            libvirtd.remove_domain(inst.name)
        if agent is not None:
            agent.stop()
        for p in reversed(patches):
            with contextlib.suppress(RuntimeError):
                p.stop()
        origin.stop_tgtd()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{origin.control_port}"
                          f"{suffix}")


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_vm_disk(env: Env, inst, dest: str) -> str:
    """The VM disk's bytes, read through its NBD export, into ``dest``."""
    uri = env.vms()[inst.uuid]["nbd"]
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri,
                    dest], check=True, capture_output=True, timeout=120)
    return dest


# -- the tests ----------------------------------------------------------------

def test_spawn_boots_the_guest_through_vmthunder(env):
    """spawn() of an instance of an exported image: an NBD disk on the
    agent's socket, the flavor's root disk (1 GiB) larger than the image,
    the guest boots from it (marker on its serial console log), the agent
    counts its reads and writes."""
    inst = env.instance("boot", root_gb=1)
    t0 = time.monotonic()
    env.spawn(inst)
    spawned = time.monotonic() - t0
    took = env.wait_boot(inst, 1)
    text = env.console(inst)
    assert "VMTHUNDER-BOOT-OK" in text and "VMTHUNDER-READ-OK" in text

    xml = env.domain_xml(inst)
    assert re.search(
        rf"<disk type='network' device='disk'>\s*<driver name='qemu' "
        rf"type='raw'[^>]*/>\s*<source protocol='nbd' name='{inst.uuid}'>\s*"
        rf"<host transport='unix' socket='{re.escape(env.agent.nbd_socket)}'"
        r"/>", xml), xml
    status = env.agent.status()
    image = status["images"][env.images["boot"]]
    vm = status["vms"][inst.uuid]
    assert vm["image"] == env.images["boot"] and vm["state"] == "ready"
    assert vm["size"] == 1 * GiB > image["size"] == env.guest["size_bytes"]
    assert vm["bytes_read"] > 1 << 20 and vm["bytes_written"] > 0
    assert 0 < image["bytes_from_origin"] < image["size"] / 4
    print(f"spawn {spawned:.1f} s, boot {took:.1f} s: guest read "
          f"{vm['bytes_read'] >> 10} KiB, wrote {vm['bytes_written'] >> 10} "
          f"KiB; origin sent {image['bytes_from_origin'] >> 10} KiB of "
          f"{image['size'] >> 20} MiB")
    env.first = inst


def test_power_cycle_and_restarts_keep_the_disk(env):
    """Stop/start, a restart of the agent, a restart of nova-compute (a new
    driver) and a hard reboot: the guest finds its own writes each time
    (its boot counter goes on); with the agent down, a spawn fails clearly
    and leaves nothing."""
    inst = env.first
    env.driver.power_off(inst)
    env.driver.power_on(env.ctx, inst, [])
    env.wait_boot(inst, 2)

    env.agent.stop()
    other = env.instance("boot")
    vms_before = {inst.uuid: None}
    from nova_driver import imagebackend
    with pytest.raises(imagebackend.AgentUnavailable) as err:
        env.spawn(other)
    assert "Start vmthunder-agent" in str(err.value)
    assert env.agent.api_socket in str(err.value)
    env.destroy(other)          # the compute manager's cleanup
    assert not os.path.exists(env.instance_dir(other))
    env.agent.start()
    env.assert_nothing_left(other, vms_before)

    driver = _new_driver()      # nova-compute restarted
    driver.reboot(env.ctx, inst, [], "HARD")
    env.wait_boot(inst, 3)
    env.driver = driver


def test_two_instances_share_one_cache(env):
    """A second instance of the image: the same cache (one image on the
    agent, nothing more from the origin), its own disk (its boot counter
    starts at 1, the first instance's writes stay in the first's disk)."""
    before = env.image_status("boot")["bytes_from_origin"]
    inst = env.instance("boot")
    env.spawn(inst)
    env.wait_boot(inst, 1)
    status = env.agent.status()
    assert list(status["images"]) == [env.images["boot"]]
    assert {env.first.uuid, inst.uuid} <= set(status["vms"])
    assert status["vms"][inst.uuid]["bytes_read"] > 1 << 20
    fetched = status["images"][env.images["boot"]]["bytes_from_origin"]
    assert fetched - before < 256 * 1024, (before, fetched)
    env.second = inst
    # nova-compute's periodic resource audit reads every domain's disks:
    # the NBD disks are not local storage. (The database's list of this
    # host's instances and their block device mappings are mocked: these
    # two, none.)
    from nova import objects
    with mock.patch.object(objects.InstanceList, "get_by_filters",
                           return_value=objects.InstanceList(
                               objects=[env.first, inst])), \
            mock.patch.object(objects.BlockDeviceMappingList,
                              "bdms_by_instance_uuid", return_value={}):
        resources = env.driver.get_available_resource("vmt-compute")
    assert resources["local_gb"] > 0
    assert resources["disk_available_least"] > 0


def test_rescue_and_unrescue_keep_the_vmthunder_disk(env):
    """Rescue boots Nova's own rescue disk (downloaded, first) with the
    vmthunder disk beside it; unrescue boots the vmthunder disk again."""
    from nova import objects
    inst = env.second
    image = env.glance.images[env.images["plain"]]
    rescue_meta = objects.ImageMeta.from_dict({
        k: image[k] for k in ("id", "name", "disk_format",
                              "container_format", "size")})
    before = env.console(inst)
    env.driver.rescue(env.ctx, inst, [], rescue_meta, None, None,
                      objects.ShareMappingList())
    env.wait_boot(inst, 1, since=before)          # the rescue disk's first
    xml = env.domain_xml(inst)
    disks = re.findall(r"<disk type='(\w+)' device='disk'>.*?"
                       r"<target dev='(\w+)'", xml, re.S)
    assert disks == [("file", "vda"), ("network", "vdb")], xml
    assert f"<source protocol='nbd' name='{inst.uuid}'>" in xml
    before = env.console(inst)
    env.driver.unrescue(env.ctx, inst)
    env.wait_boot(inst, 2, since=before)          # its own disk again
    assert inst.uuid in env.vms()


def test_snapshot_uploads_the_vm_disk(env, tmp_path):
    """snapshot() reads the VM disk through its NBD export and uploads it
    (to the in-process FakeImageService standing in for Glance): the
    upload equals the VM disk, and the new image has no origin."""
    inst = env.first
    snap_id = env.glance.create(env.ctx, {
        "name": "first-snap", "status": "queued",
        # What the compute API copies from the parent image.
        "properties": {"vmthunder_origin": "export:nova-boot",
                       "image_type": "snapshot",
                       "instance_uuid": inst.uuid}})["id"]
    states = []
    env.driver.snapshot(env.ctx, inst, snap_id,
                        lambda **kw: states.append(kw["task_state"]))
    assert states == ["image_pending_upload", "image_uploading"]
    image = env.glance.images[snap_id]
    assert image["status"] == "active" and image["disk_format"] == "raw"
    assert "vmthunder_origin" not in image["properties"]
    assert image["properties"]["image_type"] == "snapshot"
    assert image["size"] == 1 * GiB
    disk = _read_vm_disk(env, inst, str(tmp_path / "vm.raw"))
    assert _sha256_of(env.glance.path(snap_id)) == _sha256_of(disk)
    # Not the pristine image: the guest's writes are in it.
    with open(disk, "rb") as a, open(env.guest["path"], "rb") as b:
        assert a.read(env.guest["size_bytes"]) != b.read()


def test_nbd_over_loopback_tcp(env):
    """The agent restarted to serve VM disks on loopback TCP: the next
    domain XML (a hard reboot) follows it, QEMU reads the same disk over
    TCP."""
    inst = env.second
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.agent.stop()
    env.agent.start(f"tcp:127.0.0.1:{port}")
    try:
        before = env.console(inst)
        env.driver.reboot(env.ctx, inst, [], "HARD")
        env.wait_boot(inst, 3, since=before)
        xml = env.domain_xml(inst)
        assert re.search(rf"<source protocol='nbd' name='{inst.uuid}'>\s*"
                         rf"<host name='127.0.0.1' port='{port}'/>", xml), xml
    finally:
        env.agent.stop()
        env.agent.start()


def test_cache_image_warms_the_image(env):
    """cache_image() (the aggregate image precache API's call) attaches
    and warms the image; a boot of it then fetches nothing from the
    origin."""
    image_id = env.images["warm"]
    assert env.driver.cache_image(env.ctx, image_id) is True
    warm = env.image_status("warm")
    assert warm["chunks_held"] == warm["chunks_total"]
    fetched = warm["bytes_from_origin"]
    assert fetched >= warm["size"]
    assert env.driver.cache_image(env.ctx, image_id) is False

    inst = env.instance("warm")
    env.spawn(inst)
    env.wait_boot(inst, 1)
    after = env.image_status("warm")
    assert after["bytes_from_origin"] == fetched
    assert env.vms()[inst.uuid]["bytes_read"] > 1 << 20
    env.warm = inst


def test_moves_are_refused_before_anything_moves(env):
    from nova import exception
    inst = env.second
    with pytest.raises(exception.MigrationPreCheckError) as err:
        env.driver.check_can_live_migrate_source(env.ctx, inst, None)
    assert "vmthunder disk" in str(err.value)
    with pytest.raises(exception.InstanceFaultRollback) as err:
        env.driver.migrate_disk_and_power_off(
            env.ctx, inst, "other-host", inst.flavor, [])
    assert isinstance(err.value.inner_exception,
                      exception.MigrationPreCheckError)
    assert inst.uuid in env.vms()


def test_destroy_removes_the_domain_and_the_vm_disk_only(env):
    vms = env.vms()
    cache = env.agent.status()["images"][env.images["boot"]]["cache_dir"]
    inst = env.second
    env.destroy(inst)
    assert env.domain_state(inst) == "absent"
    assert set(env.vms()) == set(vms) - {inst.uuid}
    assert env.first.uuid in env.vms()
    assert env.images["boot"] in env.agent.status()["images"]
    assert os.path.isdir(cache)
    assert not os.path.exists(env.instance_dir(inst))
    # The warm instance exists only if test_cache_image_... got that far:
    # a failure there is its own, not this test's.
    for other in (env.first, getattr(env, "warm", None)):
        if other is None:
            continue
        env.destroy(other)
        assert env.domain_state(other) == "absent"
    assert env.vms() == {}
    # Destroy again (a retried delete): nothing to do, no error.
    env.destroy(inst)


def test_bad_input_gives_clear_faults_and_leaves_nothing(env):
    from nova import exception
    from nova_driver import imagebackend
    from vmthunder.agent.client import AgentError

    vms = env.vms()
    # An image Glance does not know.
    inst = env.instance(str(uuid_mod.uuid4()))
    with pytest.raises(exception.ImageNotFound):
        env.spawn(inst)
    env.destroy(inst)
    env.assert_nothing_left(inst, vms)

    # An image without a vmthunder origin (no fallback configured).
    inst = env.instance("plain")
    with pytest.raises(exception.ImageUnacceptable) as err:
        env.spawn(inst)
    assert "has no vmthunder origin" in str(err.value)
    assert "vmthunder_origin" in str(err.value)
    env.destroy(inst)
    env.assert_nothing_left(inst, vms)

    # The instance's UUID is taken on the agent by a disk nova-compute did
    # not make: refused, and that disk is kept, even by the cleanup.
    uuid = str(uuid_mod.uuid4())
    env.agent.client.create_vm(uuid, env.images["boot"])
    taken = env.vms()
    inst = env.instance("boot", uuid=uuid)
    with pytest.raises(imagebackend.DiskExists) as err:
        env.spawn(inst)
    assert f"vmthunder vm delete {uuid}" in str(err.value)
    env.destroy(inst)
    assert env.vms() == taken
    assert env.domain_state(inst) == "absent"
    env.agent.client.delete_vm(uuid)

    # An origin the agent cannot attach.
    bad = env.glance.add("bad", {"vmthunder_origin": "export:no-such"})
    inst = env.instance(bad)
    with pytest.raises((exception.ImageUnacceptable,
                        imagebackend.VMThunderError)) as err:
        env.spawn(inst)
    assert "no-such" in str(err.value)
    env.destroy(inst)
    env.assert_nothing_left(inst, vms)
    with pytest.raises(AgentError):
        env.agent.client.precache_progress(bad)


def test_fallback_to_download_boots_a_local_disk(env):
    """[vmthunder] fallback_to_download: an image without an origin gets
    Nova's ordinary downloaded disk (and boots); destroy removes it."""
    import nova.conf
    conf = nova.conf.CONF
    conf.set_override("fallback_to_download", True, "vmthunder")
    try:
        vms = env.vms()
        inst = env.instance("plain")
        env.spawn(inst)
        env.wait_boot(inst, 1)
        xml = env.domain_xml(inst)
        disk = os.path.join(env.instance_dir(inst), "disk")
        assert f"<source file='{disk}'" in xml
        assert env.vms() == vms
        env.destroy(inst)
        env.assert_nothing_left(inst, vms)
    finally:
        conf.clear_override("fallback_to_download", "vmthunder")


def test_precache_base_fills_nova_image_cache_through_the_swarm(env):
    """[vmthunder] precache_base (Nova's pre-caching mode): cache_image()
    fills Nova's own image cache (_base/<sha1 of the image id>) through
    the agent (the image attached from its origin, warmed, read whole),
    never through the image service; the file equals the image, sparse.
    The instance then gets Nova's ordinary qcow2 root disk whose backing
    file is that base, and boots from it; with the base gone, spawn fills
    it again the same way (from the agent's cache: the origin sends
    nothing more)."""
    import nova.conf
    from nova_driver import imagebackend, precache_base
    conf = nova.conf.CONF
    # Content of its own: the agent keeps one cache per content.
    disk = os.path.join(env.base, "base.img")
    subprocess.run(["cp", "--sparse=always", env.guest["path"], disk],
                   check=True)
    with open(disk, "ab") as f:
        f.write(os.urandom(1 << 20))
    size = os.path.getsize(disk)
    env.origin.export(disk, "nova-base")
    image_id = env.glance.add("guest-base",
                              {"vmthunder_origin": "export:nova-base"}, disk)
    downloads = []
    download = env.glance.download

    def counted(*args, **kwargs):
        downloads.append(args)
        return download(*args, **kwargs)

    vms = env.vms()
    conf.set_override("precache_base", True, "vmthunder")
    try:
        with mock.patch.object(env.glance, "download", counted):
            assert env.driver.cache_image(env.ctx, image_id) is True
            base = precache_base.base_path(image_id)
            assert os.path.dirname(base) == os.path.join(
                conf.instances_path, "_base")
            assert filecmp.cmp(base, disk, shallow=False)
            assert os.stat(base).st_blocks * 512 < size // 2      # sparse
            image = env.agent.status()["images"][image_id]
            assert image["chunks_held"] == image["chunks_total"], image
            assert image["bytes_from_origin"] >= image["size"] == size
            assert downloads == []
            assert env.vms() == vms         # its read-out disk is gone
            assert not [e for e in os.listdir(os.path.dirname(base))
                        if e.startswith(".")]
            assert env.driver.cache_image(env.ctx, image_id) is False

            inst = env.instance(image_id)
            os.unlink(base)
            env.spawn(inst)
            assert filecmp.cmp(base, disk, shallow=False)
            root = os.path.join(env.instance_dir(inst), "disk")
            assert f"<source file='{root}'" in env.domain_xml(inst)
            env.wait_boot(inst, 1)
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", root], check=True,
                capture_output=True, text=True).stdout)
            assert info["format"] == "qcow2", info
            assert info["full-backing-filename"] == base, info
            assert downloads == []
            assert inst.uuid not in env.vms()
            assert imagebackend.read_record(inst) is None
            after = env.agent.status()["images"][image_id]
            assert after["bytes_from_origin"] == image["bytes_from_origin"]
            env.destroy(inst)
            assert env.domain_state(inst) == "absent"
            assert not os.path.exists(root) and os.path.exists(base)
    finally:
        conf.clear_override("precache_base", "vmthunder")


def test_console_script_runs_nova_compute():
    """vmthunder-nova-compute is Nova's nova-compute (--version answers
    from Nova's own option parsing)."""
    proc = subprocess.run([NOVA_COMPUTE, "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^34\.", proc.stdout + proc.stderr, re.M), (
        proc.stdout, proc.stderr)

