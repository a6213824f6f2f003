"""`vmthunder export glance://IMAGE_ID --cinder`: a Glance image as a shared,
read-only, multi-attached Cinder volume, with its chunk manifest.

:func:`export_glance_image` (blocking; the CLI and the Nova driver call it):

1. checks the image in Glance (it must exist and be ``active``);
2. finds the image's volume (the image's ``vmthunder_cinder_volume``
   property, else a volume named ``vmthunder-image-<IMAGE_ID>``) or creates
   it from the image (``volumes.create(size, imageRef=...)``) with the
   multiattach volume type (``[cinder] volume_type``, extra spec
   ``multiattach='<is> True'``, made when missing), waits for it with
   progress, and sets its read-only flag;
3. computes the chunk manifest by reading the volume once through a
   read-only attachment (the userspace iSCSI initiator with the CHAP
   credentials Cinder gives), and writes it into a second small volume,
   ``vmthunder-manifest-<IMAGE_ID>`` (multiattach, written once through a
   read-write attachment, then read-only): hosts attach it next to the
   image volume, read the manifest's header and page digests at attach
   and its table lazily, as from the manifest LUN of a tgtd export;
4. records the root digest (the manifest's identity, the digest of its page
   digests) and the manifest volume in the image volume's metadata
   (``vmthunder_manifest_identity``, ``vmthunder_manifest_volume``) and in
   Glance image properties (``vmthunder_cinder_volume``,
   ``vmthunder_manifest_identity``, and ``vmthunder_origin =
   cinder://VOLUME_ID``, which the Nova driver reads, unless it names
   another origin already).

A second export of the same image finds all of it and changes nothing; a
half-made export (volume made, no manifest) is completed. Errors are
:class:`~vmthunder.cinder.client.CinderError` saying what to do. Why a
second volume: docs/design.md, "Images as Cinder volumes".
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time

from vmthunder.cinder import client as cc
from vmthunder.cinder.client import CinderError
from vmthunder.volume import manifest as manifest_mod

GiB = 1 << 30
SECTOR = 512
IMAGE_VOLUME = "vmthunder-image-{}"
MANIFEST_VOLUME = "vmthunder-manifest-{}"
META_IMAGE = "vmthunder_image_id"
META_MANIFEST_VOLUME = "vmthunder_manifest_volume"
META_IDENTITY = "vmthunder_manifest_identity"
META_SIZE = "vmthunder_image_size"
META_MANIFEST_OF = "vmthunder_manifest_of"
PROP_VOLUME = "vmthunder_cinder_volume"
PROP_IDENTITY = "vmthunder_manifest_identity"
# What the Nova driver reads ([vmthunder] origin_property's default).
PROP_ORIGIN = "vmthunder_origin"
BUSY = ("creating", "downloading", "uploading")
READ_STEP = 4 << 20


@dataclasses.dataclass
class CinderExport:
    image_id: str
    volume_id: str
    manifest_volume_id: str
    identity: str
    size: int
    chunk_size: int
    changed: bool
    message: str

    @property
    def origin(self) -> str:
        return f"cinder://{self.volume_id}"


def _print(text: str) -> None:
    print(text, flush=True)


def export_glance_image(settings: cc.CinderSettings, image_id: str, *,
                        chunk_size: int = 8192, out=_print,
                        poll: float = 1.0) -> CinderExport:
    """Export Glance image ``image_id`` as a Cinder volume with its
    manifest (module doc). Blocking; idempotent."""
    from cinderclient import exceptions as cexc
    from keystoneauth1 import exceptions as ksexc
    try:
        sess = cc.session(settings)
        cinder = cc.volume_client(settings, sess)
        glance = cc.image_api(settings, sess)
        return _Exporter(settings, cinder, glance, image_id, chunk_size,
                         out, poll).run()
    except (ksexc.ConnectFailure, ksexc.DiscoveryFailure) as exc:
        raise CinderError(cc.describe_error(exc, settings)) from None
    except cexc.OverLimit as exc:
        project = settings.project_name or settings.project_id
        raise CinderError(
            f"Cinder refused a volume for image {image_id}: quota of "
            f"project {project} exceeded ({exc}); delete volumes it no "
            f"longer needs or raise its quota (cinder quota-update "
            f"--volumes N --gigabytes N {project}), then export again") \
            from None
    except cexc.ClientException as exc:
        raise CinderError(f"Cinder: {exc}") from None
    except ksexc.HttpError as exc:
        raise CinderError(f"Glance refused a request for image {image_id}: "
                          f"{exc}") from None
    except ksexc.ClientException as exc:
        raise CinderError(cc.describe_error(exc, settings)) from None


class _Exporter:
    def __init__(self, settings, cinder, glance, image_id, chunk_size, out,
                 poll):
        self.settings = settings
        self.cinder = cinder
        self.glance = glance
        self.image_id = image_id
        self.chunk_size = chunk_size
        self.out = out
        self.poll = poll
        self.changed = False

    # -- Glance ------------------------------------------------------------

    def image(self) -> dict:
        from keystoneauth1 import exceptions as ksexc
        try:
            return self.glance.get(f"/v2/images/{self.image_id}").json()
        except ksexc.NotFound:
            raise CinderError(f"Glance image {self.image_id} does not "
                              "exist") from None
        except ksexc.HttpError as exc:
            raise CinderError(f"Glance image {self.image_id}: {exc}") \
                from None

    def set_properties(self, image: dict, props: dict) -> None:
        ops = [{"op": "replace" if key in image else "add",
                "path": f"/{key}", "value": value}
               for key, value in props.items() if image.get(key) != value]
        if ops:
            self.glance.patch(
                f"/v2/images/{self.image_id}", json=ops,
                headers={"Content-Type":
                         "application/openstack-images-v2.1-json-patch"})

    # -- Cinder --------------------------------------------------------------

    def volume_type(self):
        name = self.settings.volume_type
        for vt in self.cinder.volume_types.list():
            if vt.name == name:
                specs = vt.get_keys()
                if specs.get("multiattach") != "<is> True":
                    raise CinderError(
                        f"volume type {name} exists without the extra spec "
                        "multiattach='<is> True'; add it (cinder type-key "
                        f"{name} set multiattach='<is> True') or name "
                        "another type in [cinder] volume_type")
                return vt
        vt = self.cinder.volume_types.create(
            name, description="vmthunder images: shared, read-only, "
                              "multi-attached")
        vt.set_keys({"multiattach": "<is> True"})
        self.out(f"created volume type {name} (multiattach)")
        return vt

    def find(self, name: str, volume_id: str | None = None):
        from cinderclient import exceptions as cexc
        if volume_id:
            try:
                return self.cinder.volumes.get(volume_id)
            except cexc.NotFound:
                pass
        found = [v for v in self.cinder.volumes.list(
            search_opts={"name": name}) if v.name == name]
        found.sort(key=lambda v: v.created_at)
        return found[0] if found else None

    def wait(self, volume, what: str):
        """Until ``volume`` leaves the busy states; progress on ``out``."""
        started = time.monotonic()
        last, shown = None, 0.0
        while True:
            volume = self.cinder.volumes.get(volume.id)
            now = time.monotonic() - started
            if volume.status not in BUSY:
                break
            if volume.status != last or now - shown >= 10:
                self.out(f"{what} {volume.id}: {volume.status} "
                         f"({now:.0f} s)")
                last, shown = volume.status, now
            if now > self.settings.create_timeout:
                raise CinderError(
                    f"{what} {volume.id} is still {volume.status} after "
                    f"{now:.0f} s ([cinder] create_timeout); look at "
                    "cinder-volume's log")
            time.sleep(self.poll)
        if volume.status == "error":
            raise CinderError(
                f"{what} {volume.id} is in error: Cinder could not create "
                "it (cinder-volume's log says why); delete it (cinder "
                f"delete {volume.id}) and export again")
        if volume.status not in ("available", "in-use"):
            raise CinderError(f"{what} {volume.id} is {volume.status}, "
                              "not available")
        return volume

    # -- the steps ---------------------------------------------------------

    def run(self) -> CinderExport:
        image = self.image()
        if image.get("status") != "active":
            raise CinderError(
                f"Glance image {self.image_id} is {image.get('status')!r}, "
                "not 'active': upload its data first (or wait for its "
                "import)")
        size = int(image.get("virtual_size") or image.get("size") or 0)
        if size <= 0:
            raise CinderError(f"Glance image {self.image_id} has no size")
        size = -(-size // SECTOR) * SECTOR
        name = IMAGE_VOLUME.format(self.image_id)
        volume = self.find(name, image.get(PROP_VOLUME))
        vtype = self.volume_type()
        if volume is None:
            gib = max(1, -(-size // GiB))
            volume = self.cinder.volumes.create(
                gib, imageRef=self.image_id, volume_type=vtype.id,
                name=name, metadata={META_IMAGE: self.image_id},
                description=f"vmthunder: Glance image {self.image_id}, "
                            "read-only")
            self.changed = True
            self.out(f"creating volume {volume.id} ({gib} GiB) from image "
                     f"{self.image_id}")
        volume = self.wait(volume, "image volume")
        if volume.metadata.get(META_IMAGE) != self.image_id:
            raise CinderError(f"volume {volume.id} ({name}) is not the "
                              f"volume of image {self.image_id}; rename or "
                              "delete it")
        if not getattr(volume, "multiattach", False):
            raise CinderError(f"volume {volume.id} is not multiattach; "
                              "delete it and export again")
        self.cinder.volumes.update_readonly_flag(volume, True)
        manifest_id = volume.metadata.get(META_MANIFEST_VOLUME)
        identity = volume.metadata.get(META_IDENTITY)
        manifest_volume = self.find(MANIFEST_VOLUME.format(self.image_id),
                                    manifest_id) if manifest_id else None
        if manifest_volume is None or not identity or \
                manifest_volume.status not in ("available", "in-use"):
            identity = self.publish_manifest(volume, size, vtype)
            manifest_id = self.manifest_volume_id
            self.changed = True
        else:
            self.out(f"manifest: volume {manifest_id}, identity "
                     f"{identity[:16]}... (already there)")
        props = {PROP_VOLUME: volume.id, PROP_IDENTITY: identity}
        # The Nova driver boots the image from this volume; an origin an
        # operator set to something else (export:NAME) is left alone.
        if str(image.get(PROP_ORIGIN, "cinder://")).startswith("cinder://"):
            props[PROP_ORIGIN] = f"cinder://{volume.id}"
        self.set_properties(image, props)
        message = (f"image {self.image_id}: Cinder volume {volume.id} "
                   f"(read-only, multiattach), manifest volume "
                   f"{manifest_id}; origin cinder://{volume.id}"
                   + ("" if self.changed else " (unchanged)"))
        self.out(message)
        return CinderExport(self.image_id, volume.id, manifest_id, identity,
                            int(volume.metadata.get(META_SIZE, size)),
                            self.chunk_size, self.changed, message)

    def publish_manifest(self, volume, size: int, vtype) -> str:
        started = time.monotonic()
        manifest = self.compute_manifest(volume, size)
        data = manifest.to_bytes()
        self.out(f"manifest: {manifest.chunks} chunks of "
                 f"{self.chunk_size} bytes read through an attachment in "
                 f"{time.monotonic() - started:.1f} s")
        name = MANIFEST_VOLUME.format(self.image_id)
        old = self.find(name)
        if old is not None:
            # A manifest volume of an export that did not finish.
            self.wait(old, "manifest volume")
            self.cinder.volumes.delete(old)
        mvol = self.cinder.volumes.create(
            max(1, -(-len(data) // GiB)), volume_type=vtype.id, name=name,
            metadata={META_MANIFEST_OF: volume.id, META_IMAGE:
                      self.image_id},
            description=f"vmthunder: chunk manifest of volume {volume.id}")
        mvol = self.wait(mvol, "manifest volume")
        self.write_volume(mvol, data + b"\0" * (-len(data) % SECTOR))
        self.cinder.volumes.update_readonly_flag(mvol, True)
        self.manifest_volume_id = mvol.id
        identity = manifest.identity()
        self.cinder.volumes.set_metadata(volume, {
            META_MANIFEST_VOLUME: mvol.id, META_IDENTITY: identity,
            META_SIZE: str(size)})
        self.out(f"manifest: volume {mvol.id}, identity {identity[:16]}...")
        return identity

    def compute_manifest(self, volume, size: int) -> manifest_mod.Manifest:
        att = cc.attach(self.cinder, volume.id, cc.connector(self.settings),
                        mode="ro")
        try:
            table = asyncio.run(_digest_volume(att, size, self.chunk_size,
                                               self.out))
        finally:
            cc.detach(self.cinder, att.id, volume.id)
        return manifest_mod.Manifest(f"glance:{self.image_id}", size,
                                     self.chunk_size, table=table)

    def write_volume(self, volume, data: bytes) -> None:
        """``data`` at the start of ``volume``, through a read-write
        attachment and qemu-img (CHAP secret passed in a 0600 file)."""
        att = cc.attach(self.cinder, volume.id, cc.connector(self.settings),
                        mode="rw")
        try:
            _qemu_write(att, data)
        finally:
            cc.detach(self.cinder, att.id, volume.id)


async def _digest_volume(att: cc.Attachment, size: int, chunk_size: int,
                         out) -> bytes:
    from vmthunder.volume.iscsi_source import IscsiSource
    digest = manifest_mod.HASHES[manifest_mod.ALGORITHM]
    source = await IscsiSource.open(att.url(), password=att.password)
    try:
        if source.lun_size < size:
            raise CinderError(f"volume {att.volume_id} has "
                              f"{source.lun_size} bytes, less than the "
                              f"image's {size}")
        table = bytearray()
        step = max(chunk_size, READ_STEP - READ_STEP % chunk_size)
        shown = time.monotonic()
        for pos in range(0, size, step):
            data = await source.read(pos, min(step, size - pos))
            view = memoryview(data)
            for off in range(0, len(data), chunk_size):
                table += digest(view[off:off + chunk_size]).digest()[
                    :manifest_mod.DIGEST_SIZE]
            if time.monotonic() - shown >= 5:
                out(f"manifest: {100 * (pos + len(data)) // size}% read")
                shown = time.monotonic()
        return bytes(table)
    finally:
        await source.close()


def _qemu_write(att: cc.Attachment, data: bytes) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise CinderError("qemu-img not found: install qemu-utils and "
                          "qemu-block-extra (its iSCSI driver)")
    host, _, port = att.portal.rpartition(":")
    with tempfile.TemporaryDirectory(prefix="vmthunder-manifest-") as tmp:
        src = os.path.join(tmp, "manifest.lun")
        with open(src, "wb") as f:
            f.write(data)
        opts = (f"driver=iscsi,transport=tcp,portal={host}:{port},"
                f"target={att.iqn},lun={att.lun}")
        objects = []
        if att.username:
            secret = os.path.join(tmp, "secret")
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
            with open(fd, "w") as f:
                f.write(att.password or "")
            objects = ["--object", f"secret,id=chap,file={secret}"]
            opts += f",user={att.username},password-secret=chap"
        proc = subprocess.run(
            [qemu_img, "convert", "-n", "-q", *objects, "-f", "raw", src,
             "--target-image-opts", opts],
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = proc.stderr.strip().replace("\n", "; ")
            if att.password:
                msg = msg.replace(att.password, "***")
            raise CinderError(f"writing the manifest into volume "
                              f"{att.volume_id} failed: {msg}")
