"""`vmthunder export glance://ID --name N` against a real Glance.

Only Glance is started (tests/openstack/services.py's, from
.venv-openstack: gunicorn, sqlite, file store, no auth), once for the
module, stopped at the end, pass or fail; the export's tgtd is
tests/functional/test_export.py's (its ``origin`` fixture). The Glance
stand-in cases (qcow2, wrong hash, bad input) are in test_export.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.functional.conftest import make_image
from tests.functional.test_export import compare, origin  # noqa: F401
from tests.openstack import services
from tests.openstack.conftest import upload_image

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


@pytest.fixture(scope="module")
def glance(tmp_path_factory):
    """A real glance-api on loopback (no auth), stopped at the end."""
    why = services.missing()
    if why:
        pytest.skip(why)
    s = services.Services(str(tmp_path_factory.mktemp("glance")))
    os.makedirs(os.path.join(s.base, "logs"))
    s.env = {k: v for k, v in os.environ.items()
             if not k.startswith(("PYTHON", "VIRTUAL_ENV", "OS_"))}
    s.env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        services._start_glance(s, sys.executable)
        print(f"Glance started: {s.timings}")
        yield s
    finally:
        s.close()


def test_export_from_real_glance(glance, origin, tmp_path):  # noqa: F811
    """The image uploaded to Glance is fetched through the transfer
    library (Glance's os_hash_value checked) into the export, exported
    over tgtd, and reads back equal; its record names the Glance image;
    nothing is left in the export store."""
    size = 5 * MiB + 1000
    image = make_image(tmp_path / "img.raw", size, seed=31, hole_at=2 * MiB)
    image_id = upload_image(glance, image)
    proc = origin.vmt("export", f"glance://{image_id}", "--name", "real-g",
                      "--glance-endpoint", glance.glance_url, check_rc=0)
    assert f"fetched glance://{image_id} from Glance at " in proc.stdout
    assert "verified: sha512 of the whole image" in proc.stdout, proc.stdout
    assert compare(image, origin.url("real-g")).returncode == 0
    record = json.load(open(os.path.join(origin.export_dir, "real-g",
                                         "export.json")))
    assert record["source"] == f"glance://{image_id}"
    assert record["size"] == size + 24
    assert not [e for e in os.listdir(origin.export_dir)
                if e.startswith((".glance-", "..glance-", ".staging-"))]
