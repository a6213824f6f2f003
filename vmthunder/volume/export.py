"""`vmthunder export`: an image as a read-only iSCSI LUN plus its manifest.

The origin side of vmthunder. An export named NAME lives in
``<export_dir>/NAME/``:

    volume.raw     the image as raw bytes, padded with zeros to a multiple
                   of 512 (tgtd drops a partial last sector; QEMU reads a
                   raw file of such a size as padded the same way)
    manifest.bin   its chunk manifest (vmthunder.volume.manifest) over
                   volume.raw: size, chunk size, a digest of every chunk
                   (exports made before version 2: manifest.json)
    manifest.lun   the same bytes NUL-padded to a multiple of 512
    chap.json      CHAP user and secret, mode 0600 (only with --chap)
    trace.lun      a boot trace of the image, NUL-padded to a multiple of
                   512, once one is published (`vmthunder trace publish`,
                   vmthunder/volume/published_trace.py); its size and
                   digest are in the manifest's header
    export.json    the record: name, IQN, portal, tid, size, chunk size,
                   CHAP user (not the secret), source, time. Written last:
                   a directory without it is a crashed export, discarded.

tgtd serves the target ``<iqn_prefix>:NAME`` with LUN 1 = volume.raw and
LUN 2 = manifest.lun, both read-only (and LUN 3 = trace.lun when a trace
is published). The manifest reaches compute hosts
through the very target they attach (one more LUN: no second service, the
same CHAP and ACL, and a cloud operator who moves the LUN into a Cinder
volume moves its manifest with it).

The store is a copy (reflinked where the filesystem can): the export does
not change when the original file does. tgtd forgets its targets when it
stops; every `vmthunder export` and `vmthunder exports --restore`
re-creates those of all recorded exports, on the tid each was given.
All changes to the store and to tgtd happen under one lock
(``<export_dir>/.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time

from vmthunder import privileged
from vmthunder.volume import manifest as manifest_mod
from vmthunder.volume import tgt as tgt_mod

LOG = logging.getLogger(__name__)

SECTOR = 512
LUN_VOLUME = 1
LUN_MANIFEST = 2
LUN_TRACE = 3
VOLUME = "volume.raw"
MANIFEST = "manifest.bin"
# What exports made before manifest version 2 call it.
MANIFEST_V1 = "manifest.json"
MANIFEST_LUN = "manifest.lun"
TRACE_LUN = "trace.lun"
CHAP = "chap.json"
RECORD = "export.json"
RECORD_VERSION = 1

# An iSCSI name allows lower-case letters, digits, '.', '-' (and ':' as a
# separator, kept for the prefix); the name is a directory name too.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


class ExportError(RuntimeError):
    """An export operation failed; the message names what and what to do."""


@dataclasses.dataclass
class ExportConfig:
    export_dir: str
    portal: str
    control_port: int
    iqn_prefix: str
    chunk_size: int
    initiator_addresses: tuple[str, ...] = ("ALL",)
    tgtd_start_timeout: float = 10.0
    # Network namespace tgtd is started in (None: this one).
    netns: str | None = None

    @classmethod
    def from_conf(cls, group, export_dir: str | None = None
                  ) -> ExportConfig:
        """From the oslo.config [export] group; flags may override."""
        return cls(export_dir=os.path.abspath(export_dir or
                                              group.export_dir),
                   portal=group.portal,
                   control_port=group.tgtd_control_port,
                   iqn_prefix=group.iqn_prefix,
                   chunk_size=group.chunk_size,
                   initiator_addresses=tuple(group.initiator_addresses),
                   tgtd_start_timeout=group.tgtd_start_timeout)

    def dir_of(self, name: str) -> str:
        return os.path.join(self.export_dir, name)

    def iqn_of(self, name: str) -> str:
        return f"{self.iqn_prefix}:{name}"

    def tgt(self, portal: str | None = None) -> tgt_mod.Tgt:
        return tgt_mod.Tgt(self.control_port, portal or self.portal,
                           self.export_dir, self.tgtd_start_timeout,
                           netns=self.netns)


@dataclasses.dataclass
class Record:
    """export.json: what tgtd must serve for one export."""
    name: str
    iqn: str
    portal: str
    tid: int
    size: int
    chunk_size: int
    manifest_identity: str
    source: str
    source_format: str
    created: str
    chap_user: str | None = None
    exported: bool = True
    version: int = RECORD_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=1) +
                "\n").encode()

    @classmethod
    def load(cls, path: str) -> Record:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            fields = {f.name for f in dataclasses.fields(cls)}
            record = cls(**{k: v for k, v in doc.items() if k in fields})
        except (OSError, ValueError, TypeError) as exc:
            raise ExportError(f"export record {path} is unreadable ({exc}); "
                              "remove its directory or restore the "
                              "file") from None
        if record.version != RECORD_VERSION:
            raise ExportError(f"export record {path} has version "
                              f"{record.version}; this vmthunder reads "
                              f"version {RECORD_VERSION}")
        return record

    def url(self, lun: int) -> str:
        return iscsi_url(self.portal, self.iqn, lun)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    # What the export records as its source (the path, unless set: e.g.
    # glance://ID for an image fetched from Glance).
    source: str = ""
    # A temporary file made for the export (an image fetched from
    # Glance): a raw one is moved into the export, not copied, and it is
    # removed once the export is done, whatever happened.
    owned: bool = False

    @property
    def label(self) -> str:
        return self.source or self.path


# --- helpers --------------------------------------------------------------


def check_name(name: str) -> None:
    # fullmatch: "$" would let a trailing newline into a target name.
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ExportError(
            f"export name {name!r} is not allowed: use 1 to 63 lower-case "
            "letters, digits, '.' and '-', starting with a letter or digit "
            "(it becomes part of the iSCSI target name and a directory "
            "name), e.g. 'debian-12'")


def check_chunk_size(chunk_size: int) -> None:
    if not (4096 <= chunk_size <= 64 << 20) or \
            chunk_size & (chunk_size - 1):
        raise ExportError(f"chunk size {chunk_size} is not a power of two "
                          "from 4 KiB to 64 MiB (examples: 64K, 256K, 1M)")


def check_portal(portal: str) -> None:
    try:
        tgt_mod.split_portal(portal)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def iscsi_url(portal: str, iqn: str, lun: int) -> str:
    """The iscsi:// URL (QEMU, libiscsi) of a LUN behind ``portal``."""
    host, port = tgt_mod.split_portal(portal)
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"iscsi://{host}:{port}/{iqn}/{lun}"


def human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) \
                else f"{value:.1f} {unit}"
    return f"{size} B"


def _pad(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise ExportError("qemu-img not found: install the Debian package "
                          "'qemu-utils' (scripts/install.sh does)")
    return path


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        raise ExportError(f"{what} failed: {msg or f'exit {proc.returncode}'}")
    return proc.stdout


def inspect_image(path: str) -> ImageInfo:
    """Check that ``path`` is a readable image; its format and size."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ExportError(f"image {path} does not exist; give the path of a "
                          "raw or qcow2 image file")
    if os.path.isdir(path):
        raise ExportError(f"image {path} is a directory; give the path of "
                          "a raw or qcow2 image file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ExportError(f"image {path} is not readable ({exc.strerror}); "
                          "check its permissions") from None
    proc = subprocess.run([_qemu_img(), "info", "--output=json", path],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().replace("\n", "; ")
        raise ExportError(f"image {path} is not in a format qemu-img can "
                          f"read ({msg}); export takes raw or qcow2 "
                          "images (or another format qemu-img converts)")
    info = json.loads(proc.stdout)
    fmt = info.get("format", "")
    if info.get("encrypted") or fmt == "luks":
        raise ExportError(f"image {path} ({fmt}) is encrypted; decrypt it "
                          "first (qemu-img convert --object secret,... "
                          "-O raw)")
    size = int(info.get("virtual-size", 0))
    if size <= 0:
        raise ExportError(f"image {path} is empty; nothing to export")
    return ImageInfo(path, fmt, size)


def _store_volume(info: ImageInfo, dest: str) -> int:
    """Copy or convert the image to a raw file padded to 512; its size."""
    if info.format == "raw" and info.owned:
        os.rename(info.path, dest)          # same file system: no copy
    elif info.format == "raw":
        # Reflinks where the filesystem can, keeps holes; never a hard
        # link: later edits of the original must not reach the export.
        _run(["cp", "--reflink=auto", "--sparse=auto", info.path, dest],
             f"copying {info.path} to {dest}")
    else:
        _run([_qemu_img(), "convert", "-f", info.format, "-O", "raw",
              info.path, dest],
             f"converting {info.path} ({info.format}) to raw")
    size = _pad(os.path.getsize(dest))
    if size != _pad(info.virtual_size):
        raise ExportError(f"image {info.label} changed while it was copied "
                          f"({info.virtual_size} bytes before, {size} "
                          "after); export it again when it is not written")
    with open(dest, "r+b") as f:
        f.truncate(size)
    return size


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def _write_record(directory: str, record: Record) -> None:
    tmp = os.path.join(directory, RECORD + ".tmp")
    _write(tmp, record.to_json())
    os.replace(tmp, os.path.join(directory, RECORD))
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_chap(cfg: ExportConfig, name: str) -> tuple[str, str]:
    path = os.path.join(cfg.dir_of(name), CHAP)
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc["user"], doc["secret"]
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"CHAP credentials of export {name} ({path}) are "
                          f"unreadable: {exc}") from None


def read_record(cfg: ExportConfig, name: str) -> Record | None:
    path = os.path.join(cfg.dir_of(name), RECORD)
    if not os.path.exists(path):
        return None
    return Record.load(path)


def read_records(cfg: ExportConfig) -> tuple[list[Record], list[str]]:
    """All records (by name) and the problems of unreadable ones."""
    records, problems = [], []
    try:
        names = sorted(os.listdir(cfg.export_dir))
    except FileNotFoundError:
        return [], []
    for name in names:
        if name.startswith(".") or not os.path.isfile(
                os.path.join(cfg.dir_of(name), RECORD)):
            continue
        try:
            records.append(Record.load(os.path.join(cfg.dir_of(name),
                                                    RECORD)))
        except ExportError as exc:
            problems.append(str(exc))
    return records, problems


@contextlib.contextmanager
def _locked(cfg: ExportConfig, out):
    try:
        os.makedirs(cfg.export_dir, exist_ok=True)
        fd = os.open(os.path.join(cfg.export_dir, ".lock"),
                     os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ExportError(f"export directory {cfg.export_dir} is not "
                          f"usable ({exc.strerror}); set [export] "
                          "export_dir or --export-dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"waiting for another vmthunder export/unexport in "
                f"{cfg.export_dir} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_tid(cfg: ExportConfig, targets: list[tgt_mod.Target]) -> int:
    records, _ = read_records(cfg)
    used = {t.tid for t in targets} | {r.tid for r in records}
    tid = 1
    while tid in used:
        tid += 1
    return tid


def _serves(target: tgt_mod.Target, record: Record, cfg: ExportConfig,
            accounts: list[str], check_acl: bool = True) -> bool:
    """Does ``target`` in tgtd serve what ``record`` says, read-only?"""
    directory = cfg.dir_of(record.name)
    for number, filename in _luns(directory):
        lun = target.lun(number)
        if lun is None or not lun.readonly or \
                lun.backing_path != os.path.join(directory, filename):
            return False
    if record.chap_user and (record.chap_user not in target.accounts or
                             record.chap_user not in accounts):
        return False
    return not check_acl or all(a in target.acl
                                for a in cfg.initiator_addresses)


def _luns(directory: str) -> list[tuple[int, str]]:
    """(LUN, file) an export's target serves."""
    luns = [(LUN_VOLUME, VOLUME), (LUN_MANIFEST, MANIFEST_LUN)]
    if os.path.isfile(os.path.join(directory, TRACE_LUN)):
        luns.append((LUN_TRACE, TRACE_LUN))
    return luns


def _ensure_target(cfg: ExportConfig, tgt: tgt_mod.Tgt,
                   record: Record) -> str:
    """Make tgtd serve ``record``; 'present' or 'created'."""
    directory = cfg.dir_of(record.name)
    for filename in (VOLUME, MANIFEST_LUN):
        if not os.path.isfile(os.path.join(directory, filename)):
            raise ExportError(
                f"export {record.name}: {os.path.join(directory, filename)}"
                f" is missing; remove it with `vmthunder unexport "
                f"{record.name}` and export the image again")
    tgt.ensure_portal(record.portal)
    targets = tgt.targets()
    accounts = tgt.accounts() if record.chap_user else []
    current = next((t for t in targets if t.name == record.iqn), None)
    if current is not None:
        if _serves(current, record, cfg, accounts, check_acl=False):
            # A start that died before the bind leaves a target no one
            # may log in to; binding is additive, sessions stay.
            for address in cfg.initiator_addresses:
                if address not in current.acl:
                    tgt.bind_initiators(current.tid, address)
            if current.tid != record.tid:
                record.tid = current.tid
                _write_record(directory, record)
            return "present"
        LOG.warning("target %s (tid %d) does not serve export %s as "
                    "recorded; re-creating it", record.iqn, current.tid,
                    record.name)
        tgt.delete_target(current.tid)
        targets.remove(current)
    if any(t.tid == record.tid for t in targets):
        taken = record.tid
        record.tid = _free_tid(cfg, targets)
        LOG.warning("tid %d is taken in tgtd; export %s moves to tid %d",
                    taken, record.name, record.tid)
        _write_record(directory, record)
    tid = record.tid
    tgt.create_target(tid, record.iqn)
    try:
        for number, filename in _luns(directory):
            tgt.add_lun(tid, number, os.path.join(directory, filename))
        if record.chap_user:
            user, secret = read_chap(cfg, record.name)
            if user in accounts:
                # tgtd cannot show a secret: set the stored one anew.
                tgt.delete_account(user)
            tgt.create_account(user, secret)
            tgt.bind_account(tid, user)
        # Bound last: no initiator gets in before the target is complete.
        for address in cfg.initiator_addresses:
            tgt.bind_initiators(tid, address)
    except BaseException:
        with contextlib.suppress(Exception):
            tgt.delete_target(tid)
        raise
    return "created"


def _restore(cfg: ExportConfig, tgt: tgt_mod.Tgt, out,
             skip: str | None = None) -> list[str]:
    """Re-create the targets of every recorded export; errors as text."""
    records, problems = read_records(cfg)
    for record in records:
        if not record.exported or record.name == skip:
            continue
        try:
            if _ensure_target(cfg, tgt, record) == "created":
                out(f"restored export {record.name}: {record.iqn} tid "
                    f"{record.tid} on {record.portal}")
        except (ExportError, tgt_mod.TgtError,
                privileged.PrivilegedError) as exc:
            problems.append(f"export {record.name}: {exc}")
    return problems


def _manifest_of(cfg: ExportConfig, info: ImageInfo, name: str,
                 chunk_size: int, like: dict) -> manifest_mod.Manifest:
    """The manifest the image would get, without storing it; ``like``
    gives the algorithm, digest size and version (_stored_format)."""
    if info.format == "raw" and os.path.isfile(info.path) and \
            os.path.getsize(info.path) % SECTOR == 0:
        return manifest_mod.build_manifest(info.path, name, chunk_size,
                                           **like)
    scratch = os.path.join(cfg.export_dir, f".compare-{name}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    try:
        volume = os.path.join(scratch, VOLUME)
        _store_volume(info, volume)
        return manifest_mod.build_manifest(volume, name, chunk_size,
                                           **like)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the operations -------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    record: Record
    changed: bool
    message: str


def _print(text: str) -> None:
    print(text, flush=True)


def export_image(cfg: ExportConfig, image: str, name: str, *,
                 chunk_size: int | None = None, chap: bool = False,
                 portal: str | None = None, out=_print) -> ExportResult:
    """Store, digest and export ``image`` as export ``name``.

    Idempotent: the same content under the same name again changes
    nothing (and re-creates its target if tgtd lost it); other content
    under an existing name is an error.
    """
    check_arguments(cfg, name, chunk_size, portal)
    info = inspect_image(image)
    privileged.require_root("vmthunder export")
    return export_prepared(cfg, lambda: info, name, chunk_size=chunk_size,
                           chap=chap, portal=portal, out=out)


def check_arguments(cfg: ExportConfig, name: str, chunk_size: int | None,
                    portal: str | None) -> None:
    """ExportError unless the name, chunk size and portal are usable."""
    check_name(name)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    check_chunk_size(cfg.chunk_size)
    if portal is not None:
        check_portal(portal)
    check_portal(cfg.portal)


def export_prepared(cfg: ExportConfig, prepare, name: str, *,
                    chunk_size: int | None = None, chap: bool = False,
                    portal: str | None = None,
                    out=_print) -> ExportResult:
    """export_image() of the image ``prepare()`` gives (an ImageInfo),
    called once this export holds the store's lock (an image fetched for
    the export is fetched there). An ``owned`` image file is removed at
    the end, whatever happened. Arguments checked, root required by the
    caller."""
    tgt = cfg.tgt(portal)
    with _locked(cfg, out):
        info = None
        try:
            info = prepare()
            tgt.ensure_running()
            problems = _restore(cfg, tgt, out, skip=name)
            for problem in problems:
                print(f"vmthunder export: warning: {problem}",
                      file=sys.stderr)
            record = read_record(cfg, name)
            if record is not None:
                return _reexport(cfg, tgt, record, info, chunk_size, chap,
                                 portal, out)
            return _new_export(cfg, tgt, info, name, chunk_size or
                               cfg.chunk_size, chap, portal or cfg.portal,
                               out)
        finally:
            if info is not None and info.owned:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(info.path)


def _other_content(record: Record, info: ImageInfo, why: str) -> ExportError:
    return ExportError(
        f"export {record.name} exists with other content ({why}; it holds "
        f"{record.source}, exported {record.created}); unexport it first "
        f"(`vmthunder unexport {record.name}`) or pick another name for "
        f"{info.label}")


def _stored_format(cfg: ExportConfig, name: str) -> dict:
    """build_manifest's algorithm, digest_size and version for export
    ``name``: those of its stored manifest (an older export may use other
    ones than new exports do)."""
    directory = cfg.dir_of(name)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        path = os.path.join(directory, MANIFEST_V1)
    try:
        with open(path, "rb") as f:
            m = manifest_mod.Manifest.from_bytes(f.read(), path)
        return {"algorithm": m.algorithm, "digest_size": m.digest_size,
                "version": m.version}
    except (OSError, manifest_mod.ManifestError) as exc:
        LOG.warning("export %s: cannot read %s (%s); comparing with a new "
                    "manifest", name, path, exc)
        return {}


def _reexport(cfg, tgt, record: Record, info: ImageInfo, chunk_size, chap,
              portal, out) -> ExportResult:
    name = record.name
    if _pad(info.virtual_size) != record.size:
        raise _other_content(record, info, "the image has "
                             f"{_pad(info.virtual_size)} bytes, the "
                             f"export {record.size}")
    started = time.monotonic()
    # Digest with the export's own algorithm (an older export may use
    # another than new ones do).
    manifest = _manifest_of(cfg, info, name, record.chunk_size,
                            _stored_format(cfg, name))
    if manifest.identity() != record.manifest_identity:
        raise _other_content(record, info, "the chunk digests differ")
    LOG.info("export %s: same content (checked in %.1f s)", name,
             time.monotonic() - started)
    if chunk_size is not None and chunk_size != record.chunk_size:
        raise ExportError(
            f"export {name} exists with the same content but chunk size "
            f"{record.chunk_size}, not {chunk_size}; unexport it first to "
            "change the chunk size")
    if chap != bool(record.chap_user):
        raise ExportError(
            f"export {name} exists with the same content and CHAP "
            f"{'on' if record.chap_user else 'off'}; "
            f"{'add --chap' if record.chap_user else 'drop --chap'}, or "
            "unexport it first to change that")
    if portal is not None and portal != record.portal:
        raise ExportError(
            f"export {name} exists with the same content on portal "
            f"{record.portal}, not {portal}; unexport it first to move it")
    was_exported = record.exported
    action = _ensure_target(cfg, tgt, record)
    if not was_exported:
        record.exported = True
        _write_record(cfg.dir_of(name), record)
        message = (f"export {name}: exported again from the data kept at "
                   "unexport (same content)")
    elif action == "created":
        message = (f"export {name}: same content, unchanged; its target "
                   "was missing in tgtd and is re-created")
    else:
        message = f"export {name}: same content, unchanged"
    out(message)
    _print_urls(record, out, cfg)
    return ExportResult(record, not was_exported or action == "created",
                        message)


def _new_export(cfg, tgt, info: ImageInfo, name: str, chunk_size: int,
                chap: bool, portal: str, out) -> ExportResult:
    final = cfg.dir_of(name)
    if os.path.exists(final):
        # No record: an export that crashed half-way. Start again.
        LOG.warning("discarding incomplete export directory %s", final)
        shutil.rmtree(final)
    staging = os.path.join(cfg.export_dir, f".staging-{name}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        started = time.monotonic()
        volume = os.path.join(staging, VOLUME)
        size = _store_volume(info, volume)
        how = ("moved" if info.owned else "copied") \
            if info.format == "raw" else "converted to raw"
        out(f"stored {info.label} ({info.format}, {human(size)}) as "
            f"{os.path.join(final, VOLUME)}: {how} in "
            f"{time.monotonic() - started:.1f} s")
        started = time.monotonic()
        manifest = manifest_mod.build_manifest(volume, name, chunk_size)
        data = manifest.to_bytes()
        _write(os.path.join(staging, MANIFEST), data)
        _write(os.path.join(staging, MANIFEST_LUN),
               data + b"\0" * (_pad(len(data)) - len(data)))
        out(f"manifest: {manifest.chunks} chunks of {human(chunk_size)}, "
            f"{manifest.algorithm}, in {time.monotonic() - started:.1f} s")
        # Synced after the manifest, which reads the page cache meanwhile;
        # durable before the record commits the export.
        _fsync_file(volume)
        chap_user = None
        if chap:
            chap_user = f"vmthunder-{secrets.token_hex(4)}"
            secret = secrets.token_hex(12)
            _write(os.path.join(staging, CHAP), json.dumps(
                {"user": chap_user, "secret": secret,
                 "iqn": cfg.iqn_of(name)}).encode() + b"\n", mode=0o600)
        record = Record(
            name=name, iqn=cfg.iqn_of(name), portal=portal,
            tid=_free_tid(cfg, tgt.targets()), size=size,
            chunk_size=chunk_size, manifest_identity=manifest.identity(),
            source=info.label, source_format=info.format,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            chap_user=chap_user)
        _write_record(staging, record)
        os.rename(staging, final)
        _fsync_dir(cfg.export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _ensure_target(cfg, tgt, record)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    message = (f"export {name}: target {record.iqn} (tid {record.tid}) "
               f"on {record.portal}, read-only")
    out(message)
    _print_urls(record, out, cfg)
    return ExportResult(record, True, message)


def _print_urls(record: Record, out, cfg: ExportConfig) -> None:
    out(f"volume:   {record.url(LUN_VOLUME)}")
    out(f"manifest: {record.url(LUN_MANIFEST)}")
    if record.chap_user:
        out(f"CHAP user {record.chap_user}; secret in "
            f"{os.path.join(cfg.dir_of(record.name), CHAP)} (URL form: "
            f"iscsi://USER%SECRET@HOST:PORT/IQN/LUN)")


def unexport(cfg: ExportConfig, name: str, keep_data: bool = False,
             out=_print) -> None:
    """Remove export ``name`` from tgtd, and its data unless keep_data."""
    check_name(name)
    privileged.require_root("vmthunder unexport")
    with _locked(cfg, out):
        record = read_record(cfg, name)
        directory = cfg.dir_of(name)
        if record is None:
            if os.path.isdir(directory):
                shutil.rmtree(directory)
                out(f"removed incomplete export {name} ({directory})")
                return
            raise ExportError(f"no export named {name!r} in "
                              f"{cfg.export_dir}; `vmthunder exports` "
                              "lists them")
        tgt = cfg.tgt(record.portal)
        if tgt.running():
            target = tgt.target_named(record.iqn)
            if target is not None:
                if target.nexuses:
                    out(f"logging out {len(target.nexuses)} initiator(s): "
                        f"{', '.join(target.initiators)}")
                tgt.delete_target(target.tid)
            if record.chap_user and record.chap_user in tgt.accounts():
                tgt.delete_account(record.chap_user)
        if keep_data:
            record.exported = False
            _write_record(directory, record)
            out(f"unexported {name} ({record.iqn}); data kept in "
                f"{directory}")
        else:
            shutil.rmtree(directory)
            out(f"unexported {name} ({record.iqn}) and removed {directory}")


def restore(cfg: ExportConfig, out=_print) -> None:
    """Start tgtd if needed and re-create every recorded export's target."""
    privileged.require_root("vmthunder exports --restore")
    with _locked(cfg, out):
        tgt = cfg.tgt()
        tgt.ensure_running()
        problems = _restore(cfg, tgt, out)
    if problems:
        raise ExportError("could not restore: " + "; ".join(problems))


def list_exports(cfg: ExportConfig) -> tuple[list[dict], list[str]]:
    """One row per recorded export, with what tgtd says about it."""
    records, problems = read_records(cfg)
    targets: dict[str, tgt_mod.Target] | None = None
    accounts: list[str] = []
    why, unknown = "", ""
    if records:
        tgt = cfg.tgt()
        try:
            if tgt.running():
                targets = {t.name: t for t in tgt.targets()}
                if any(r.chap_user for r in records):
                    accounts = tgt.accounts()
            else:
                why = (f" (no tgtd on control port {cfg.control_port}; "
                       "`vmthunder exports --restore`)")
        except (privileged.PrivilegedError, tgt_mod.TgtError) as exc:
            unknown = f"unknown (cannot ask tgtd: {exc})"
    rows = []
    for record in records:
        target = targets.get(record.iqn) if targets is not None else None
        if not record.exported:
            state = "unexported (data kept)"
        elif unknown:
            state = unknown
        elif target is None:
            state = "not in tgtd" + why
        elif _serves(target, record, cfg, accounts):
            state = "exported"
        else:
            state = "in tgtd, not as recorded (--restore re-creates it)"
        rows.append({
            "name": record.name, "size": record.size,
            "chunk_size": record.chunk_size, "portal": record.portal,
            "iqn": record.iqn,
            "tid": target.tid if target is not None else record.tid,
            "chap": bool(record.chap_user),
            "initiators": target.initiators if target is not None else [],
            "state": state, "source": record.source,
            "created": record.created,
            "volume_url": record.url(LUN_VOLUME),
            "manifest_url": record.url(LUN_MANIFEST),
        })
    return rows, problems


def format_table(rows: list[dict]) -> str:
    header = ("NAME", "SIZE", "CHUNK", "PORTAL", "IQN", "INITIATORS",
              "STATE")
    lines = [header]
    for row in rows:
        lines.append((row["name"], human(row["size"]),
                      human(row["chunk_size"]), row["portal"], row["iqn"],
                      ", ".join(row["initiators"]) or "-", row["state"]))
    widths = [max(len(line[i]) for line in lines)
              for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths)) +
        "  " + line[-1] for line in lines)
