"""vmthunder.bench.sim: the flow-level model of boot strategies."""

import json
import math

import pytest

from vmthunder.bench import sim

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 256 * KiB
INF = math.inf


@pytest.fixture(scope="module")
def trace():
    return sim.synthetic_trace(4 * MiB, 200, 5.0, 64 * MiB, seed=1)


def run(trace, strategy, hosts=1, vms=1, origin=INF, host=INF, **kw):
    image_bytes = kw.pop("image_bytes", trace.image_size)
    return sim.simulate(trace, trace.boot_s, trace.image_size, image_bytes,
                        hosts, vms, strategy, origin, host, **kw)


@pytest.mark.parametrize("strategy", sim.STRATEGIES)
def test_infinite_bandwidth_boots_in_recorded_time(trace, strategy):
    r = run(trace, strategy)
    assert r["boot_max_s"] == pytest.approx(trace.boot_s, abs=1e-9)
    assert r["all_booted_s"] == pytest.approx(trace.boot_s, abs=1e-9)


def test_think_times_and_fetch_time_exact():
    # One 256 KiB read at t=1 (1 ms locally), boot 2 s; 8 Mbit/s = 1 MB/s.
    t = sim.trace_from_tuples([(1.0, 1.001, "read", 0, CHUNK)], 2.0,
                              4 * CHUNK)
    r = sim.simulate(t, 2.0, 4 * CHUNK, 4 * CHUNK, 1, 1, "lazy", 8e6, INF,
                     rtt_s=0.0005)
    fetch = CHUNK / 1e6 + 0.0005
    assert r["boot_max_s"] == pytest.approx(1.0 + fetch + (2.0 - 1.001))


def test_origin_and_peer_fetch_costs_are_per_hop():
    """One read, two hosts (tree: host 1 reads through host 0, which
    reads the origin): the chunk reaches host 1 after the origin hop's
    cost and the peer hop's; host 0 pays only the origin's."""
    t = sim.trace_from_tuples([(1.0, 1.001, "read", 0, CHUNK)], 2.0,
                              4 * CHUNK)
    r = sim.simulate(t, 2.0, 4 * CHUNK, 4 * CHUNK, 2, 1, "tree", 8e6, 8e6,
                     origin_fetch_s=0.003, peer_fetch_s=0.010)
    hop = CHUNK / 1e6
    tail = 2.0 - 1.001
    assert r["boot_p50_s"] == pytest.approx(1.0 + hop + 0.003 + tail)
    assert r["boot_max_s"] == pytest.approx(
        1.0 + 2 * hop + 0.003 + 0.010 + tail)
    # Unset, each is rtt_s.
    r = sim.simulate(t, 2.0, 4 * CHUNK, 4 * CHUNK, 2, 1, "tree", 8e6, 8e6,
                     rtt_s=0.002, peer_fetch_s=0.010)
    assert r["boot_max_s"] == pytest.approx(
        1.0 + 2 * hop + 0.002 + 0.010 + tail)


def test_dependency_is_latest_completion_before_issue():
    rows = [(0.0, 1.0, "read", 0, 4096),          # A
            (0.5, 0.6, "write", 0, 4096),         # B, concurrent with A
            (1.5, 1.6, "read", CHUNK, 4096)]      # C: depends on A (1.0)
    t = sim.trace_from_tuples(rows, 3.0, 4 * CHUNK)
    origin_Bps = CHUNK / 2.0      # a (whole-chunk) fetch takes 2 s
    r = sim.simulate(t, 3.0, 4 * CHUNK, 4 * CHUNK, 1, 1, "lazy",
                     origin_Bps * 8, INF)
    # A done at 2.0; C issued 0.5 later, its fetch 2 s: done at 4.5;
    # tail 3.0 - 1.6. B (a write) is local and on no path to the end.
    assert r["boot_max_s"] == pytest.approx(2.0 + 0.5 + 2.0 + 1.4)


def test_lazy_origin_bytes_are_hosts_times_working_set_chunks(trace):
    r = run(trace, "lazy", hosts=5, vms=3, origin=200e6, host=1e9)
    assert r["origin_bytes"] == 5 * r["working_set_chunk_bytes"]
    assert r["working_set_chunk_bytes"] >= r["working_set_bytes"]
    assert r["peer_bytes"] == 0


def test_direct_origin_bytes_are_vms_times_bytes_read(trace):
    r = run(trace, "direct", hosts=3, vms=4, origin=200e6, host=1e9)
    assert r["origin_bytes"] == 12 * r["bytes_read_per_vm"]
    assert r["model"] == "event"


def test_copy_origin_bytes_and_time(trace):
    image_bytes = 32 * MiB
    r = run(trace, "copy", hosts=1, vms=3, origin=200e6, host=1e9,
            image_bytes=image_bytes)
    assert r["origin_bytes"] == image_bytes
    assert r["all_booted_s"] == pytest.approx(
        image_bytes / 25e6 + r["local_boot_s"])
    r4 = run(trace, "copy", hosts=4, vms=3, origin=200e6, host=1e9,
             image_bytes=image_bytes)
    assert r4["origin_bytes"] == 4 * image_bytes
    assert r4["all_booted_s"] == pytest.approx(
        4 * image_bytes / 25e6 + r4["local_boot_s"])
    assert r4["peak_origin_bps"] == pytest.approx(200e6)


def test_doubling_origin_rate_halves_copy_phase(trace):
    a = run(trace, "precache", hosts=8, origin=100e6, host=1e9,
            image_bytes=16 * MiB)
    b = run(trace, "precache", hosts=8, origin=200e6, host=1e9,
            image_bytes=16 * MiB)
    assert b["precache_s"] == pytest.approx(a["precache_s"] / 2)
    assert a["boot_max_s"] == pytest.approx(a["local_boot_s"])
    c = run(trace, "copy", hosts=8, origin=200e6, host=1e9,
            image_bytes=16 * MiB)
    assert c["all_booted_s"] - c["local_boot_s"] == \
        pytest.approx(b["precache_s"])


def test_max_min_two_flows_on_one_link_get_half_each():
    assert sim.max_min_rates([(0, 1), (0, 2)], [10.0, INF, INF]) == \
        [5.0, 5.0]


def test_max_min_redistributes_what_a_constrained_flow_cannot_use():
    # One sender (the water-filling path): flow 1 capped at 4 by its
    # receiver, flow 2 gets the remaining 6.
    assert sim.max_min_rates([(0, 1), (0, 2)], [10.0, 4.0, 100.0]) == \
        pytest.approx([4.0, 6.0])
    # Two senders (progressive filling): link 1 (cap 4) halves between
    # flows 0->1 and 2->1; flow 2->3 takes the rest of link 2.
    assert sim.max_min_rates([(0, 1), (2, 1), (2, 3)],
                             [10.0, 4.0, 10.0, 100.0]) == \
        pytest.approx([2.0, 2.0, 8.0])


@pytest.mark.parametrize("strategy", ["direct", "lazy", "vmthunder", "tree"])
def test_merging_identical_vms_changes_nothing(trace, strategy):
    kw = dict(hosts=3, vms=3, origin=100e6, host=400e6, rtt_s=0.0002)
    a = run(trace, strategy, **kw)
    b = run(trace, strategy, merge_identical=False, **kw)
    for key in ("boot_p50_s", "boot_max_s", "all_booted_s", "origin_bytes",
                "peer_bytes"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


@pytest.mark.parametrize("strategy", ["vmthunder", "tree"])
def test_peers_take_load_off_the_origin(trace, strategy):
    lazy = run(trace, "lazy", hosts=6, vms=2, origin=100e6, host=1e9)
    r = run(trace, strategy, hosts=6, vms=2, origin=100e6, host=1e9,
            vm_start_spread_s=1.0)
    ws = r["working_set_chunk_bytes"]
    assert r["origin_bytes"] == ws
    assert r["peer_bytes"] == 5 * ws
    assert r["all_booted_s"] < lazy["all_booted_s"]


def test_lazy_beats_direct_and_start_spread_is_counted(trace):
    kw = dict(hosts=4, vms=5, origin=100e6, host=1e9)
    lazy, direct = run(trace, "lazy", **kw), run(trace, "direct", **kw)
    assert lazy["boot_p50_s"] < direct["boot_p50_s"]
    spread = run(trace, "lazy", vm_start_spread_s=3.0, **kw)
    assert spread["all_booted_s"] <= spread["boot_max_s"] + 3.0
    assert spread["vms"] == 20


def test_direct_fluid_fallback_is_labelled_and_bounded(trace):
    r = run(trace, "direct", hosts=20, vms=5, origin=100e6, host=1e9,
            direct_flow_limit=10)
    assert r["model"] == "fluid"
    assert r["boot_max_s"] >= 100 * r["bytes_read_per_vm"] / 12.5e6
    event = run(trace, "direct", hosts=20, vms=5, origin=100e6, host=1e9)
    assert r["boot_max_s"] == pytest.approx(event["boot_max_s"], rel=0.2)


def test_hundred_hosts_lazy_is_fast_and_origin_bound():
    t = sim.synthetic_trace(50 * MiB, 1500, 30.0, 2048 * MiB)
    r = sim.simulate(t, t.boot_s, t.image_size, t.image_size, 100, 10,
                     "lazy", 200e6, 1e9)
    assert r["vms"] == 1000
    # Fast (not timed here: a loaded machine makes wall time noise)
    # because the 10 identical VMs of a host are simulated once: the work,
    # in events handled, grows with the hosts, not with the VMs (about 6
    # times more with merge_identical=False).
    per_host = r["candidates_per_vm"] + r["working_set_chunks"]
    assert 0 < r["events"] <= 2 * 100 * per_host, r["events"]
    total = r["origin_bytes"]
    assert total == 100 * r["working_set_chunk_bytes"]
    # Origin-bound: everything crossed the 25 MB/s link.
    assert r["all_booted_s"] >= total / 25e6
    assert r["all_booted_s"] < total / 25e6 + t.boot_s
    assert r["peak_origin_bps"] <= 200e6 * 1.06


def test_simulate_trace_takes_a_trace_object(trace):
    from types import SimpleNamespace
    obj = SimpleNamespace(requests=list(trace.requests), boot_s=None,
                          image_size=trace.image_size)
    r = sim.simulate_trace(obj, strategy="lazy", hosts=2, vms_per_host=2,
                           origin_rate_bps=INF, host_rate_bps=INF,
                           image_bytes=trace.image_size)
    last = max(q.complete_s for q in trace.requests)
    assert r["all_booted_s"] == pytest.approx(last)


def test_trace_adapter_validates():
    with pytest.raises(ValueError):
        sim.trace_from_tuples([(1.0, 0.5, "read", 0, 1)], 2.0, 10)
    with pytest.raises(ValueError):
        sim.trace_from_tuples([(0.0, 0.5, "read", 8, 4)], 2.0, 10)
    with pytest.raises(ValueError):
        sim.trace_from_tuples([(0.0, 3.0, "read", 0, 4)], 2.0, 10)
    t = sim.trace_from_tuples([(0.2, 0.3, "R", 0, 4), (0.1, 0.2, "W", 4, 4)],
                              1.0, 10)
    assert [r.op for r in t.requests] == ["W", "R"]


def test_synthetic_trace_shape():
    t = sim.synthetic_trace(8 * MiB, 300, 10.0, 128 * MiB, seed=3)
    stats = sim.trace_stats(t, CHUNK)
    assert stats["reads_per_vm"] == 300
    assert stats["working_set_bytes"] == pytest.approx(8 * MiB, rel=0.01)
    assert t.boot_s == pytest.approx(10.0)
    assert max(r.offset + r.length for r in t.requests) <= 16 * MiB


def test_parse_rate():
    assert sim.parse_rate("200mbit") == 200e6
    assert sim.parse_rate("1gbit") == 1e9
    assert sim.parse_rate("25mbps") == 200e6      # tc: bytes per second
    assert sim.parse_rate("inf") == INF


def test_cli_prints_table_then_json(capsys):
    assert sim.main(["--hosts", "3", "--vms-per-host", "2", "--synthetic",
                     "4,200,5,64", "--strategies", "copy,lazy,vmthunder",
                     "--host-rate", "inf"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert set(doc["results"]) == {"copy", "lazy", "vmthunder"}
    assert doc["params"]["host_rate_bps"] == "inf"
    assert any(line.startswith("lazy") for line in lines)
