"""What an operator copies (etc/): the example config names only real
options and gives a working agent configuration; the systemd units and
the logrotate file pass their tools' own checks; the agent tells systemd
when it is ready (sd_notify)."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys

import pytest
from oslo_config import cfg

from vmthunder import opts
from vmthunder.agent import main as agent_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "etc", "vmthunder", "vmthunder.conf.example")
UNITS = os.path.join(REPO, "etc", "systemd")


def test_example_config_names_only_real_options():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(EXAMPLE)
    assert parser.sections()
    for section in parser.sections():
        names = {o.dest for o in opts.GROUPS[section]}
        unknown = set(parser[section]) - names
        assert not unknown, f"[{section}] {sorted(unknown)} are no options"


def test_example_config_makes_an_agent_config():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[EXAMPLE])
    args = agent_main.build_parser().parse_args([])
    config = agent_main.make_config(args, conf)
    assert str(config.hypervisor_listen) == "unix:/run/vmthunder/nbd.sock"
    assert str(config.peer_listen) == "tcp:10.0.0.11:10810"
    assert str(config.metrics_listen) == "tcp:127.0.0.1:9178"
    assert config.stalled_read_seconds == 10
    assert config.health_min_free_bytes == 1024 * 1024 * 1024
    assert config.coordination.backend_url.startswith("redis://")
    assert config.exports.portal == "10.0.0.5:3260"


@pytest.mark.parametrize("unit", ["vmthunder-agent.service",
                                  "vmthunder-exports.service"])
def test_systemd_units_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    with open(os.path.join(UNITS, unit)) as f:
        text = f.read()
    # The binaries of this checkout's venv stand for /usr/local/bin's.
    bindir = os.path.dirname(sys.executable)
    for prog in ("vmthunder-agent", "vmthunder"):
        if not os.path.exists(os.path.join(bindir, prog)):
            pytest.skip(f"{prog} is not installed in {bindir}")
    text = text.replace("/usr/local/bin/", bindir + "/")
    path = tmp_path / unit
    path.write_text(text)
    out = subprocess.run([analyze, "verify", str(path)],
                         capture_output=True, text=True, timeout=60)
    # Only our unit is judged: units it names that this machine lacks
    # (libvirtd, nova-compute...) are not errors of ours.
    ours = [line for line in (out.stdout + out.stderr).splitlines()
            if unit in line]
    assert not ours, "\n".join(ours)


def test_logrotate_file_parses(tmp_path):
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        pytest.skip("logrotate not installed")
    # logrotate ignores a file writable by group or others: check a copy
    # with the mode a package installs, whatever the checkout's umask.
    conf = tmp_path / "vmthunder"
    shutil.copyfile(os.path.join(REPO, "etc", "logrotate.d", "vmthunder"),
                    conf)
    conf.chmod(0o644)
    out = subprocess.run(
        [logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stderr.lower(), out.stderr


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(abstract, tmp_path, monkeypatch):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"vmthunder-test-{os.getpid()}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = str(tmp_path / "notify")
            sock.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
        sock.settimeout(5)
        assert agent_main.sd_notify("READY=1") is True
        assert sock.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert agent_main.sd_notify("READY=1") is False      # never fatal
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert agent_main.sd_notify("READY=1") is False
