"""The server-wide in-flight budget defers requests, never drops them."""

from __future__ import annotations

import hashlib
import subprocess

from tests.functional.conftest import make_image, need


def test_small_budget_defers_requests_and_serves_them_all(tmp_path, serve):
    """1 MiB of budget, 4 connections x 64 requests of 256 KiB in flight:
    most requests wait for the budget; all complete with the right data.
    Budget that leaked (charged, never released) would stall the second
    copy until the timeout."""
    need("nbdcopy")
    image = make_image(tmp_path / "img.raw", 48 << 20, seed=3)
    conf = tmp_path / "vmthunder.conf"
    conf.write_text("[nbd]\nmax_inflight_bytes = 1048576\n")
    srv = serve(image, "--snapshot", "vm1", config_file=str(conf))
    for export in ("img", "vm1"):          # cold, then warm (sendfile)
        out = subprocess.run(
            ["nbdcopy", "--connections=4", "--requests=64",
             "--request-size=262144", srv.uri(export), "-"],
            capture_output=True, timeout=120, check=True).stdout
        with open(image, "rb") as f:
            assert hashlib.sha256(out).digest() == \
                hashlib.sha256(f.read()).digest()
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr()
