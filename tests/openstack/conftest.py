"""Fixtures: real OpenStack services for the Cinder path, once per module.

``openstack`` starts tgtd, RabbitMQ, Glance and Cinder (api, scheduler,
volume with vmthunder's file driver) from .venv-openstack
(tests/openstack/services.py) and stops them all at the end, pass or
fail; the tests skip with the reason when the venv, root or a Debian
package is missing. ``serve`` and ``guest_dir`` are the functional
tests' fixtures.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from tests.functional.conftest import guest_dir, serve  # noqa: F401
from tests.openstack import services


@contextlib.contextmanager
def running_services(tmp_path_factory, host: str = services.HOST):
    """The services on ``host`` (skip when they cannot run here), all
    stopped at the end, pass or fail."""
    why = services.missing()
    if why:
        pytest.skip(why)
    s = services.start_services(str(tmp_path_factory.mktemp("openstack")),
                                host)
    print(f"OpenStack services started: {s.timings}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def openstack(tmp_path_factory):
    with running_services(tmp_path_factory) as s:
        yield s


def settings_of(s: services.Services, **overrides):
    """[cinder] settings (a CinderSettings) that reach ``s``."""
    from vmthunder.cinder.client import CinderSettings
    return CinderSettings(**{**dict(
        endpoint=s.cinder_url, glance_endpoint=s.glance_url,
        auth_strategy="noauth", user_id=services.USER,
        project_id=services.PROJECT, create_timeout=300), **overrides})


def config_file(s: services.Services, path: str) -> str:
    """A vmthunder.conf with the [cinder] section for ``s``."""
    with open(path, "w") as f:
        f.write(f"[cinder]\nauth_strategy = noauth\n"
                f"endpoint = {s.cinder_url}\n"
                f"glance_endpoint = {s.glance_url}\n"
                f"user_id = {services.USER}\n"
                f"project_id = {services.PROJECT}\n")
    return path


def upload_image(s: services.Services, path: str | None, *,
                 name: str = "vmthunder-test", disk_format: str = "raw"
                 ) -> str:
    """A Glance image with ``path``'s bytes (None: left queued); its id."""
    from vmthunder.cinder import client as cc
    glance = cc.image_api(settings_of(s))
    image = glance.post("/v2/images", json={
        "name": name, "disk_format": disk_format,
        "container_format": "bare"}).json()
    if path is not None:
        with open(path, "rb") as f:
            glance.put(f"/v2/images/{image['id']}/file", data=f,
                       headers={"Content-Type": "application/octet-stream"})
        deadline = time.monotonic() + 60
        while glance.get(f"/v2/images/{image['id']}").json()["status"] \
                != "active":
            assert time.monotonic() < deadline, "image not active"
            time.sleep(0.2)
    return image["id"]


def volume_file(s: services.Services, volume_id: str) -> str:
    return os.path.join(s.volumes_dir, f"volume-{volume_id}")
