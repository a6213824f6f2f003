"""nova_driver/cinder_origin.py without Cinder: its settings and its lock
(tooz's real file backend). Needs no Nova: runs in the main suite. The
resolution against real Cinder is in tests/openstack/test_cinder.py."""

import threading
import time

import pytest

from nova_driver import cinder_origin
from vmthunder.cinder.client import CinderError


def write_conf(tmp_path, coordination: str) -> str:
    conf = tmp_path / "vmthunder.conf"
    conf.write_text("[cinder]\nauth_strategy = noauth\n"
                    "endpoint = http://127.0.0.1:1/v3\n"
                    "glance_endpoint = http://127.0.0.1:1\n"
                    "initiator_name = iqn.2024-01.test:host\n"
                    f"[coordination]\nbackend_url = {coordination}\n")
    return str(conf)


def test_settings_from_vmthunder_config_file(tmp_path):
    conf = write_conf(tmp_path, f"file://{tmp_path}/a")
    r = cinder_origin.Resolver.from_files(conf)
    assert r.cinder.endpoint == "http://127.0.0.1:1/v3"
    assert r.cinder.initiator_name == "iqn.2024-01.test:host"
    assert r.coordination_url == f"file://{tmp_path}/a"
    # nova.conf's coordination_url wins over the agents' backend.
    r = cinder_origin.Resolver.from_files(conf,
                                          coordination_url="redis://x:1")
    assert r.coordination_url == "redis://x:1"
    with pytest.raises(CinderError, match="vmthunder_config_file"):
        cinder_origin.Resolver.from_files(str(tmp_path / "none.conf"))


def test_a_host_waiting_too_long_for_the_lock_is_a_clear_error(tmp_path):
    """Another host holds the image's lock (exporting it): resolve waits
    cinder_lock_timeout, then says so; it never exports meanwhile."""
    from tooz import coordination
    url = f"file://{tmp_path}/locks"
    holder = coordination.get_coordinator(url, b"other-host")
    holder.start()
    lock = holder.get_lock(cinder_origin.LOCK_NAME.format("IMG").encode())
    assert lock.acquire(blocking=False)
    try:
        r = cinder_origin.Resolver.from_files(write_conf(tmp_path, url),
                                              lock_timeout=1)
        t0 = time.monotonic()
        with pytest.raises(CinderError) as info:
            r.resolve("IMG")
        assert 1 <= time.monotonic() - t0 < 10
        text = str(info.value)
        assert "lock of image IMG" in text and "another host" in text
        assert "cinder_lock_timeout" in text
    finally:
        lock.release()
        holder.stop()


def test_lock_released_after_a_failed_export(tmp_path):
    """The export fails (Cinder unreachable): the error is the export's,
    and the lock is free again for the next host."""
    from tooz import coordination
    url = f"file://{tmp_path}/locks"
    r = cinder_origin.Resolver.from_files(write_conf(tmp_path, url),
                                          lock_timeout=5)
    errors = []

    def one():
        try:
            r.resolve("IMG")
        except CinderError as exc:
            errors.append(str(exc))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 2 and all("unreachable" in e for e in errors), \
        errors
    other = coordination.get_coordinator(url, b"next-host")
    other.start()
    try:
        lock = other.get_lock(cinder_origin.LOCK_NAME.format("IMG").encode())
        assert lock.acquire(blocking=False)
        lock.release()
    finally:
        other.stop()
