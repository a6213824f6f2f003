"""nova_driver.opts: the [vmthunder] group of nova.conf, its entry point
and its sample. Needs only oslo.config: runs in the main suite."""

import difflib
import importlib.metadata
import pathlib

from oslo_config import cfg
from oslo_config import generator

from nova_driver import opts

REPO = pathlib.Path(__file__).resolve().parents[2]
GENERATOR_CONF = REPO / "etc" / "oslo-config-generator" / \
    "nova-vmthunder.conf"
SAMPLE = REPO / "etc" / "nova" / "nova-vmthunder.conf.sample"


def test_list_opts_and_defaults():
    [(group, group_opts)] = opts.list_opts()
    assert group.name == "vmthunder"
    names = [o.name for o in group_opts]
    assert len(names) == len(set(names))
    assert {"agent_socket", "agent_timeout", "origin_property",
            "origin_template", "fallback_to_download", "nbd_transport",
            "precache_trace_dir", "precache_timeout", "precache_base",
            "cinder_origin",
            "vmthunder_config_file", "coordination_url",
            "cinder_lock_timeout"} == set(names)
    for opt in group_opts:
        assert opt.help and opt.help.strip(), opt.name
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[], default_config_dirs=[])
    assert conf.vmthunder.agent_socket == "/run/vmthunder/agent.sock"
    assert conf.vmthunder.origin_property == "vmthunder_origin"
    assert conf.vmthunder.origin_template is None
    assert conf.vmthunder.fallback_to_download is False
    assert conf.vmthunder.nbd_transport == "auto"
    assert conf.vmthunder.cinder_origin is False
    assert conf.vmthunder.precache_base is False
    assert conf.vmthunder.coordination_url is None


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="oslo.config.opts")
    values = {ep.name: ep.value for ep in eps}
    assert values.get("vmthunder.nova") == "nova_driver.opts:list_opts", (
        "oslo.config.opts entry point 'vmthunder.nova' is missing; install "
        "the package (scripts/install.sh, or pip install -e .)")
    scripts = {ep.name: ep.value for ep in
               importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("vmthunder-nova-compute") == "nova_driver.cmd:main"


def test_sample_config_is_current(tmp_path):
    out = tmp_path / "nova-vmthunder.conf.sample"
    generator.main(args=["--config-file", str(GENERATOR_CONF),
                         "--output-file", str(out)])
    generated = out.read_text()
    committed = SAMPLE.read_text() if SAMPLE.exists() else ""
    if generated != committed:
        diff = "".join(difflib.unified_diff(
            committed.splitlines(keepends=True),
            generated.splitlines(keepends=True), n=1))
        raise AssertionError(
            f"{SAMPLE.relative_to(REPO)} is stale: run oslo-config-generator "
            f"--config-file {GENERATOR_CONF.relative_to(REPO)} and commit "
            "the result.\n" + diff[:4000])


def test_console_script_without_nova_says_what_to_do(monkeypatch, capsys):
    import builtins
    import pytest
    from nova_driver import cmd
    real_import = builtins.__import__

    def no_nova(name, *args, **kwargs):
        if name == "nova" or name.startswith("nova."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nova)
    with pytest.raises(SystemExit) as exc:
        cmd.main()
    assert "scripts/install-nova.sh" in str(exc.value)
