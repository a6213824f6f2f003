#!/usr/bin/env bash
# Sets up the Nova side of vmthunder: a separate virtualenv <repo>/.venv-nova
# with a pinned Nova release, libvirt-python, Nova's test dependencies and
# vmthunder itself (editable), for the Nova compute driver (nova_driver/)
# and its tests (tests/nova/).
#
# Nova pins many OpenStack libraries of its own and importing nova.tests
# monkey-patches the whole process with eventlet, hence a venv of its own
# rather than the project's .venv. Everything pip resolves is pinned in
# scripts/nova-constraints.txt; wheels are kept in <repo>/.cache/wheels-nova
# (git-ignored, filled by `pip wheel` the first time, libvirt-python built
# once), and the venv is installed from there without an index, so a fresh
# venv installs in about a minute once the wheelhouse is there and a re-run
# with nothing changed takes a second (a stamp of the pins).
#
# Called at the end of scripts/install.sh; runs on its own too.
# Environment:
#   VMTHUNDER_SKIP_NOVA=1   do nothing
#   VMTHUNDER_SKIP_APT=1    do not check/install Debian packages
#   PYTHON=/path/python3    interpreter for the venv (default: python3 on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-nova"
WHEELS="$REPO/.cache/wheels-nova"
CONSTRAINTS="$REPO/scripts/nova-constraints.txt"
PYTHON="${PYTHON:-python3}"

# The pins: Nova itself, the libvirt binding (built from source against
# Debian's libvirt-dev), the test libraries Nova's own unit tests need
# (nova.tests ships in the wheel), and pytest for tests/nova.
PINS=(
    nova==34.0.0
    libvirt-python==12.8.0
    testtools==2.9.1
    oslotest==6.1.1
    wsgi-intercept==1.13.1
    ddt==1.7.2
    requests-mock==1.12.1
    testscenarios==0.7.0
    stestr==4.2.1
    pytest==9.2.0
    pytest-timeout==2.4.0
)
# Debian packages to build libvirt-python.
PACKAGES=(libvirt-dev pkg-config gcc python3-dev python3-venv)

log() { printf 'install-nova.sh: %s\n' "$*"; }
die() { printf 'install-nova.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ "${VMTHUNDER_SKIP_NOVA:-0}" == 1 ]]; then
    log "skipped (VMTHUNDER_SKIP_NOVA=1)"
    exit 0
fi
cd "$REPO"

# shellcheck source=scripts/venv-lib.sh
source "$REPO/scripts/venv-lib.sh"
ensure_debian_packages
ensure_venv
STAMP="$VENV/.vmthunder-nova-install"
STAMP_FILES=("$CONSTRAINTS" setup.cfg setup.py requirements.txt)
WANT="$(stamp_value)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$VENV/bin/python" -I -c 'import nova, libvirt, nova_driver, stestr' \
        2>/dev/null; then
    log "Nova venv: up to date ($VENV)"
    exit 0
fi

log "pip install ${PINS[0]} and its test dependencies into $VENV"
start=$SECONDS
install_pins "libvirt-python needs libvirt-dev and pkg-config:" \
    "apt-get install libvirt-dev pkg-config"
"$VENV/bin/python" -I -c 'import nova, libvirt, nova_driver' \
    || die "the Nova venv does not import nova, libvirt and nova_driver"
printf '%s\n' "$WANT" >"$STAMP"
log "Nova venv ready in $((SECONDS - start)) s:" \
    "$VENV/bin/vmthunder-nova-compute, tests: tests/nova/"
