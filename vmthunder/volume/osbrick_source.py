"""An iSCSI LUN attached by the kernel initiator through os-brick.

Where a compute host has a kernel iSCSI initiator (open-iscsi's
``iscsiadm`` and the ``iscsi_tcp`` kernel module), the image LUN can be
attached the way Nova attaches Cinder volumes: os-brick's iSCSI connector
logs in with ``iscsiadm``, waits for the SCSI disk to appear and returns
its path (``/dev/sdX``). :class:`OsBrickSource` reads that block device
through :mod:`vmthunder.fileio` (page cache first, worker threads when a
read would wait), like :class:`~vmthunder.volume.file_source.FileSource`
reads a file. Connection recovery is then the kernel's (iscsid's
``replacement_timeout``), not :class:`~vmthunder.volume.iscsi_session.
IscsiSession`'s.

The manifest LUN (LUN 2 by convention) is attached and read the same way,
the LUN size is checked against it as
:meth:`~vmthunder.volume.iscsi_source.IscsiSource.open` does, and
:meth:`OsBrickSource.identity` is the same string IscsiSource gives for
the same LUN and manifest, so a cache filled through one attach path is
reused through the other.

:func:`kernel_initiator_available` and :func:`choose_attach` decide
between this source and the userspace one (``[iscsi] attach``).
os-brick calls block for seconds (iscsiadm logins, device scans), so
they run in worker threads; os-brick is imported only when used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shlex
import shutil

from vmthunder import blockdev
from vmthunder import fileio
from vmthunder.blockdev import BlockError
from vmthunder.volume import iscsi_url
from vmthunder.volume import manifest as manifest_mod
from vmthunder.volume.iscsi_manifest import MAX_MANIFEST_BYTES

LOG = logging.getLogger(__name__)

ATTACH_MODES = ("auto", "userspace", "kernel")
DEFAULT_ROOT_HELPER = "sudo"
# os-brick serialises connect/disconnect with file locks in
# [os_brick] lock_path (else [oslo_concurrency] lock_path); used when
# neither is set.
DEFAULT_LOCK_PATH = "/run/vmthunder/os-brick-locks"
# Largest read handed to one pread (reads are split beyond it).
MAX_READ = 4 << 20


# -- is there a kernel initiator? -------------------------------------

def kernel_initiator_available(*, sys_root: str = "/",
                               which=shutil.which,
                               release: str | None = None
                               ) -> tuple[bool, str]:
    """``(True, why)`` when os-brick can attach an iSCSI LUN here.

    Needs both halves of open-iscsi: the ``iscsiadm`` tool on PATH (what
    os-brick runs to log in), and an iSCSI/TCP initiator in the kernel:
    loaded or built in (``/sys/module/iscsi_tcp``, or the ``tcp`` entry
    of ``/sys/class/iscsi_transport``), or loadable (``iscsi_tcp`` in
    ``/lib/modules/RELEASE/modules.dep`` or ``modules.builtin``; iscsid
    loads it at the first login). A normal compute host with open-iscsi
    installed passes both; a container or sandbox without kernel SCSI
    (no /lib/modules, no iscsi_tcp in /sys/module) does not, even with
    iscsiadm installed, since the login would fail in the kernel.
    ``sys_root``, ``which`` and ``release`` are for tests.
    """
    def path(*parts: str) -> str:
        return os.path.join(sys_root, *parts)

    tool = which("iscsiadm")
    if tool is None:
        return False, ("iscsiadm is not on PATH (install open-iscsi to "
                       "attach iSCSI LUNs with the kernel initiator)")
    release = release or platform.release()
    loaded = [p for p in (path("sys", "module", "iscsi_tcp"),
                          path("sys", "class", "iscsi_transport", "tcp"))
              if os.path.exists(p)]
    if loaded:
        return True, (f"{tool} found and the kernel has an iSCSI "
                      f"initiator ({loaded[0]} exists)")
    mod_dir = path("lib", "modules", release)
    for name in ("modules.dep", "modules.builtin"):
        try:
            with open(os.path.join(mod_dir, name), errors="replace") as f:
                if any("/iscsi_tcp.ko" in line for line in f):
                    return True, (f"{tool} found and kernel {release} has "
                                  f"the iscsi_tcp module ({name})")
        except OSError:
            continue
    return False, (f"{tool} found but kernel {release} has no iSCSI "
                   f"initiator: no /sys/module/iscsi_tcp, and no iscsi_tcp "
                   f"module in {mod_dir}")


def os_brick_available() -> tuple[bool, str]:
    """``(True, version)`` when os-brick is installed.

    Looks it up without importing it: importing os-brick imports
    oslo.privsep and eventlet, which a process that will not attach
    through the kernel has no use for. A broken install fails later, in
    :meth:`OsBrickSource.open`, with ENODEV and the import error.
    """
    try:
        found = importlib.util.find_spec("os_brick") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, ("os-brick is not installed (pip install os-brick "
                       "to attach with the kernel initiator)")
    try:
        return True, f"os-brick {importlib.metadata.version('os-brick')}"
    except importlib.metadata.PackageNotFoundError:
        return True, "os-brick"


def choose_attach(mode: str = "auto", *,
                  kernel_check=kernel_initiator_available,
                  brick_check=os_brick_available) -> tuple[str, str]:
    """``("kernel"|"userspace", reason)`` for ``[iscsi] attach = mode``.

    ``auto`` takes the kernel path when there is a kernel initiator and
    os-brick imports, else the userspace initiator; ``kernel`` without
    them is an error (:class:`~vmthunder.blockdev.BlockError`, ENODEV)
    saying what is missing.
    """
    if mode not in ATTACH_MODES:
        raise ValueError(f"bad [iscsi] attach {mode!r}: one of "
                         f"{', '.join(ATTACH_MODES)}")
    if mode == "userspace":
        return "userspace", "[iscsi] attach = userspace"
    ok, why = kernel_check()
    if ok:
        ok, brick = brick_check()
        why = f"{why}; {brick}"
    if ok:
        return "kernel", f"[iscsi] attach = {mode}: {why}"
    if mode == "kernel":
        raise BlockError(errno.ENODEV, f"[iscsi] attach = kernel, but this "
                         f"host cannot attach iSCSI LUNs with the kernel "
                         f"initiator: {why}. Use attach = auto or "
                         f"userspace (libiscsi) here.")
    return "userspace", f"[iscsi] attach = auto: {why}"


# -- os-brick ----------------------------------------------------------

def make_connector(root_helper: str | None = None, *,
                   lock_path: str = DEFAULT_LOCK_PATH):
    """os-brick's iSCSI connector (single path), set up for use.

    os-brick runs iscsiadm through oslo.privsep. ``root_helper`` None
    in a process that is already root runs those calls in-process (no
    privsep daemon, no sudo needed); otherwise the privsep daemon is
    started through ``root_helper`` (default ``sudo``, or e.g.
    ``sudo vmthunder-rootwrap /etc/vmthunder/rootwrap.conf``).
    """
    from oslo_config import cfg
    from oslo_privsep import priv_context

    import os_brick
    import os_brick.privileged
    from os_brick.initiator import connector as brick_connector
    conf = cfg.CONF
    os_brick.setup(conf)
    if not conf.os_brick.lock_path:
        os.makedirs(lock_path, mode=0o700, exist_ok=True)
        conf.set_default("lock_path", lock_path, "os_brick")
    if root_helper is None and os.geteuid() == 0:
        for ctx in (os_brick.privileged.default,
                    os_brick.privileged.brick_privsep_hide_output):
            ctx.set_client_mode(False)
        root_helper = ""
    else:
        root_helper = root_helper or DEFAULT_ROOT_HELPER
        priv_context.init(root_helper=shlex.split(root_helper))
    return brick_connector.InitiatorConnector.factory(
        "ISCSI", root_helper, use_multipath=False)


def connection_properties(url: iscsi_url.IscsiUrl, lun: int, *,
                          volume_id: str | None = None) -> dict:
    """What os-brick's ISCSIConnector.connect_volume takes for ``lun``."""
    props = {
        "target_portal": str(url.portal),
        "target_iqn": url.target,
        "target_lun": lun,
        "target_discovered": False,
        "encrypted": False,
        "volume_id": volume_id or f"vmthunder:{url.target}:{lun}",
    }
    if url.username:
        props.update(auth_method="CHAP", auth_username=url.username,
                     auth_password=url.password or "")
    return props


class _Attachment:
    """One LUN attached through os-brick, and its open block device."""

    def __init__(self, connector, props: dict, where: str):
        self.connector = connector
        self.props = props
        self.where = where
        self.device_info: dict | None = None
        self.path: str | None = None
        self.fd: int | None = None
        self.size = 0

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.connector.connect_volume,
                                   dict(self.props))
        try:
            info = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped: undo the attach it may still
            # complete, so a cancelled open leaks no session or device.
            fut.add_done_callback(self._undo_late_attach)
            raise
        except Exception as exc:
            raise BlockError(_attach_errno(exc), f"cannot attach "
                             f"{self.where} with os-brick: "
                             f"{_brick_text(exc)}") from None
        self.device_info = info
        path = (info or {}).get("path")
        if not path:
            await self.detach()
            raise BlockError(errno.EIO, f"os-brick attached {self.where} "
                             f"but returned no device path ({info!r})")
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            await self.detach()
            raise BlockError(exc.errno or errno.EIO, f"{self.where} is "
                             f"attached as {path}, which cannot be read: "
                             f"{exc.strerror}") from None

    def _undo_late_attach(self, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        info = fut.result()
        LOG.warning("%s: attach finished after it was abandoned; "
                    "disconnecting it", self.where)
        asyncio.get_running_loop().run_in_executor(
            None, self._disconnect_quietly, info)

    def _disconnect_quietly(self, info) -> None:
        try:
            self.connector.disconnect_volume(dict(self.props), info)
        except Exception as exc:
            LOG.error("disconnecting %s failed: %s", self.where,
                      _brick_text(exc))

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    async def detach(self) -> None:
        """Close the device and disconnect the volume (idempotent)."""
        self.close_fd()
        if self.device_info is None:
            return
        info, self.device_info = self.device_info, None
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.connector.disconnect_volume,
                                        dict(self.props), info))
        except Exception as exc:
            LOG.error("disconnecting %s (%s) failed: %s", self.where,
                      self.path, _brick_text(exc))


def _brick_text(exc: BaseException) -> str:
    """One line: os-brick's ProcessExecutionError spans several."""
    text = str(exc).strip() or type(exc).__name__
    stderr = getattr(exc, "stderr", None)
    if stderr and str(stderr).strip() not in text:
        text = f"{text} ({str(stderr).strip()})"
    return "; ".join(line.strip() for line in text.splitlines()
                     if line.strip())


def _attach_errno(exc: BaseException) -> int:
    text = _brick_text(exc).lower()
    if "auth" in text:                   # iscsiadm: login/auth failure
        return errno.EACCES
    if "not found" in text or "no such" in text:
        return errno.ENOENT
    return errno.EIO


# -- block device layer ------------------------------------------------

class OsBrickSource(blockdev.BlockDevice):
    """A read-only block layer reading an iSCSI LUN the kernel attached.

    Open it with :meth:`open`; :meth:`close` closes the devices and
    disconnects the image and manifest LUNs.
    """

    capabilities = blockdev.Capabilities(writable=False)

    def __init__(self, url: iscsi_url.IscsiUrl, image: _Attachment, *,
                 manifest: manifest_mod.Manifest | None = None,
                 manifest_attachment: _Attachment | None = None):
        self.url = url
        self.target = url.target
        self.lun = url.lun
        self.path = image.path
        self.lun_size = image.size
        self.manifest = manifest
        self.size = manifest.size if manifest is not None else image.size
        self._image = image
        self._manifest_att = manifest_attachment
        self._bytes_read = 0
        self._reads = 0
        self._closed = False

    @classmethod
    async def open(cls, url: str | iscsi_url.IscsiUrl, *,
                   password: str | None = None,
                   manifest_lun: int | None = 2,
                   connector=None,
                   root_helper: str | None = None) -> OsBrickSource:
        """Attach the LUN (and the manifest LUN), check, return the layer.

        ``url`` is ``iscsi://[user[%password]@]host[:port]/IQN/LUN``
        (:func:`~vmthunder.volume.iscsi_url.parse_iscsi_url`);
        ``password`` overrides the URL's. ``manifest_lun`` None (or 0)
        attaches no manifest: nothing is checked. ``connector`` is an
        os-brick connector (anything with ``connect_volume(props)`` and
        ``disconnect_volume(props, device_info)``); None builds os-brick's
        iSCSI connector with ``root_helper`` (see :func:`make_connector`:
        None runs iscsiadm in-process when root, else through sudo).
        """
        if isinstance(url, str):
            url = iscsi_url.parse_iscsi_url(url, password=password)
        elif password is not None:
            url = dataclasses.replace(url, password=password)
        manifest_lun = manifest_lun or None
        if manifest_lun is not None and manifest_lun == url.lun:
            raise ValueError(f"manifest LUN {manifest_lun} is the image "
                             "LUN itself")
        if connector is None:
            loop = asyncio.get_running_loop()
            try:
                connector = await loop.run_in_executor(
                    None, make_connector, root_helper)
            except Exception as exc:
                raise BlockError(errno.ENODEV, f"cannot set up os-brick's "
                                 f"iSCSI connector for {_where(url, url.lun)}"
                                 f": {_brick_text(exc)}") from None
        image = _Attachment(connector, connection_properties(url, url.lun),
                            _where(url, url.lun))
        await image.attach()
        mf_att = None
        try:
            manifest = None
            if manifest_lun is not None:
                mf_att = _Attachment(
                    connector, connection_properties(url, manifest_lun),
                    f"manifest {_where(url, manifest_lun)}")
                await mf_att.attach()
                manifest = await _read_manifest(mf_att)
                mf_att.close_fd()
                if not manifest.size <= image.size < manifest.size + 512:
                    raise BlockError(
                        errno.EINVAL,
                        f"iSCSI LUN {url.target}/{url.lun} (attached as "
                        f"{image.path}): LUN size {image.size} disagrees "
                        f"with its manifest ({manifest.size}, LUN "
                        f"{manifest_lun}); refusing to serve it")
            elif image.size == 0:
                raise BlockError(errno.EINVAL, f"{image.where} (attached "
                                 f"as {image.path}) is empty")
        except BaseException:
            if mf_att is not None:
                await mf_att.detach()
            await image.detach()
            raise
        LOG.info("attached %s as %s%s", image.where, image.path,
                 f" (manifest as {mf_att.path})" if mf_att else "")
        return cls(url, image, manifest=manifest,
                   manifest_attachment=mf_att)

    def identity(self) -> str:
        """As :meth:`IscsiSource.identity`: the manifest's, else the
        target, LUN and LUN size."""
        if self.manifest is not None:
            return self.manifest.identity()
        return f"iscsi:{self.target}/{self.lun}:{self.lun_size}"

    def describe(self) -> str:
        return (f"iSCSI LUN {self.target}/{self.lun} at {self.url.portal} "
                f"(kernel, {self.path})")

    def stats(self) -> dict:
        return {"bytes_read": self._bytes_read, "reads": self._reads}

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        fd = self._image.fd
        if self._closed or fd is None:
            raise BlockError(errno.EIO, f"{self.describe()} is closed")
        try:
            if length <= MAX_READ:
                data = await fileio.pread(fd, length, offset)
            else:
                parts = await asyncio.gather(*(
                    fileio.pread(fd, min(MAX_READ, length - pos),
                                 offset + pos)
                    for pos in range(0, length, MAX_READ)))
                data = b"".join(parts)
        except OSError as exc:
            raise BlockError(exc.errno or errno.EIO,
                             f"{self.describe()}: read at offset {offset} "
                             f"length {length}: {exc.strerror}") from None
        if len(data) != length:
            raise BlockError(errno.EIO, f"{self.describe()}: only "
                             f"{len(data)} of {length} bytes at offset "
                             f"{offset} (device shrank?)")
        self._reads += 1
        self._bytes_read += length
        return data

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._manifest_att is not None:
            await self._manifest_att.detach()
        await self._image.detach()


def _where(url: iscsi_url.IscsiUrl, lun: int) -> str:
    return f"iSCSI LUN {url.target}/{lun} at portal {url.portal}"


async def _read_manifest(att: _Attachment) -> manifest_mod.Manifest:
    where = att.where
    size = att.size
    if size > MAX_MANIFEST_BYTES:
        raise BlockError(errno.EINVAL, f"{where} is {size} bytes; a "
                         f"manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        parts = await asyncio.gather(*(
            fileio.pread(att.fd, min(MAX_READ, size - pos), pos)
            for pos in range(0, size, MAX_READ)))
    except OSError as exc:
        raise BlockError(errno.EINVAL, f"cannot read the {where}: "
                         f"{exc.strerror}") from None
    try:
        return manifest_mod.Manifest.from_bytes(b"".join(parts),
                                                where=where)
    except manifest_mod.ManifestError as exc:
        raise BlockError(errno.EINVAL, str(exc)) from None
