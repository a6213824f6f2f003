"""A Glance image's Cinder origin, made on first use: ``[vmthunder]
cinder_origin`` of the Nova driver.

An image with no vmthunder origin (no ``vmthunder_origin`` property) is
exported as a Cinder volume (vmthunder.cinder.export: the image's
read-only multiattach volume and its manifest volume, found when they
exist, else made) and booted from ``cinder://VOLUME_ID``. The export runs
under a tooz lock named after the image, on the coordination backend all
compute hosts share (``[vmthunder] coordination_url``, else the
``[coordination] backend_url`` of vmthunder's config file, the agents'
own): in a mass boot the first host makes the volume while the others
wait for the lock, then find it: one volume per image, not one per host.
The export records ``vmthunder_origin = cinder://VOLUME_ID`` on the Glance
image, so later builds read the origin from Glance and never take the
lock.

How to reach Cinder and Glance is the ``[cinder]`` section of vmthunder's
config file (``[vmthunder] vmthunder_config_file``, the file the host's
agent reads: it attaches cinder:// origins with the same settings).

Blocking (HTTP, the manifest's one read of the volume); imports no Nova,
so it runs and is tested without Nova.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid

from vmthunder.cinder.client import CinderError, CinderSettings

LOG = logging.getLogger(__name__)

LOCK_NAME = "vmthunder-cinder-export-{}"
LOCK_LOG_EVERY = 30.0


@dataclasses.dataclass(frozen=True)
class Resolver:
    """What resolve() needs: Cinder settings, the lock's backend."""

    cinder: CinderSettings
    coordination_url: str
    lock_timeout: float = 3600.0

    @classmethod
    def from_files(cls, config_file: str, *,
                   coordination_url: str | None = None,
                   lock_timeout: float = 3600.0) -> Resolver:
        """From vmthunder's config file (its [cinder] and [coordination]
        sections); ``coordination_url`` overrides the latter."""
        from oslo_config import cfg
        from vmthunder import opts as vmt_opts
        if not os.path.exists(config_file):
            raise CinderError(
                f"vmthunder's config file {config_file} does not exist: "
                "its [cinder] section says how to reach Cinder and Glance; "
                "set [vmthunder] vmthunder_config_file in nova.conf to the "
                "agent's config file")
        conf = cfg.ConfigOpts()
        conf.register_opts(vmt_opts.cinder_opts, group="cinder")
        conf.register_opts(vmt_opts.coordination_opts, group="coordination")
        try:
            conf(args=[], project="vmthunder",
                 default_config_files=[config_file], default_config_dirs=[])
        except cfg.Error as exc:
            raise CinderError(f"{config_file}: {exc}") from None
        return cls(CinderSettings.from_conf(conf.cinder),
                   coordination_url or conf.coordination.backend_url,
                   lock_timeout)

    @classmethod
    def from_nova_conf(cls, group) -> Resolver:
        """From nova.conf's [vmthunder] group (nova_driver/opts.py)."""
        return cls.from_files(group.vmthunder_config_file,
                              coordination_url=group.coordination_url,
                              lock_timeout=group.cinder_lock_timeout)

    def resolve(self, image_id: str):
        """The image's export (a vmthunder.cinder.export.CinderExport; its
        ``origin`` is ``cinder://VOLUME_ID``), made under the image's lock
        when missing. CinderError says what went wrong."""
        from vmthunder.cinder import export as cinder_export
        if self.coordination_url.startswith("file://"):
            LOG.warning("vmthunder: the lock of image %s is on %s, which "
                        "covers this host only: hosts booting it at once "
                        "may each make a volume; use the agents' shared "
                        "backend (redis://, etcd3+http://) in [vmthunder] "
                        "coordination_url", image_id, self.coordination_url)
        name = LOCK_NAME.format(image_id)
        # Builds of one nova-compute (threads) queue here first: a file
        # lock is per process.
        with _local_lock(name), self._locked(name, image_id):
            return cinder_export.export_glance_image(
                self.cinder, image_id,
                out=lambda text: LOG.info("vmthunder: %s", text))

    def _locked(self, name: str, image_id: str):
        from tooz import coordination
        member = f"nova-{socket.gethostname()}-{os.getpid()}-" \
                 f"{uuid.uuid4().hex[:8]}"
        try:
            coord = coordination.get_coordinator(self.coordination_url,
                                                 member.encode())
            coord.start(start_heart=True)
        except Exception as exc:
            raise CinderError(
                f"cannot reach the coordination backend "
                f"{_redact(self.coordination_url)} for the lock of image "
                f"{image_id} ({type(exc).__name__}: {exc}); check "
                "[vmthunder] coordination_url (or the agents' "
                "[coordination] backend_url)") from None
        return _Lock(coord, coord.get_lock(name.encode()), image_id,
                     self.lock_timeout)


class _Lock:
    def __init__(self, coord, lock, image_id: str, timeout: float):
        self.coord, self.lock = coord, lock
        self.image_id, self.timeout = image_id, timeout

    def __enter__(self):
        started = time.monotonic()
        tries = 0
        try:
            while True:
                waited = time.monotonic() - started
                left = self.timeout - waited
                if left <= 0:
                    raise CinderError(
                        f"waited {waited:.0f} s for the lock of image "
                        f"{self.image_id} (another host is exporting it to "
                        "Cinder); look at that export (cinder list --name "
                        f"vmthunder-image-{self.image_id}), or raise "
                        "[vmthunder] cinder_lock_timeout")
                if tries:
                    LOG.info("vmthunder: image %s: another host is "
                             "exporting it to Cinder (%.0f s so far)",
                             self.image_id, waited)
                # Bounded waits, so that a long one is logged.
                if self.lock.acquire(blocking=min(LOCK_LOG_EVERY, left)):
                    return self
                tries += 1
        except BaseException:
            self._stop()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.lock.release()
        finally:
            self._stop()

    def _stop(self) -> None:
        try:
            self.coord.stop()
        except Exception as exc:            # the lock goes with the session
            LOG.warning("vmthunder: leaving the coordination backend: %s",
                        exc)


_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(name: str) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(name, threading.Lock())


def _redact(url: str) -> str:
    from vmthunder.redaction import redact_url
    return redact_url(url)
