"""``vmthunder-nova-compute``: nova-compute with vmthunder's driver.

Nova loads its compute driver as ``nova.virt.<compute_driver>`` only
(``load_compute_driver`` in nova/virt/driver.py prefixes every name with
``nova.virt.``), so an out-of-tree module path in ``compute_driver`` makes
nova-compute exit. This command makes our driver module importable as
``nova.virt.vmthunder`` and then runs Nova's own ``nova-compute`` entry
point, arguments and all, so that nova.conf says::

    [DEFAULT]
    compute_driver = vmthunder.VMThunderLibvirtDriver

Nothing is patched in Nova: the module is only registered under a second
name (``sys.modules``) before Nova looks it up.
"""

from __future__ import annotations

import sys

MODULE = "nova.virt.vmthunder"


def register() -> None:
    """Make ``nova.virt.vmthunder`` our driver module."""
    import nova.virt
    from nova_driver import driver
    sys.modules[MODULE] = driver
    nova.virt.vmthunder = driver


def main() -> None:
    try:
        # First, as nova-compute does: nova.cmd.compute sets up Nova's
        # concurrency (nova.monkey_patch) before the rest of Nova and our
        # driver are imported.
        from nova.cmd import compute
    except ImportError as exc:
        sys.exit(f"vmthunder-nova-compute: cannot import Nova ({exc}); "
                 "install the Nova side (scripts/install-nova.sh makes "
                 ".venv-nova; or pip install 'vmthunder[nova]') and run "
                 "this command from there")
    register()
    sys.argv[0] = "nova-compute"
    compute.main()


if __name__ == "__main__":
    main()
