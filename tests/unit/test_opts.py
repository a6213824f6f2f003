"""vmthunder.opts: option help, the entry point, and the sample config."""

import difflib
import importlib.metadata
import pathlib

from oslo_config import cfg
from oslo_config import generator

from vmthunder import opts

REPO = pathlib.Path(__file__).resolve().parents[2]
GENERATOR_CONF = REPO / "etc" / "oslo-config-generator" / "vmthunder.conf"
SAMPLE = REPO / "etc" / "vmthunder" / "vmthunder.conf.sample"


def test_list_opts_groups_and_help():
    listed = opts.list_opts()
    assert listed, "list_opts() returned no groups"
    groups = [group for group, _ in listed]
    assert len(groups) == len(set(groups)), f"duplicate groups: {groups}"
    for group, group_opts in listed:
        assert group_opts, f"group [{group}] has no options"
        names = [opt.name for opt in group_opts]
        assert len(names) == len(set(names)), (
            f"duplicate options in [{group}]: {names}")
        for opt in group_opts:
            assert isinstance(opt, cfg.Opt)
            assert opt.help and opt.help.strip(), (
                f"[{group}] {opt.name} has no help text")


def test_register_opts_defaults():
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], default_config_files=[], default_config_dirs=[])
    for group, group_opts in opts.list_opts():
        for opt in group_opts:
            assert getattr(getattr(conf, group), opt.dest) == opt.default


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="oslo.config.opts")
    values = {ep.name: ep.value for ep in eps}
    assert values.get("vmthunder") == "vmthunder.opts:list_opts", (
        "oslo.config.opts entry point 'vmthunder' is missing or wrong; "
        "install the package (scripts/install.sh, or pip install -e .)")


def test_sample_config_is_current(tmp_path):
    out = tmp_path / "vmthunder.conf.sample"
    generator.main(args=["--config-file", str(GENERATOR_CONF),
                         "--output-file", str(out)])
    generated = out.read_text()
    committed = SAMPLE.read_text() if SAMPLE.exists() else ""
    if generated != committed:
        diff = "".join(difflib.unified_diff(
            committed.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            fromfile="committed " + str(SAMPLE.relative_to(REPO)),
            tofile="generated from vmthunder/opts.py", n=1))
        raise AssertionError(
            f"{SAMPLE.relative_to(REPO)} is stale: run `tox -e genconfig` "
            "(or .venv/bin/oslo-config-generator --config-file "
            f"{GENERATOR_CONF.relative_to(REPO)}) and commit the result.\n"
            + diff[:4000])
