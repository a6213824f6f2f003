"""Cinder and Glance as vmthunder talks to them (python-cinderclient,
keystoneauth1).

:class:`CinderSettings` is the ``[cinder]`` option group as a value;
:func:`volume_client` a cinderclient v3 client at the attachments API's
microversion (3.54), :func:`image_api` a keystoneauth1 adapter on Glance's
v2 API, :func:`connector` this host's connector for attachments, and
:func:`attach` / :func:`detach` one read-only attachment. Every call
blocks (requests): asyncio callers run them in a worker thread.

Errors are :class:`CinderError` with a message that says what failed and
what to check; CHAP secrets from ``connection_info`` never appear in them
or in logs (:class:`Attachment` keeps the password out of its repr).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import socket
import time

LOG = logging.getLogger(__name__)

# The attachments API (attachments.create/complete/delete, mode='ro').
MICROVERSION = "3.54"
DEFAULT_INITIATOR_PREFIX = "iqn.2024-01.org.vmthunder.initiator"
INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"


class CinderError(RuntimeError):
    """A Cinder or Glance call failed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class CinderSettings:
    """How to reach Cinder and Glance (the [cinder] options)."""

    endpoint: str | None = None
    glance_endpoint: str | None = None
    auth_strategy: str = "keystone"
    user_id: str = "vmthunder"
    project_id: str = "vmthunder"
    auth_url: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    project_name: str | None = None
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region_name: str | None = None
    volume_type: str = "vmthunder-multiattach"
    create_timeout: float = 1800.0
    initiator_name: str | None = None
    timeout: float = 60.0

    @classmethod
    def from_conf(cls, group) -> CinderSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: getattr(group, name) for name in fields
                      if hasattr(group, name)})

    def where(self) -> str:
        return self.endpoint or f"the volume endpoint of {self.auth_url}"


def session(settings: CinderSettings):
    from keystoneauth1 import session as ks_session
    if settings.auth_strategy == "noauth":
        from cinderclient.contrib import noauth
        if not settings.endpoint:
            raise CinderError("[cinder] auth_strategy = noauth needs "
                              "[cinder] endpoint (e.g. "
                              "http://HOST:8776/v3)")
        auth = noauth.CinderNoAuthPlugin(settings.user_id,
                                         settings.project_id,
                                         endpoint=settings.endpoint)
    else:
        from keystoneauth1.identity import v3
        if not (settings.auth_url and settings.username):
            raise CinderError("[cinder] auth_strategy = keystone needs "
                              "auth_url, username, password and "
                              "project_name")
        auth = v3.Password(auth_url=settings.auth_url,
                           username=settings.username,
                           password=settings.password,
                           project_name=settings.project_name,
                           user_domain_name=settings.user_domain_name,
                           project_domain_name=settings.project_domain_name)
    return ks_session.Session(auth=auth, timeout=settings.timeout)


def volume_client(settings: CinderSettings, sess=None):
    """A cinderclient v3 client at microversion 3.54."""
    from cinderclient import client as cinder_client
    sess = sess or session(settings)
    kwargs = {}
    if settings.endpoint:
        # Without it the noauth plugin adds the project to the URL.
        kwargs["endpoint_override"] = settings.endpoint
    if settings.region_name:
        kwargs["region_name"] = settings.region_name
    return cinder_client.Client(MICROVERSION, session=sess, **kwargs)


def image_api(settings: CinderSettings, sess=None):
    """Glance's v2 API through a keystoneauth1 adapter."""
    from keystoneauth1 import adapter
    sess = sess or session(settings)
    if settings.auth_strategy == "noauth" and not settings.glance_endpoint:
        raise CinderError("[cinder] auth_strategy = noauth needs "
                          "[cinder] glance_endpoint (e.g. http://HOST:9292)")
    return adapter.Adapter(sess, service_type="image",
                           endpoint_override=settings.glance_endpoint,
                           region_name=settings.region_name)


def initiator_name(settings: CinderSettings) -> str:
    """This host's iSCSI initiator name: configured, else open-iscsi's,
    else one made of the host name."""
    if settings.initiator_name:
        return settings.initiator_name
    try:
        with open(INITIATOR_FILE) as f:
            for line in f:
                if line.startswith("InitiatorName="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    host = "".join(c if c.isalnum() or c in ".-" else "-"
                   for c in socket.gethostname().lower())
    return f"{DEFAULT_INITIATOR_PREFIX}:{host}"


def local_address(settings: CinderSettings) -> str:
    """This host's address toward Cinder (the one the kernel would send
    from to the endpoint's host; no packet is sent): the connector's
    ``ip``, where a host in its own network reaches the storage.
    127.0.0.1 when there is no endpoint or no route."""
    from urllib.parse import urlsplit
    try:
        where = urlsplit(settings.endpoint or settings.auth_url or "")
        if not where.hostname:
            return "127.0.0.1"
        family, _, _, _, addr = socket.getaddrinfo(
            where.hostname, where.port or 80, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def connector(settings: CinderSettings) -> dict:
    """The connector this host gives Cinder: os-brick's properties where
    it finds a kernel initiator, else (the userspace initiator) ours."""
    props = {}
    from vmthunder.volume import osbrick_source
    if osbrick_source.kernel_initiator_available()[0]:
        try:
            from os_brick.initiator import connector as brick
            props = dict(brick.get_connector_properties(
                osbrick_source.DEFAULT_ROOT_HELPER,
                socket.gethostbyname(socket.gethostname()), False,
                False) or {})
        except Exception as exc:    # no root helper: ours
            LOG.warning("os-brick connector properties unavailable: %s",
                        exc)
    props.setdefault("initiator", initiator_name(settings))
    props.setdefault("host", socket.gethostname())
    props.setdefault("ip", local_address(settings))
    props.setdefault("platform", platform.machine())
    props.setdefault("os_type", "linux")
    props["multipath"] = False
    props["do_local_attach"] = False
    return props


@dataclasses.dataclass
class Attachment:
    """One attachment and what its connection_info says (the CHAP secret
    is kept out of repr and logs)."""

    id: str
    volume_id: str
    portal: str
    iqn: str
    lun: int
    username: str | None
    password: str | None = dataclasses.field(repr=False)

    @classmethod
    def from_connection_info(cls, attachment_id: str, volume_id: str,
                             info: dict) -> Attachment:
        if info.get("driver_volume_type", "iscsi") != "iscsi":
            raise CinderError(
                f"volume {volume_id} is attached through "
                f"{info.get('driver_volume_type')!r}; vmthunder reads "
                "iSCSI volumes only")
        try:
            portal = info["target_portal"]
            iqn = info["target_iqn"]
            lun = int(info.get("target_lun", 0))
        except (KeyError, TypeError, ValueError):
            raise CinderError(
                f"attachment {attachment_id} of volume {volume_id} has no "
                "iSCSI portal, IQN and LUN in its connection_info (does "
                "the backend export it?)") from None
        user = password = None
        if info.get("auth_method", "").upper() == "CHAP":
            user = info.get("auth_username")
            password = info.get("auth_password")
        return cls(attachment_id, volume_id, portal, iqn, lun, user,
                   password)

    def url(self) -> str:
        """iscsi://[USER@]PORTAL/IQN/LUN (no secret)."""
        user = f"{self.username}@" if self.username else ""
        return f"iscsi://{user}{self.portal}/{self.iqn}/{self.lun}"


def attach(client, volume_id: str, conn: dict, *, mode: str = "ro"
           ) -> Attachment:
    """Attach ``volume_id`` for this host (``conn``: :func:`connector`),
    complete the attachment, return what to log in with.

    In two steps, as Nova does: the attachment is reserved (no
    connector), then connected (the volume service exports the volume).
    A server error of the second step (a busy database in the volume
    service) is tried again on the same attachment; a failure in the
    end deletes it, so none is left reserved."""
    from cinderclient import exceptions as cexc
    try:
        att = client.attachments.create(volume_id, None, mode=mode)
    except cexc.NotFound:
        raise CinderError(f"Cinder volume {volume_id} does not exist") \
            from None
    except cexc.ClientException as exc:
        raise CinderError(f"attaching Cinder volume {volume_id} "
                          f"({mode}) failed: {exc}") from None
    att_id = att["id"] if isinstance(att, dict) else att.id
    try:
        connected = _server_errors_retried(
            lambda: client.attachments.update(att_id, conn),
            f"volume {volume_id}: connecting attachment {att_id}")
        info = connected["connection_info"] if isinstance(connected, dict) \
            else connected.connection_info
        attachment = Attachment.from_connection_info(att_id, volume_id,
                                                     info or {})
        client.attachments.complete(att_id)
    except cexc.ClientException as exc:
        detach(client, att_id, volume_id)
        raise CinderError(f"attaching Cinder volume {volume_id} "
                          f"({mode}) failed: {exc}") from None
    except BaseException:
        detach(client, att_id, volume_id)
        raise
    LOG.info("volume %s attached (%s), attachment %s: %s", volume_id, mode,
             att_id, attachment.url())
    return attachment


# Seconds between the tries of an attachment's creation or deletion that
# Cinder answered with a server error (5xx: a busy database, a restarting
# API behind its load balancer); then the error is the caller's.
SERVER_ERROR_RETRIES = (0.5, 1.0, 2.0, 4.0)


def _server_errors_retried(call, what: str):
    """``call()``, tried again after SERVER_ERROR_RETRIES when Cinder
    answers a server error; any other error at once."""
    from cinderclient import exceptions as cexc
    for delay in (*SERVER_ERROR_RETRIES, None):
        try:
            return call()
        except cexc.ClientException as exc:
            code = getattr(exc, "code", None)
            if delay is None or not isinstance(code, int) \
                    or not 500 <= code < 600:
                raise
            LOG.warning("%s: %s; trying again in %g s", what, exc, delay)
            time.sleep(delay)


def detach(client, attachment_id: str, volume_id: str = "?") -> None:
    """Delete an attachment; one already gone is not an error, a server
    error is tried again (deleting is idempotent), since an attachment
    left behind keeps the volume exported to this host."""
    from cinderclient import exceptions as cexc
    try:
        _server_errors_retried(
            lambda: client.attachments.delete(attachment_id),
            f"volume {volume_id}: deleting attachment {attachment_id}")
    except cexc.NotFound:
        pass
    LOG.info("volume %s: attachment %s deleted", volume_id, attachment_id)


def describe_error(exc: BaseException, settings: CinderSettings) -> str:
    """A Cinder/Glance/keystoneauth exception as one sentence."""
    from keystoneauth1 import exceptions as ksexc
    if isinstance(exc, ksexc.ConnectFailure):
        return (f"Cinder or Glance is unreachable ({settings.where()}): "
                f"{type(exc).__name__}; check [cinder] endpoint and "
                "glance_endpoint, and that the services run")
    if isinstance(exc, ksexc.DiscoveryFailure):
        return f"no Cinder endpoint found through {settings.auth_url}"
    return f"{type(exc).__name__}: {exc}"

