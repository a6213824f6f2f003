"""The benchmarks' smoke modes run end to end and report well-formed JSON.

`python -m vmthunder.bench.nbd_throughput --smoke` (vmthunder serve,
qemu-nbd and nbdkit measured with qemu-img bench and fio) and
`python -m vmthunder.bench.memory --smoke` (8 concurrent readers against
vmthunder serve), and the iSCSI cold reads (`iscsi_origin`,
`cold_read`). Throughput targets are not enforced here (a loaded CI
machine makes them noise); the memory limit is: its peak must stay below
150 MiB even in the small run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _need(*binaries):
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; run "
                    "scripts/install.sh")


def _fio_has_nbd() -> bool:
    out = subprocess.run(["fio", "--enghelp"], capture_output=True,
                         text=True)
    return any(line.strip() == "nbd" for line in out.stdout.splitlines())


def _run(module: str, workdir, timeout: float = 180) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    report = json.loads(lines[-1])
    assert isinstance(report, dict)
    # The temporary work directory (image, cache, logs) is gone.
    assert os.listdir(workdir) == []
    return report


def _positive(report: dict, *keys: str) -> None:
    for key in keys:
        value = report[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert value > 0, f"{key} = {value}"


def test_nbd_throughput_smoke(tmp_path):
    _need("qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "fio")
    if not _fio_has_nbd():
        pytest.skip("fio has no nbd engine")
    report = _run("vmthunder.bench.nbd_throughput", tmp_path)
    _positive(report, "seq_ratio", "rand_ratio", "warmup_s",
              "vmthunder_seq_mb_s", "qemu_nbd_seq_mb_s", "nbdkit_seq_mb_s",
              "vmthunder_rand_iops", "qemu_nbd_rand_iops",
              "nbdkit_rand_iops")
    # The ratio is vmthunder over the faster peer, as documented, and the
    # faster peer named is the faster one.
    for test, unit in (("seq", "seq_mb_s"), ("rand", "rand_iops")):
        peers = {"qemu-nbd": report[f"qemu_nbd_{unit}"],
                 "nbdkit": report[f"nbdkit_{unit}"]}
        faster = max(peers, key=peers.get)
        assert report[f"{test}_faster_peer"] == faster, (test, peers)
        assert report[f"{test}_ratio"] == pytest.approx(
            report[f"vmthunder_{unit}"] / peers[faster], rel=0.01)
    # The verdict follows from the ratios and the documented targets.
    targets = report["targets"]
    assert targets == {"seq_ratio": 0.8, "rand_ratio": 0.5}
    if all(abs(report[k] - t) > 0.002 for k, t in targets.items()):
        assert report["targets_met"] == all(
            report[k] >= t for k, t in targets.items()), report
    for server in ("vmthunder", "qemu-nbd", "nbdkit"):
        for test in ("seq", "rand", "seq_fio", "stride_qemu_img"):
            result = report["results"][server][test]
            assert result["best"] > 0 and result["samples"]
            assert report["raw"][server][test]
    assert set(report["method"]["tests"]) >= {"seq", "rand"}
    assert report["method"]["tests"]["seq"]["client"] == "qemu-img"
    assert report["method"]["tests"]["rand"]["client"] == "fio"
    assert report["params"]["smoke"] is True
    assert report["params"]["image_bytes"] == 64 * 1024 * 1024


def test_memory_smoke(tmp_path):
    _need("nbdcopy")
    report = _run("vmthunder.bench.memory", tmp_path)
    _positive(report, "peak_rss_mib", "clients", "image_bytes", "limit_mib",
              "vmhwm_mib", "samples")
    assert report["clients"] == 8
    assert report["limit_mib"] == 150
    for phase in ("cold", "warm"):
        _positive(report["phases"][phase], "seconds", "mb_s",
                  "peak_rss_mib")
    # The peak is the largest RSS seen: no phase's peak and not the
    # kernel's high-water mark above it; the idle RSS below it.
    assert report["peak_rss_mib"] >= max(
        report["vmhwm_mib"], report["sampled_peak_rss_mib"],
        *(p["peak_rss_mib"] for p in report["phases"].values()))
    assert 0 < report["idle_rss_mib"] <= report["peak_rss_mib"]
    # The kernel's high-water mark (taken when the server is reaped) saw
    # what the samples saw (its counters lag a little behind the RSS).
    assert report["vmhwm_mib"] >= 0.9 * report["sampled_peak_rss_mib"]
    # The real check: memory stays bounded under 8 concurrent readers.
    assert report["peak_rss_mib"] < report["limit_mib"], report
    assert report["ok"] is True


def test_iscsi_origin_smoke(tmp_path):
    """Cold reads through vmthunder vs QEMU's libiscsi from one private
    tgtd (32 MiB, one repeat, no boot)."""
    _need("tgtd", "tgtadm", "qemu-img")
    if os.geteuid() != 0:
        pytest.skip("tgtd and tgtadm need root")
    report = _run("vmthunder.bench.iscsi_origin", tmp_path, timeout=120)
    _positive(report, "cold_read_ratio", "qemu_cold_read_s",
              "vmthunder_cold_read_s", "default_chunk_size")
    # No boots in smoke mode: those figures are present but null.
    assert report["cold_boot_ratio"] is None
    assert report["origin_over_guest_bytes"] is None
    assert report["targets"] == {"cold_read_ratio": 1.25,
                                 "cold_boot_ratio": 1.15,
                                 "origin_over_guest_bytes": 1.5}
    # The verdict follows from the figures (none for what was not run).
    assert report["targets_met"] == {
        k: (None if report[k] is None else report[k] <= t)
        for k, t in report["targets"].items()}
    assert report["params"]["smoke"] is True
    assert report["params"]["size"] == 32 * 1024 * 1024
    sweep = report["sweep"]
    assert set(sweep) >= {"64K", "256K", "1M"}
    for row in sweep.values():
        assert row["cold_read_s"] > 0 and row["cold_read_ratio"] > 0
    default = sweep["256K"]
    assert report["cold_read_ratio"] == default["cold_read_ratio"]
    assert report["cold_read_ratio"] == pytest.approx(
        report["vmthunder_cold_read_s"] / report["qemu_cold_read_s"],
        rel=0.01)
    # CPU seconds per process on the path (psutil): vmthunder serve did
    # the work of reading 32 MiB; the total is the sum of the parts.
    for who, cpu in report["cold_read_cpu_s"].items():
        if who in ("qemu", "vmthunder"):
            assert cpu["total"] == pytest.approx(
                sum(v for k, v in cpu.items() if k != "total"), abs=0.002)
    assert report["cold_read_cpu_s"]["vmthunder"]["serve"] > 0
    # Every cold read fetched the whole image from the origin, once.
    for key, samples in report["raw"]["cold_read"].items():
        assert samples
        if key != "qemu":
            for sample in samples:
                assert sample["fetched_bytes"] == 32 * 1024 * 1024


def test_cold_read_smoke(tmp_path):
    """The cold verified read: the whole export (default 8 KiB chunks)
    through vmthunder serve against qemu-img from the same iscsi:// LUN
    (32 MiB, one repeat); the ratio and the CPU figures follow from the
    raw ones."""
    _need("tgtd", "tgtadm", "qemu-img")
    if os.geteuid() != 0:
        pytest.skip("tgtd and tgtadm need root")
    report = _run("vmthunder.bench.cold_read", tmp_path, timeout=120)
    _positive(report, "cold_read_ratio", "qemu_cold_read_s",
              "vmthunder_cold_read_s", "serve_cpu_s_per_gib")
    assert report["target"] == 1.25
    assert report["target_met"] == (report["cold_read_ratio"] <= 1.25)
    assert report["cold_read_ratio"] == pytest.approx(
        report["vmthunder_cold_read_s"] / report["qemu_cold_read_s"],
        rel=0.01)
    assert report["chunk_size"] == 8192
    assert report["chunks"] == 32 * 1024 * 1024 // 8192
    assert report["params"]["smoke"] is True
    assert report["params"]["size"] == 32 * 1024 * 1024
    for who in ("qemu", "vmthunder"):
        cpu = report["cpu_s"][who]
        assert cpu["total"] == pytest.approx(
            sum(v for k, v in cpu.items() if k != "total"), abs=0.002)
    assert report["cpu_s"]["vmthunder"]["serve"] > 0
    # Every chunk came from the origin, verified, once.
    (sample,) = report["raw"]["vmthunder"]
    assert sample["fetched_bytes"] == 32 * 1024 * 1024
    assert sample["chunks_fetched"] == report["chunks"]


def test_nbd_cpu_smoke(tmp_path):
    """CPU per request of the warm read path, in one process: every
    request read and counted once, a positive figure per repeat."""
    report = _run("vmthunder.bench.nbd_cpu", tmp_path, timeout=60)
    _positive(report, "us_per_request", "requests")
    assert report["requests"] == 20_000 and report["smoke"] is True
    assert len(report["samples_us"]) == 2
    assert report["us_per_request"] == min(report["samples_us"])
    # Two repeats of every request, and the warm-up's reads.
    assert report["read_requests_counted"] >= 2 * report["requests"]


def _results(vmthunder: tuple, qemu_nbd: tuple, nbdkit: tuple,
             tests) -> dict:
    """Per server (seq MB/s, rand IOPS), as run_benchmark summarizes them;
    the cross-checks get the primary figures."""
    def row(seq, rand):
        return {t.key: {"best": seq if t.metric == "mb_s" else rand,
                        "median": 1.0, "samples": [1.0]} for t in tests}
    return {"vmthunder": row(*vmthunder), "qemu-nbd": row(*qemu_nbd),
            "nbdkit": row(*nbdkit)}


def test_nbd_throughput_verdict(monkeypatch, capsys):
    """The ratios, the faster peer and targets_met, and --check's exit
    status, from known figures (no servers run)."""
    from vmthunder.bench import nbd_throughput as nt
    monkeypatch.setattr(nt, "tool_versions", lambda: {})
    # main() installs a SIGTERM handler: put the test runner's back.
    monkeypatch.setattr(nt.signal, "signal", lambda *a: None)
    args = nt.build_parser().parse_args([])
    tests = nt.build_tests(args, 64 * 1024 * 1024, "/nonexistent")

    def report(vm_seq, vm_rand):
        r = nt.build_report(args, tests, _results(
            (vm_seq, vm_rand), (1000.0, 300.0), (800.0, 1000.0), tests),
            64 * 1024 * 1024, None)
        r.update(warmup_s=1.0, warmup_mb_s=64.0)
        return r

    met = report(801.0, 501.0)
    assert (met["seq_faster_peer"], met["rand_faster_peer"]) == \
        ("qemu-nbd", "nbdkit")
    assert (met["seq_ratio"], met["rand_ratio"]) == (0.801, 0.501)
    assert met["targets_met"] is True
    assert report(799.0, 1000.0)["targets_met"] is False
    assert report(1000.0, 499.0)["targets_met"] is False
    assert report(799.0, 499.0)["cross_check"]["seq_fio_ratio"] == 0.799

    # --check turns a missed target into exit status 1; without it the
    # run only reports.
    for figures, check, met, status in (((801.0, 501.0), True, True, 0),
                                        ((799.0, 501.0), True, False, 1),
                                        ((799.0, 501.0), False, False, 0)):
        monkeypatch.setattr(nt, "run_benchmark",
                            lambda _args, f=figures: report(*f))
        assert nt.main(["--check"] if check else []) == status
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(last)["targets_met"] is met
