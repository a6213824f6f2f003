"""A boot trace published with an export, prefetched by an agent at VM
create (issue 16): a real tgtd export (`vmthunder export`'s layout, the
trace published with `vmthunder trace publish`), a real agent process
attaching it over iSCSI with peers on, a VM's NBD disk read like a guest.

The agent prefetches the trace's chunks before the guest reads them; the
guest's reads then hit the cache. A trace changed on the origin after it
was published (the manifest's digest no longer matches) is refused: no
prefetch, a note in the status, and the VM works as without a trace.

Needs root and tgt (skips otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys

import pytest

from tests.functional.conftest import REPO
from tests.functional.test_agent import agents, nbd, wait_status  # noqa
from tests.functional.iscsi_fixtures import free_control_port
from tests.functional.test_export import _free_port
from tests.functional.test_precache import make_trace
from vmthunder.volume import export as export_mod

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(
    os.geteuid() != 0, reason="tgtd and tgtadm need root")]

KiB, MiB = 1024, 1024 * 1024
CS = 8 * KiB
PREFIX = "iqn.2026-12.org.vmthunder.prefetch"
# The boot the trace recorded: three scattered runs, in this order.
READS = [(1 * MiB, 128 * KiB), (3 * MiB, 64 * KiB), (64 * KiB, 64 * KiB)]
TRACE_CHUNKS = sum(n for _, n in READS) // CS


@pytest.fixture
def origin(tmp_path):
    if not all(map(lambda b: subprocess.run(["which", b],
                                            capture_output=True).returncode
                   == 0, ("tgtd", "tgtadm"))):
        pytest.skip("tgt is not installed")
    cfg = export_mod.ExportConfig(
        export_dir=str(tmp_path / "exports"),
        portal=f"127.0.0.1:{_free_port()}",
        control_port=free_control_port(), iqn_prefix=PREFIX,
        chunk_size=CS)
    conf = tmp_path / "origin.conf"
    conf.write_text(f"[export]\nexport_dir = {cfg.export_dir}\n"
                    f"portal = {cfg.portal}\n"
                    f"tgtd_control_port = {cfg.control_port}\n"
                    f"iqn_prefix = {PREFIX}\n")
    try:
        yield cfg, conf
    finally:
        with contextlib.suppress(Exception):
            cfg.tgt().stop()
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(f"/var/run/tgtd/socket.{cfg.control_port}{suffix}")


def vmt(conf, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmthunder.cli",
                           "--config-file", str(conf), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_published_trace_is_prefetched_and_a_changed_one_refused(
        origin, agents, tmp_path):  # noqa: F811
    cfg, conf = origin
    data = random.Random(16).randbytes(4 * MiB)
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    export_mod.export_image(cfg, str(image), "img", out=lambda t: None)
    # Refused, saying why: another image's trace, an unknown export.
    bigger = make_trace(tmp_path / "big.trace", 2 * len(data), READS)
    done = vmt(conf, "trace", "publish", "img", bigger)
    assert done.returncode == 1 and "is it a trace of this image?" \
        in done.stderr, done.stderr
    done = vmt(conf, "trace", "publish", "nope", bigger)
    assert done.returncode == 1 and "no export named 'nope'" \
        in done.stderr, done.stderr
    trace = make_trace(tmp_path / "boot.trace.gz", len(data), READS)
    done = vmt(conf, "trace", "publish", "img", trace)
    assert done.returncode == 0, done.stderr
    assert "published as LUN 3" in done.stdout
    exports = json.loads(vmt(conf, "exports", "--json").stdout)
    assert [row["state"] for row in exports] == ["exported"], exports
    url = f"iscsi://{cfg.portal}/{PREFIX}:img/1"

    agent = agents(None, "--peer-listen", f"unix:{tmp_path}/peer.sock",
                   config="chunk_size = 8192\n[iscsi]\nmanifest_lun = 2\n")
    client = agent.client
    client.attach_image("img", url)
    vm = client.create_vm("vm1", "img")
    st = wait_status(client, lambda s: (s["images"]["img"]["prefetch"] or
                                        {}).get("state") == "done")
    prefetch = st["images"]["img"]["prefetch"]
    assert prefetch["trace_chunks"] == TRACE_CHUNKS
    assert prefetch["chunks_prefetched"] == TRACE_CHUNKS, prefetch
    assert prefetch["stop_reason"] == "trace ended"
    fetched = st["images"]["img"]["bytes_from_origin"]
    # The guest's boot: every read a hit, nothing more from the origin.
    got = nbd(vm["nbd"], *[("read", off, n) for off, n in READS])
    assert got == [data[off:off + n] for off, n in READS]
    st = client.status()["images"]["img"]
    assert st["bytes_from_origin"] == fetched
    assert st["read_misses"] == 0 and st["read_hits"] >= len(READS)
    assert st["prefetch"]["chunks_used"] == TRACE_CHUNKS
    assert st["prefetch"]["chunks_wasted"] == 0
    shown = agent.cli("status")
    assert (f"image img: prefetch done (trace ended): {TRACE_CHUNKS} of "
            f"{TRACE_CHUNKS} trace chunks prefetched, {TRACE_CHUNKS} used, "
            "0 wasted") in shown.stdout, shown.stdout

    # The trace changed on the origin behind the manifest's back.
    client.delete_vm("vm1")
    client.detach_image("img")
    lun = os.path.join(cfg.dir_of("img"), export_mod.TRACE_LUN)
    with open(lun, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    client.attach_image("img", url)
    vm = client.create_vm("vm2", "img")
    st = wait_status(client, lambda s: s["images"]["img"]["prefetch"])
    note = st["images"]["img"]["prefetch"]
    assert note["state"] == "none", note
    assert "does not match the digest" in note["note"], note
    got = nbd(vm["nbd"], ("read", 2 * MiB, 64 * KiB))
    assert got == [data[2 * MiB:2 * MiB + 64 * KiB]]
    assert agent.stop() == 0
