"""URLs with their passwords hidden, for logs, errors and the API."""

from __future__ import annotations


def redact_url(url: str) -> str:
    """``url`` with any password in its user part replaced by ``***``:
    ``user:secret@`` (redis://, etcd3+http://) and ``user%secret@``
    (iscsi://, libiscsi's form)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        for mark in ("%", ":"):
            if mark in userinfo:
                userinfo = userinfo.partition(mark)[0] + mark + "***"
                break
    return f"{scheme}{sep}{userinfo}{at}{hostport}{slash}{path}"
