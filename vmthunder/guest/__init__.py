"""The test guests' builders, shipped with the package.

``build-guest.sh`` (the small busybox guest `vmthunder boot` boots) and
``build-guest-debian.sh`` (the realistic guest of the benchmarks) live
here, with the small guest's init scripts (``guest-init/``), so that an
installed vmthunder (``pip install .``, not editable) can build its guest
without the source tree. In a checkout, ``scripts/build-guest*.sh`` are
symbolic links to these.

Each builder takes its output directory as its argument; callers always
pass one (the builders' own default is relative to a checkout).
"""

from __future__ import annotations

import os
import pathlib
from importlib import resources

SMALL = "build-guest.sh"
DEBIAN = "build-guest-debian.sh"


class BuilderMissing(RuntimeError):
    pass


def builder(name: str = SMALL) -> str:
    """The path of the packaged builder ``name``, a real file on disk
    (the builders run with bash and find their helpers beside them)."""
    path = resources.files(__name__) / name
    if not isinstance(path, pathlib.Path):
        raise BuilderMissing(
            f"the guest builder {name} is inside an archive "
            f"({path}); install vmthunder unpacked (pip install .)")
    if not path.is_file():
        raise BuilderMissing(f"no guest builder {name} in {path.parent}: "
                             "the installation is incomplete")
    return str(path)


def source_checkout() -> str | None:
    """The source tree this package runs from (its ``scripts/install.sh``
    beside the package), or None for an installed package."""
    root = pathlib.Path(__file__).resolve().parents[2]
    return str(root) if (root / "scripts" / "install.sh").is_file() \
        else None


def default_dir(name: str = "guest") -> str:
    """Where a guest is kept by default: ``<checkout>/.cache/NAME`` in a
    source tree; else ``$XDG_CACHE_HOME/vmthunder/NAME`` (by default
    ``~/.cache/vmthunder/NAME``)."""
    root = source_checkout()
    if root is not None:
        return os.path.join(root, ".cache", name)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vmthunder", name)
