"""The vmthunder image backend of Nova's libvirt driver.

An instance's root disk (``disk``) is a VM disk of this host's
vmthunder-agent: a private copy-on-write snapshot, named after the
instance UUID, on the image's shared copy-on-read cache, which fetches
blocks lazily from the image's origin (a read-only iSCSI export) and from
peer hosts. QEMU opens it as an NBD network disk on the agent's socket;
nothing is downloaded into Nova's image cache.

- :class:`Backend` replaces ``LibvirtDriver.image_backend``: ``disk`` of an
  instance is a :class:`VMThunderImage`; every other disk (ephemeral, swap,
  config drive, rescue) and a root disk that was downloaded the ordinary
  way (``[vmthunder] fallback_to_download``) are Nova's own classes.
- An image's origin is its Glance property ``[vmthunder] origin_property``
  (``vmthunder_origin``: ``export:NAME``, ``iscsi://...`` or
  ``cinder://VOLUME_ID``), else, with ``[vmthunder] cinder_origin``, the
  image's Cinder volume made on first use (nova_driver/cinder_origin.py),
  else ``[vmthunder] origin_template`` (e.g. ``export:{image_id}``).
- Which VM disks this nova-compute made is recorded in the instance's
  directory (``vmthunder.json``): only those are ever deleted, so a VM disk
  of the same name made by anybody else is refused, never taken over.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse

from oslo_log import log as logging
from oslo_utils import excutils

import nova.conf
from nova import exception
from nova.i18n import _
from nova.image import glance
from nova.virt.image import model as imgmodel
from nova.virt import images
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import imagebackend
from nova.virt.libvirt import utils as libvirt_utils

from nova_driver import opts
from vmthunder.agent import client as agent_client

CONF = nova.conf.CONF
opts.register_opts(CONF)
LOG = logging.getLogger(__name__)
IMAGE_API = glance.API()

ROOT_DISK = "disk"
RECORD_NAME = "vmthunder.json"
# Nova's image types whose disks are files in the instance directory.
FILE_IMAGE_TYPES = ("default", "raw", "flat", "qcow2", "ploop")


# -- faults -----------------------------------------------------------------

class VMThunderError(exception.NovaException):
    """A vmthunder root disk could not be made or used; the message says
    what to do. (The compute manager reschedules the build elsewhere.)"""
    msg_fmt = _("vmthunder: %(reason)s")


class AgentUnavailable(VMThunderError):
    msg_fmt = _("vmthunder agent unavailable: %(reason)s")


class DiskExists(VMThunderError):
    msg_fmt = _("vmthunder: %(reason)s")


class _Fallback(Exception):
    """Internal: make the root disk Nova's way (the reason is the
    message)."""


def _agent():
    return agent_client.AgentClient(CONF.vmthunder.agent_socket,
                                    timeout=CONF.vmthunder.agent_timeout)


def _unavailable(exc) -> AgentUnavailable:
    return AgentUnavailable(reason=_(
        "%(why)s. Start vmthunder-agent on this host (or set [vmthunder] "
        "agent_socket to its API socket), or set [vmthunder] "
        "fallback_to_download = True to give instances ordinary "
        "downloaded root disks meanwhile.") % {"why": str(exc).rstrip(".")})


def _failed(what: str, exc) -> VMThunderError:
    if isinstance(exc, agent_client.AgentUnavailable):
        return _unavailable(exc)
    return VMThunderError(reason=_("%(what)s: the agent said: %(msg)s") % {
        "what": what, "msg": exc})


# -- where an image comes from ----------------------------------------------

def image_origin(context, image_id):
    """(origin or None, the Glance image) of ``image_id``.

    ImageNotFound (and Nova's other image API errors) pass through.
    """
    image = IMAGE_API.get(context, image_id)
    props = image.get("properties") or {}
    origin = props.get(CONF.vmthunder.origin_property)
    if isinstance(origin, str) and origin.strip():
        return origin.strip(), image
    if CONF.vmthunder.cinder_origin:
        return cinder_origin(image_id), image
    template = CONF.vmthunder.origin_template
    if template:
        try:
            return template.format(image_id=image_id,
                                   image_name=image.get("name") or ""), image
        except (KeyError, IndexError, ValueError) as exc:
            raise VMThunderError(reason=_(
                "[vmthunder] origin_template %(t)r is not valid (%(e)s); "
                "use {image_id} and {image_name} only") % {
                    "t": template, "e": exc})
    return None, image


def cinder_origin(image_id) -> str:
    """cinder://VOLUME_ID of the image's Cinder volume, made (under a
    lock shared by the hosts) on first use ([vmthunder] cinder_origin;
    nova_driver/cinder_origin.py)."""
    from nova_driver import cinder_origin as resolver
    try:
        return resolver.Resolver.from_nova_conf(CONF.vmthunder).resolve(
            image_id).origin
    except resolver.CinderError as exc:
        raise VMThunderError(reason=_(
            "image %(id)s has no vmthunder origin and its Cinder volume "
            "could not be found or made ([vmthunder] cinder_origin): "
            "%(msg)s") % {"id": image_id, "msg": exc})


def no_origin_reason(image_id) -> str:
    return _(
        "image %(id)s has no vmthunder origin: export it (`vmthunder export "
        "IMAGE_FILE --name NAME` on the origin host) and set its property "
        "(`openstack image set --property %(prop)s=export:NAME %(id)s`), "
        "set [vmthunder] origin_template, or set [vmthunder] "
        "fallback_to_download = True on the compute hosts to download it "
        "instead") % {"id": image_id,
                      "prop": CONF.vmthunder.origin_property}


def redact(origin: str) -> str:
    """The origin as the agent shows it (no CHAP secret): the agent's
    own rule (vmthunder.agent.service.redact)."""
    return re.sub(r"^(iscsi://[^/@%]*)%[^/@]*@", r"\1%***@", origin)


def attach_image(client, image_id: str, origin: str) -> dict:
    """Attach ``origin`` on the agent under the Glance image id; the
    agent's image (name, size...). An origin attached under another name
    (by hand, or for another Glance image of the same export) is used as
    it is: one cache per image per host."""
    try:
        return client.attach_image(image_id, origin)
    except agent_client.AgentError as exc:
        if exc.status == 409:
            try:
                for info in client.images():
                    if (info.get("origin") == redact(origin) and
                            info.get("state") == "attached"):
                        LOG.info("image %s: origin %s is attached on the "
                                 "agent as %s; using that cache", image_id,
                                 redact(origin), info["name"])
                        return info
            except agent_client.AgentError:
                pass
        raise


def parse_nbd_uri(uri: str) -> dict:
    """``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME`` (as the
    agent hands them out) as {transport, export, socket | host, port}."""
    parsed = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parsed.path.lstrip("/"))
    if parsed.scheme == "nbd+unix":
        sock = urllib.parse.parse_qs(parsed.query).get("socket", [""])[0]
        if not sock:
            raise ValueError(f"NBD URI {uri!r} has no socket")
        return {"transport": "unix", "export": export, "socket": sock}
    if parsed.scheme == "nbd":
        if not parsed.hostname or not parsed.port:
            raise ValueError(f"NBD URI {uri!r} has no host and port")
        return {"transport": "tcp", "export": export,
                "host": parsed.hostname, "port": parsed.port}
    raise ValueError(f"unknown NBD URI {uri!r}")


def check_transport(uri: str) -> dict:
    """The parsed URI, or VMThunderError when it is not the configured
    [vmthunder] nbd_transport."""
    try:
        nbd = parse_nbd_uri(uri)
    except ValueError as exc:
        raise VMThunderError(reason=str(exc))
    want = CONF.vmthunder.nbd_transport
    if want != "auto" and nbd["transport"] != want:
        raise VMThunderError(reason=_(
            "the agent serves VM disks on %(uri)s (%(got)s) but [vmthunder] "
            "nbd_transport is %(want)s: set the agent's [agent] "
            "hypervisor_listen to a %(want)s address, or nbd_transport to "
            "auto") % {"uri": uri, "got": nbd["transport"], "want": want})
    return nbd


# -- the record of the VM disks this nova-compute made ------------------------

def record_path(instance) -> str:
    return os.path.join(libvirt_utils.get_instance_path(instance),
                        RECORD_NAME)


def read_record(instance) -> dict | None:
    """This host's record of the instance's vmthunder disk, or None."""
    try:
        with open(record_path(instance)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOG.warning("unreadable %s: %s", record_path(instance), exc,
                    instance=instance)
        return None
    if not isinstance(record, dict) or record.get("host") != CONF.host:
        # An instance directory on shared storage: another host's disk.
        return None
    return record


def write_record(instance, **fields) -> dict:
    record = dict(fields, host=CONF.host, vm=instance.uuid)
    path = record_path(instance)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return record


def remove_record(instance) -> None:
    try:
        os.unlink(record_path(instance))
    except FileNotFoundError:
        pass


def delete_root_disk(instance) -> bool:
    """Delete the instance's VM disk on the agent if this host made it
    (its record), and the record; True when there was one. The image and
    its cache stay. AgentUnavailable when the agent is down: the disk is
    kept and so is the record, so that a retried delete finds it."""
    record = read_record(instance)
    if record is None:
        return False
    client = _agent()
    try:
        client.delete_vm(instance.uuid)
        LOG.info("vmthunder disk %s deleted (image %s)", instance.uuid,
                 record.get("image"), instance=instance)
    except agent_client.AgentError as exc:
        if exc.status != 404:
            raise _failed(_("cannot delete the vmthunder disk of instance "
                            "%s") % instance.uuid, exc)
        LOG.info("vmthunder disk %s was already gone", instance.uuid,
                 instance=instance)
    remove_record(instance)
    return True


def has_root_disk(instance) -> bool:
    """Whether this host made a vmthunder root disk for ``instance``."""
    return read_record(instance) is not None


# -- libvirt XML: an NBD disk on a unix socket -----------------------------

class NbdGuestDisk(vconfig.LibvirtConfigGuestDisk):
    """A network disk that can also be ``<host transport='unix'
    socket='PATH'/>`` (libvirt and QEMU take it for NBD; Nova's
    LibvirtConfigGuestDisk writes ``<host name= port=>`` only)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.source_socket = None

    def format_dom(self):
        dev = super().format_dom()
        if self.source_type == "network" and self.source_socket:
            source = dev.find("source")
            for host in source.findall("host"):
                source.remove(host)
            host = source.makeelement("host", {"transport": "unix",
                                               "socket": self.source_socket})
            source.append(host)
        return dev

    def parse_dom(self, xmldoc):
        super().parse_dom(xmldoc)
        source = xmldoc.find("source")
        if source is not None:
            for host in source.findall("host"):
                if host.get("transport") == "unix":
                    self.source_socket = host.get("socket")


class NBDImage(imgmodel.Image):
    """The image model of a disk served over NBD (for Nova's disk
    inspection; file injection into it is not supported)."""

    def __init__(self, uri):
        super().__init__(imgmodel.FORMAT_RAW)
        self.uri = uri


# -- the image ----------------------------------------------------------------

class VMThunderImage(imagebackend.Image):
    """An instance's root disk as a VM disk of the host's vmthunder-agent."""

    SUPPORTS_CLONE = False

    def __init__(self, instance=None, disk_name=None, path=None,
                 disk_info_mapping=None):
        if instance is None:
            raise exception.InternalError(
                "a vmthunder disk belongs to an instance")
        self.instance = instance
        self.disk_name = disk_name or ROOT_DISK
        self.vm_name = instance.uuid
        super().__init__(path or f"vmthunder:{self.vm_name}", "network",
                         "raw", is_block_dev=False,
                         disk_info_mapping=disk_info_mapping)

    # The ordinary local disk, when spawn falls back to a download.
    def _local_image(self):
        return imagebackend.Backend(CONF.use_cow_images).by_name(
            self.instance, self.disk_name,
            disk_info_mapping=self.disk_info_mapping)

    def exists(self):
        record = read_record(self.instance)
        return record is not None and record.get("state") == "ready"

    def cache(self, fetch_func, filename, size=None, safe=False, *args,
              **kwargs):
        """Make the root disk (Nova calls this for every spawn, hard
        reboot path included): the VM disk on the agent, kept when it
        exists; or Nova's own download, when allowed and needed."""
        try:
            self.create_image(fetch_func, filename, size, safe, *args,
                              **kwargs)
        except _Fallback as why:
            LOG.warning("vmthunder: %s; [vmthunder] fallback_to_download "
                        "is set: downloading the image into an ordinary "
                        "root disk", why, instance=self.instance)
            self._local_image().cache(fetch_func, filename, size, safe,
                                      *args, **kwargs)

    def create_image(self, prepare_template, base, size, safe=False, *args,
                     **kwargs):
        """Attach the instance's image on the agent and create the
        instance's VM disk on it, ``size`` bytes (the flavor's root disk;
        None: the image's size). Nothing is downloaded: prepare_template
        is not called. Either the disk is made and recorded, or nothing
        is left (the image stays attached: it is the host's cache)."""
        context = kwargs.get("context")
        image_id = kwargs.get("image_id")
        record = read_record(self.instance)
        if record is not None and record.get("state") == "ready":
            # Spawn again on the same host (hard reboot path, a restart of
            # nova-compute): the disk, with whatever the guest wrote, stays.
            if size and size > record.get("size", 0):
                self.resize_image(size)
            return
        if context is None or image_id is None:
            raise VMThunderError(reason=_(
                "cannot create the root disk of instance %s without its "
                "image") % self.vm_name)
        origin, image = image_origin(context, image_id)
        fallback = CONF.vmthunder.fallback_to_download
        if origin is None:
            if fallback:
                raise _Fallback(no_origin_reason(image_id))
            raise exception.ImageUnacceptable(
                image_id=image_id, reason=no_origin_reason(image_id))
        client = _agent()
        try:
            status = client.status()
        except agent_client.AgentError as exc:
            if fallback and isinstance(exc, agent_client.AgentUnavailable):
                raise _Fallback(str(exc))
            raise _failed(_("cannot reach the vmthunder agent"), exc)
        if status.get("hypervisor_nbd"):
            check_transport(_address_uri(status["hypervisor_nbd"],
                                         self.vm_name))
        existing = (status.get("vms") or {}).get(self.vm_name)
        if existing is not None and record is None:
            raise DiskExists(reason=_(
                "a VM disk named %(vm)s (on image %(image)s) exists on this "
                "host's agent already and was not made by nova-compute for "
                "this instance; delete it if it is stale (`vmthunder vm "
                "delete %(vm)s`), nothing was changed") % {
                    "vm": self.vm_name, "image": existing.get("image")})
        try:
            info = attach_image(client, image_id, origin)
        except agent_client.AgentError as exc:
            if exc.status == 400:
                raise exception.ImageUnacceptable(image_id=image_id, reason=_(
                    "its vmthunder origin %(o)s was refused by the agent: "
                    "%(msg)s") % {"o": redact(origin), "msg": exc})
            raise _failed(_("cannot attach image %(id)s from %(o)s") % {
                "id": image_id, "o": redact(origin)}, exc)
        self.verify_base_size(base, size, base_size=info["size"])
        if existing is not None:
            # Our own earlier attempt (its record says "creating"): it got
            # as far as the agent. Keep it if it is what we want.
            if existing.get("image") != info["name"] or \
                    existing.get("state") != "ready":
                raise DiskExists(reason=_(
                    "the VM disk %(vm)s left by an interrupted spawn is on "
                    "image %(image)s, not %(want)s; delete it (`vmthunder "
                    "vm delete %(vm)s`) and retry") % {
                        "vm": self.vm_name, "image": existing.get("image"),
                        "want": info["name"]})
            vm = existing
        else:
            write_record(self.instance, state="creating", image=info["name"],
                         image_id=image_id, origin=redact(origin))
            try:
                vm = client.create_vm(self.vm_name, info["name"],
                                      size or None)
            except agent_client.AgentError as exc:
                if exc.status == 0 and not isinstance(
                        exc, agent_client.AgentUnavailable):
                    # No answer (a timeout, a lost connection): the agent
                    # may have made the disk all the same.
                    self._delete_quietly(client)
                remove_record(self.instance)
                if exc.status == 409:
                    raise DiskExists(reason=str(exc))
                raise _failed(_("cannot create the VM disk of instance %s")
                              % self.vm_name, exc)
            except BaseException:
                with excutils.save_and_reraise_exception():
                    self._delete_quietly(client)
                    remove_record(self.instance)
        try:
            check_transport(vm["nbd"])
            write_record(self.instance, state="ready", image=info["name"],
                         image_id=image_id, origin=redact(origin),
                         nbd=vm["nbd"], size=vm.get("size", info["size"]))
        except BaseException:
            with excutils.save_and_reraise_exception():
                self._delete_quietly(client)
                remove_record(self.instance)
        LOG.info("vmthunder disk %(vm)s: %(size)d bytes on image %(image)s "
                 "(origin %(origin)s), served on %(nbd)s",
                 {"vm": self.vm_name, "size": vm.get("size", info["size"]),
                  "image": info["name"], "origin": redact(origin),
                  "nbd": vm["nbd"]}, instance=self.instance)

    def _delete_quietly(self, client) -> None:
        """Undo a VM disk this spawn may have made (errors logged)."""
        try:
            client.delete_vm(self.vm_name)
        except agent_client.AgentError as exc:
            if exc.status != 404:
                LOG.error("could not delete the VM disk %s after a failed "
                          "spawn: %s; delete it with `vmthunder vm delete "
                          "%s`", self.vm_name, exc, self.vm_name,
                          instance=self.instance)

    def resize_image(self, size):
        current = self.get_disk_size(self.path)
        if size <= current:
            return
        raise exception.ResizeError(reason=_(
            "the vmthunder root disk of instance %(vm)s is %(cur)d bytes; it "
            "cannot grow to %(size)d bytes once created") % {
                "vm": self.vm_name, "cur": current, "size": size})

    def get_disk_size(self, name):
        """The VM disk's virtual size (``name`` is ignored, as Rbd does)."""
        record = read_record(self.instance)
        if record is not None and record.get("size"):
            return int(record["size"])
        return int(self._vm()["size"])

    def _vm(self) -> dict:
        """The agent's view of the VM disk (VMThunderError if none)."""
        try:
            for vm in _agent().vms():
                if vm.get("name") == self.vm_name:
                    return vm
        except agent_client.AgentError as exc:
            raise _failed(_("cannot look up the vmthunder disk of instance "
                            "%s") % self.vm_name, exc)
        raise VMThunderError(reason=_(
            "the agent has no VM disk for instance %s") % self.vm_name)

    def nbd_uri(self) -> str:
        """Where QEMU opens the disk: the agent's answer, else (agent
        down) this host's record of it."""
        try:
            vm = self._vm()
            if vm.get("nbd"):
                return vm["nbd"]
            raise VMThunderError(reason=_(
                "the VM disk %(vm)s is in error on the agent: %(e)s") % {
                    "vm": self.vm_name, "e": vm.get("error")})
        except AgentUnavailable:
            record = read_record(self.instance)
            if record is None or not record.get("nbd"):
                raise
            LOG.warning("vmthunder agent down: using the recorded address "
                        "of disk %s", self.vm_name, instance=self.instance)
            return record["nbd"]

    def libvirt_info(self, cache_mode, extra_specs, boot_order=None,
                     disk_unit=None):
        if self.disk_info_mapping is None:
            raise AttributeError(
                'Image must have disk_info_mapping to call libvirt_info()')
        nbd = check_transport(self.nbd_uri())
        disk_bus = self.disk_info_mapping["bus"]
        info = NbdGuestDisk()
        info.source_type = "network"
        info.source_protocol = "nbd"
        info.source_name = nbd["export"]
        if nbd["transport"] == "unix":
            info.source_socket = nbd["socket"]
        else:
            info.source_hosts = [nbd["host"]]
            info.source_ports = [str(nbd["port"])]
        info.source_device = self.disk_info_mapping["type"]
        info.target_bus = disk_bus
        info.target_dev = self.disk_info_mapping["dev"]
        info.driver_format = "raw"
        info.driver_cache = cache_mode
        info.driver_discard = self.discard_mode
        info.driver_io = self.driver_io
        if CONF.libvirt.virt_type in ("qemu", "kvm"):
            info.driver_name = "qemu"
        info.boot_order = boot_order
        if disk_bus == "scsi":
            self.disk_scsi(info, disk_unit)
        self.disk_qos(info, extra_specs)
        return info

    def snapshot_extract(self, target, out_format):
        """Copy the disk (through its NBD export) into ``target``."""
        images.convert_image(self.nbd_uri(), target, "raw", out_format)

    def get_model(self, connection):
        return NBDImage(self.nbd_uri())

    @staticmethod
    def is_shared_block_storage():
        return False

    @staticmethod
    def is_file_in_instance_path():
        return False


def _address_uri(address: str, export: str) -> str:
    """The NBD URI of ``export`` on an agent address (tcp:H:P, unix:P)."""
    kind, _sep, rest = address.partition(":")
    if kind == "unix":
        return f"nbd+unix:///{export}?socket={rest}"
    host, _sep, port = rest.rpartition(":")
    return f"nbd://{host}:{port}/{export}"


class Backend(imagebackend.Backend):
    """Nova's backend, but the root disk of an instance is vmthunder's."""

    def by_name(self, instance, name, image_type=None,
                disk_info_mapping=None):
        image_type = image_type or CONF.libvirt.images_type
        if name == ROOT_DISK and image_type == CONF.libvirt.images_type \
                and not self._local_root_exists(instance, image_type) \
                and (not CONF.vmthunder.precache_base
                     or has_root_disk(instance)):
            # ([vmthunder] precache_base: new root disks are Nova's own,
            # over a base filled through the agent; precache_base.py.)
            return VMThunderImage(instance, name,
                                  disk_info_mapping=disk_info_mapping)
        return super().by_name(instance, name, image_type,
                               disk_info_mapping=disk_info_mapping)

    def _local_root_exists(self, instance, image_type) -> bool:
        """Whether the instance's root disk was made Nova's way (a
        fallback download): then it stays Nova's."""
        if image_type in FILE_IMAGE_TYPES:
            # No Image object: Qcow2's would write disk.info as a side
            # effect.
            return os.path.exists(os.path.join(
                libvirt_utils.get_instance_path(instance), ROOT_DISK))
        return super().by_name(instance, ROOT_DISK, image_type).exists()


def wait_precache(client, name: str, timeout: float,
                  interval: float = 0.5) -> dict:
    """Poll the agent's precache of image ``name`` until it ends; its
    last progress (VMThunderError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        progress = client.precache_progress(name)
        if progress.get("state") != "running":
            return progress
        if time.monotonic() > deadline:
            raise VMThunderError(reason=_(
                "precache of image %(n)s still running after %(t)g s "
                "([vmthunder] precache_timeout): %(done)s of %(total)s "
                "chunks") % {"n": name, "t": timeout,
                             "done": progress.get("chunks_done"),
                             "total": progress.get("chunks_total")})
        time.sleep(interval)
