"""`vmthunder export glance://IMAGE_ID --name N`: a Glance image exported
as the image files are (volume/export.py), its bytes fetched through the
transfer library (``vmthunder.transfer.copy``: the whole image checked
against Glance's ``os_hash_value``, written under a temporary name and
renamed only when complete and verified).

Under the export store's lock: the image record is read for its
``disk_format`` (raw or qcow2; the data is never probed for a format),
the data is copied to ``<export_dir>/.glance-NAME``, which a raw image
then becomes the export's volume by a rename (a qcow2 one is converted
to raw, with no backing or data file allowed), and the export goes on as
for a file. The fetched file is removed at the end, whatever happened; a
copy killed midway leaves only the transfer's temporary file, removed by
the next export of that name.

The Glance endpoint: ``glance_endpoint`` (the command line's
--glance-endpoint, else [cinder] glance_endpoint), else
$VMTHUNDER_GLANCE_ENDPOINT; a token from ``glance_token``, else
$OS_AUTH_TOKEN (as the transfer's glance:// driver).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from vmthunder.redaction import redact_url
from vmthunder.volume import export as export_mod
from vmthunder.volume.export import ExportError, ImageInfo

ENDPOINT_ENV = "VMTHUNDER_GLANCE_ENDPOINT"
TOKEN_ENV = "OS_AUTH_TOKEN"
FORMATS = ("raw", "qcow2")
TIMEOUT_S = 60.0
# qcow2 v3 incompatible feature bit: the guest data is in another file.
QCOW2_EXTERNAL_DATA_FILE = 1 << 2


def parse_uri(uri: str) -> str:
    """The image id of ``glance://IMAGE_ID``; ExportError otherwise."""
    parts = urllib.parse.urlsplit(uri or "")
    image_id = (parts.netloc + parts.path).strip("/")
    if parts.scheme != "glance" or not image_id or "/" in image_id \
            or parts.query or parts.fragment:
        raise ExportError(f"image {uri!r} is not glance://IMAGE_ID")
    return image_id


def endpoint_of(glance_endpoint: str | None) -> str:
    endpoint = glance_endpoint or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise ExportError(
            "no Glance endpoint to fetch the image from: give "
            "--glance-endpoint URL, set [cinder] glance_endpoint "
            f"(e.g. http://HOST:9292) or ${ENDPOINT_ENV}")
    return endpoint.rstrip("/")


def image_record(endpoint: str, image_id: str, token: str | None) -> dict:
    """GET /v2/images/ID: the image's record; ExportError naming the
    problem."""
    url = f"{endpoint}/v2/images/{urllib.parse.quote(image_id, safe='')}"
    where = f"Glance image {image_id} at {redact_url(endpoint)}"
    request = urllib.request.Request(url, headers={
        "Accept": "application/json", **({"X-Auth-Token": token}
                                         if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            record = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ExportError(f"{where}: no such image (404); check the "
                              "id (openstack image list)") from None
        raise ExportError(f"{where}: HTTP {exc.code} {exc.reason}"
                          + ("; check the token ($OS_AUTH_TOKEN)"
                             if exc.code in (401, 403) else "")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ExportError(f"{where}: cannot reach Glance ({reason}); check "
                          "the endpoint and that Glance runs") from None
    except ValueError as exc:
        raise ExportError(f"{where}: the image record is not JSON "
                          f"({exc})") from None
    if not isinstance(record, dict):
        raise ExportError(f"{where}: the image record is not a JSON object")
    if record.get("status") != "active":
        raise ExportError(f"{where}: status {record.get('status')!r}, not "
                          "'active': no data to export yet")
    fmt = record.get("disk_format")
    if fmt not in FORMATS:
        raise ExportError(f"{where}: disk_format {fmt!r}; export takes raw "
                          "or qcow2 images (convert it and upload it "
                          "again)")
    return record


def _check_qcow2_header(path: str, label: str) -> None:
    """ExportError unless ``path`` starts with a qcow2 header naming no
    backing file and no external data file: read here, before qemu-img
    opens the image (which would open those files)."""
    with open(path, "rb") as f:
        header = f.read(80)
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        raise ExportError(f"image {label} has disk_format qcow2 in Glance "
                          "but its data is not a qcow2 image")
    version = struct.unpack_from(">I", header, 4)[0]
    backing_offset = struct.unpack_from(">Q", header, 8)[0]
    incompatible = struct.unpack_from(">Q", header, 72)[0] \
        if version >= 3 and len(header) >= 80 else 0
    if backing_offset or incompatible & QCOW2_EXTERNAL_DATA_FILE:
        raise ExportError(f"image {label} (qcow2) names a backing or data "
                          "file; export takes self-contained images "
                          "(qemu-img convert -O qcow2 it first)")


def _qcow2_info(path: str, label: str) -> ImageInfo:
    """The qcow2 file's virtual size; ExportError if it names a backing
    or data file (never opened for an image from elsewhere)."""
    _check_qcow2_header(path, label)
    proc = subprocess.run(
        [export_mod._qemu_img(), "info", "-f", "qcow2", "--output=json",
         path], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().replace("\n", "; ")
        raise ExportError(f"image {label} (disk_format qcow2) is not a "
                          f"valid qcow2 image: {msg}")
    info = json.loads(proc.stdout)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or data.get("data-file"):
        raise ExportError(f"image {label} (qcow2) names a backing or data "
                          "file; export takes self-contained images "
                          "(qemu-img convert -O qcow2 it first)")
    if info.get("encrypted"):
        raise ExportError(f"image {label} (qcow2) is encrypted; decrypt "
                          "it first")
    size = int(info.get("virtual-size", 0))
    if size <= 0:
        raise ExportError(f"image {label} is empty; nothing to export")
    return ImageInfo(path, "qcow2", size, source=label, owned=True)


def fetch(cfg: export_mod.ExportConfig, uri: str, name: str, *,
          glance_endpoint: str | None = None,
          glance_token: str | None = None, out=print) -> ImageInfo:
    """Copy Glance image ``uri`` into the export store for export
    ``name``: an owned ImageInfo (export_prepared removes its file)."""
    from vmthunder import transfer
    image_id = parse_uri(uri)
    endpoint = endpoint_of(glance_endpoint)
    token = glance_token or os.environ.get(TOKEN_ENV)
    record = image_record(endpoint, image_id, token)
    path = os.path.join(cfg.export_dir, f".glance-{name}")
    started = time.monotonic()
    try:
        result = transfer.copy(uri, path, glance_endpoint=endpoint,
                               **({"glance_token": token} if token else {})
                               ).wait()
    except transfer.TransferError as exc:
        raise ExportError(f"fetching {uri}: {exc}") from None
    seconds = time.monotonic() - started
    rate = result.size / seconds / (1 << 20) if seconds > 0 else 0.0
    out(f"fetched {uri} from Glance at {redact_url(endpoint)} "
        f"({record['disk_format']}, {export_mod.human(result.size)}) in "
        f"{seconds:.1f} s ({rate:.0f} MiB/s), verified: "
        f"{result.verified or 'nothing to check against'}")
    if record["disk_format"] == "qcow2":
        try:
            return _qcow2_info(path, uri)
        except BaseException:
            os.unlink(path)
            raise
    return ImageInfo(path, "raw", result.size, source=uri, owned=True)


def export_glance_image(cfg: export_mod.ExportConfig, uri: str, name: str,
                        *, glance_endpoint: str | None = None,
                        glance_token: str | None = None,
                        chunk_size: int | None = None, chap: bool = False,
                        portal: str | None = None,
                        out=export_mod._print) -> export_mod.ExportResult:
    """export_image() of Glance image ``uri`` (glance://IMAGE_ID)."""
    from vmthunder import privileged
    parse_uri(uri)
    export_mod.check_arguments(cfg, name, chunk_size, portal)
    privileged.require_root("vmthunder export")
    return export_mod.export_prepared(
        cfg, lambda: fetch(cfg, uri, name, glance_endpoint=glance_endpoint,
                           glance_token=glance_token, out=out),
        name, chunk_size=chunk_size, chap=chap, portal=portal, out=out)
