"""Export names become part of an iSCSI target name and a directory name:
vmthunder.volume.export.check_name keeps them to a safe alphabet."""

import pytest

from vmthunder.volume.export import ExportError, check_name


@pytest.mark.parametrize("name", [
    "", None, "Debian", "-x", ".x", "a_b", "a/b", "../x", "a b", "x" * 64,
    "debian\n", "deb\nian", "é",
])
def test_bad_export_names_are_refused_with_the_rule(name):
    with pytest.raises(ExportError) as info:
        check_name(name)
    assert repr(name) in str(info.value)
    assert "lower-case" in str(info.value)


@pytest.mark.parametrize("name", ["debian-12", "a", "9.x", "x" * 63])
def test_good_export_names_pass(name):
    check_name(name)
