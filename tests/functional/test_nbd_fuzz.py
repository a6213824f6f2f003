"""Our NBD fuzzer (tests/fuzz/nbd_fuzz.py) for a bounded time, fixed seeds.

Each seed runs ~12 s of short client sessions (valid handshakes and
requests, mutated bytes, garbage, disconnects at random points) against
a real `vmthunder serve`, every reply checked, and the server checked
every few seconds: alive, correct data for a well-behaved client, the
whole in-flight budget available again, peak RSS under 200 MiB, no
traceback in its log. Longer runs, and replays of a failure:

    .venv/bin/python -m tests.fuzz.nbd_fuzz --seconds 600 --seed N
    .venv/bin/python -m tests.fuzz.nbd_fuzz --seed N --session K -vv
"""

from __future__ import annotations

import pytest

from tests.functional.conftest import make_image
from tests.fuzz import nbd_fuzz

SECONDS = 12
SIZE = nbd_fuzz.DEFAULT_IMAGE_SIZE
pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_serve_over_nbd(serve, tmp_path, seed):
    image = make_image(tmp_path / "img.raw", SIZE, seed=seed,
                       hole_at=SIZE * 3 // 4)
    max_inflight = nbd_fuzz.DEFAULT_MAX_INFLIGHT
    served = serve(image, *nbd_fuzz.SERVE_ARGS,
                   config_file=nbd_fuzz.server_config(str(tmp_path),
                                                      max_inflight))
    fz = nbd_fuzz.Fuzzer(served, image, seed, max_inflight=max_inflight,
                         deadline=20)
    result = fz.run(seconds=SECONDS)
    print(fz.summary(result))
    assert result.ok, "\n\n".join(result.failures)
    assert served.stop() == 0
    assert "Traceback" not in served.stderr()
