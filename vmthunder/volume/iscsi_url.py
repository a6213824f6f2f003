"""``iscsi://`` URLs and iSCSI portals.

:func:`parse_iscsi_url` reads ``iscsi://[user[%password]@]host[:port]/
IQN/LUN`` (libiscsi's and QEMU's syntax) into an :class:`IscsiUrl`;
:func:`parse_portal` reads ``host[:port]`` (``[v6]:port``) into a
:class:`Portal`. Pure parsing: no network, no libiscsi.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from vmthunder.redaction import redact_url

DEFAULT_PORT = 3260


@dataclasses.dataclass(frozen=True)
class Portal:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class IscsiUrl:
    portal: Portal
    target: str
    lun: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        """The URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        target = urllib.parse.quote(self.target, safe=".-_:")
        return f"iscsi://{user}{self.portal}/{target}/{self.lun}"


def parse_portal(text: str) -> Portal:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"bad iSCSI portal {text!r}: expected HOST[:PORT]")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad iSCSI portal {text!r}: expected "
                             f"[IPV6]:PORT")
        port = rest[1:] if rest else ""
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = text, ""
        elif ":" in host:
            raise ValueError(f"bad iSCSI portal {text!r}: write an IPv6 "
                             f"address in brackets, [ADDR]:PORT")
        elif not port:
            raise ValueError(f"bad iSCSI portal {text!r}: empty port")
    if not host:
        raise ValueError(f"bad iSCSI portal {text!r}: no host")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port {port!r} in iSCSI portal {text!r}")
        return Portal(host, int(port))
    return Portal(host)


def parse_iscsi_url(url: str, *, password: str | None = None) -> IscsiUrl:
    """Parse ``iscsi://[user[%password]@]host[:port]/IQN/LUN``.

    As in libiscsi, ``%`` separates user and password, and the target
    name is percent-decoded (``%3A`` is ``:``; a plain ``:`` works too).
    ``password`` (not in the URL, so not in process lists) overrides the
    one in the URL; a password needs a user.
    """
    if not isinstance(url, str):
        raise TypeError(f"iSCSI URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "iscsi":
        raise ValueError(f"not an iSCSI URL: {redact_url(url)!r} (expected "
                         f"iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN)")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    username = url_password = None
    if at:
        username, pct, url_password = userinfo.partition("%")
        if not username:
            raise ValueError(f"iSCSI URL {redact_url(url)!r} has an empty "
                             f"user name before '@'")
        if not pct:
            url_password = None
    portal = parse_portal(hostport) if hostport else None
    if portal is None:
        raise ValueError(f"iSCSI URL {redact_url(url)!r} has no host")
    path = path.rstrip("/") if slash else ""
    target, slash2, lun_text = path.rpartition("/")
    if not slash2 or not target:
        raise ValueError(f"iSCSI URL {redact_url(url)!r} needs a target and a "
                         f"LUN: iscsi://HOST[:PORT]/IQN/LUN")
    target = urllib.parse.unquote(target)
    if "/" in target or not target.strip():
        raise ValueError(f"iSCSI URL {redact_url(url)!r}: bad target name "
                         f"{target!r}")
    if not lun_text.isdigit() or int(lun_text) > 16383:
        raise ValueError(f"iSCSI URL {redact_url(url)!r}: bad LUN "
                         f"{lun_text!r} (a number from 0 to 16383)")
    if password is not None:
        url_password = password
    if url_password is not None and not username:
        raise ValueError(f"iSCSI URL {redact_url(url)!r}: a CHAP password "
                         f"needs a user name (iscsi://USER%PASSWORD@...)")
    return IscsiUrl(portal=portal, target=target, lun=int(lun_text),
                    username=username, password=url_password)


