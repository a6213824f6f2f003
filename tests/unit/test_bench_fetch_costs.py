"""vmthunder.bench.harness: the agents' fetch latency added up over hosts,
and the per-fetch costs the simulator learns from it."""

import pytest

from vmthunder.bench import harness

PARAMS = {"chunk_size": 8192, "origin_rate": "200mbit",
          "host_rate": "1gbit"}


def row(fetches, chunks, mean):
    return {"fetches": fetches, "chunks": chunks, "mean_ms": mean}


def status(**rows):
    """An agent's image status's fetch figures: source=(n, chunks, s,
    digest wait s)."""
    return {"fetches": {k: v[0] for k, v in rows.items()},
            "fetch_chunks": {k: v[1] for k, v in rows.items()},
            "fetch_seconds": {k: v[2] for k, v in rows.items()},
            "fetch_digest_wait_seconds": {k: v[3] for k, v in rows.items()}}


def test_latency_totals_are_means_over_every_fetch():
    hosts = {"host0": status(origin=(10, 40, 0.02, 0.0)),
             "host1": status(origin=(30, 60, 0.12, 0.0),
                             owner=(5, 5, 0.03, 0.005)),
             "host2": {}}
    got = harness._latency_totals(hosts)
    assert got["origin"] == {"fetches": 40, "chunks": 100, "mean_ms": 3.5,
                             "digest_wait_ms": 0.0}
    assert got["owner"] == {"fetches": 5, "chunks": 5, "mean_ms": 6.0,
                            "digest_wait_ms": 1.0}
    assert harness._latency_totals({"host0": {}}) is None


def test_fetch_costs_are_means_less_the_bytes_on_the_link():
    latency = {"origin": row(100, 100, 1.0),
               "owner": row(300, 300, 2.0),
               "peer": row(100, 100, 1.0)}
    costs = harness.fetch_costs(latency, PARAMS)
    origin_link = 200e6 * harness.TCP_EFFICIENCY / 8
    host_link = 1e9 * harness.TCP_EFFICIENCY / 8
    assert costs["origin_fetch_s"] == pytest.approx(
        1e-3 - 8192 / origin_link)
    # owner and peer fetches together, weighed by their counts.
    assert costs["peer_fetch_s"] == pytest.approx(
        1.75e-3 - 8192 / host_link)
    # Never negative; nothing measured, nothing learned.
    slow = {"origin": row(1, 64, 1.0)}
    assert harness.fetch_costs(slow, PARAMS) == {"origin_fetch_s": 0.0}
    assert harness.fetch_costs(None, PARAMS) == {}
