"""iscsi:// URL and portal parsing (no network, no libiscsi needed)."""

from __future__ import annotations

import pytest

from vmthunder.volume.iscsi_url import (IscsiUrl, Portal, parse_iscsi_url,
                                        parse_portal)

IQN = "iqn.2024-01.org.vmthunder:image1"


def test_plain_url():
    u = parse_iscsi_url(f"iscsi://127.0.0.1:3261/{IQN}/1")
    assert u == IscsiUrl(Portal("127.0.0.1", 3261), IQN, 1)
    assert u.username is None and u.password is None
    assert str(u.portal) == "127.0.0.1:3261"


def test_default_port_and_hostname():
    u = parse_iscsi_url(f"iscsi://storage.example.org/{IQN}/0")
    assert u.portal == Portal("storage.example.org", 3260)
    assert u.lun == 0


def test_chap_user_and_password():
    u = parse_iscsi_url(f"iscsi://alice%s3cr:et@10.0.0.1/{IQN}/2")
    assert (u.username, u.password) == ("alice", "s3cr:et")
    assert u.lun == 2
    # The password never shows in str() or repr().
    assert "s3cr" not in str(u) and "s3cr" not in repr(u)
    assert str(u) == f"iscsi://alice@10.0.0.1:3260/{IQN}/2"


def test_password_with_at_sign_and_percent():
    u = parse_iscsi_url(f"iscsi://bob%p@ss%word@host/{IQN}/1")
    assert (u.username, u.password) == ("bob", "p@ss%word")
    assert u.portal.host == "host"


def test_user_without_password():
    u = parse_iscsi_url(f"iscsi://carol@host/{IQN}/1")
    assert (u.username, u.password) == ("carol", None)


def test_password_argument_overrides_url():
    u = parse_iscsi_url(f"iscsi://alice@host/{IQN}/1", password="secret")
    assert u.password == "secret"
    u = parse_iscsi_url(f"iscsi://alice%old@host/{IQN}/1", password="new")
    assert u.password == "new"


def test_password_needs_user():
    with pytest.raises(ValueError, match="needs a user"):
        parse_iscsi_url(f"iscsi://host/{IQN}/1", password="secret")


def test_percent_encoded_target():
    u = parse_iscsi_url("iscsi://host/iqn.2024-01.org.x%3Aimg/3")
    assert u.target == "iqn.2024-01.org.x:img"


def test_ipv6_portal():
    u = parse_iscsi_url(f"iscsi://[::1]:3262/{IQN}/1")
    assert u.portal == Portal("::1", 3262)
    assert str(u.portal) == "[::1]:3262"
    assert parse_iscsi_url(f"iscsi://[fe80::1]/{IQN}/1").portal.port == 3260


def test_trailing_slash_and_scheme_case():
    u = parse_iscsi_url(f"ISCSI://host/{IQN}/7/")
    assert u.lun == 7


@pytest.mark.parametrize("url, match", [
    (f"nbd://host/{IQN}/1", "not an iSCSI URL"),
    (f"host/{IQN}/1", "not an iSCSI URL"),
    (f"iscsi:///{IQN}/1", "no host"),
    ("iscsi://host", "needs a target and a LUN"),
    (f"iscsi://host/{IQN}", "needs a target and a LUN"),
    ("iscsi://host/1", "needs a target and a LUN"),
    (f"iscsi://host/{IQN}/x", "bad LUN"),
    (f"iscsi://host/{IQN}/-1", "bad LUN"),
    (f"iscsi://host/{IQN}/99999", "bad LUN"),
    (f"iscsi://host:0/{IQN}/1", "bad port"),
    (f"iscsi://host:70000/{IQN}/1", "bad port"),
    (f"iscsi://host:abc/{IQN}/1", "bad port"),
    (f"iscsi://host:/{IQN}/1", "empty port"),
    (f"iscsi://::1/{IQN}/1", "brackets"),
    (f"iscsi://[::1/{IQN}/1", "IPV6"),
    (f"iscsi://%pw@host/{IQN}/1", "empty user"),
    ("iscsi://host/a/b/1", "bad target"),
])
def test_bad_urls(url, match):
    with pytest.raises(ValueError, match=match):
        parse_iscsi_url(url)


def test_errors_never_show_the_password():
    with pytest.raises(ValueError) as info:
        parse_iscsi_url(f"iscsi://alice%topsecret@host/{IQN}/x")
    assert "topsecret" not in str(info.value)
    assert "alice%***" in str(info.value)


def test_not_a_string():
    with pytest.raises(TypeError):
        parse_iscsi_url(None)


@pytest.mark.parametrize("text, portal", [
    ("10.1.2.3", Portal("10.1.2.3", 3260)),
    ("10.1.2.3:3300", Portal("10.1.2.3", 3300)),
    ("san.example", Portal("san.example", 3260)),
    ("[2001:db8::5]:3261", Portal("2001:db8::5", 3261)),
    ("[2001:db8::5]", Portal("2001:db8::5", 3260)),
])
def test_parse_portal(text, portal):
    assert parse_portal(text) == portal


@pytest.mark.parametrize("text", ["", ":3260", "host:", "a:b:c",
                                  "[::1]x", "host:65536"])
def test_bad_portals(text):
    with pytest.raises(ValueError):
        parse_portal(text)
