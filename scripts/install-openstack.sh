#!/usr/bin/env bash
# Sets up the OpenStack services vmthunder's Cinder path is tested against:
# a separate virtualenv <repo>/.venv-openstack with pinned Cinder (api,
# scheduler, volume), Glance (run under gunicorn), python-cinderclient,
# python-glanceclient and keystoneauth1, plus vmthunder itself (editable), so
# that cinder-volume can load vmthunder's file-backed volume driver
# (vmthunder/cinder/file_driver.py) and the tests (tests/openstack/) can start
# real services (tests/openstack/services.py).
#
# Cinder and Glance pin many OpenStack libraries of their own (and run under
# eventlet), hence a venv of their own rather than the project's .venv.
# Everything pip resolves is pinned in scripts/openstack-constraints.txt;
# wheels are kept in <repo>/.cache/wheels-openstack (git-ignored, filled by
# `pip wheel` the first time), and the venv is installed from there without
# an index, so a fresh venv installs in about a minute once the wheelhouse is
# there and a re-run with nothing changed takes a second (a stamp of the
# pins).
#
# The Debian packages the services need (rabbitmq-server, tgt, qemu-utils)
# are in scripts/install.sh's list; this script checks rabbitmq-server too
# when run on its own.
#
# Called at the end of scripts/install.sh; runs on its own too.
# Environment:
#   VMTHUNDER_SKIP_OPENSTACK=1  do nothing
#   VMTHUNDER_SKIP_APT=1        do not check/install Debian packages
#   PYTHON=/path/python3        interpreter for the venv (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-openstack"
WHEELS="$REPO/.cache/wheels-openstack"
CONSTRAINTS="$REPO/scripts/openstack-constraints.txt"
PYTHON="${PYTHON:-python3}"

# The pins: the services (one OpenStack release: Cinder 29, Glance 33 are
# 2026.2, like nova 34 in .venv-nova), the WSGI server Glance needs, the
# clients vmthunder's Cinder path uses.
PINS=(
    cinder==29.0.0
    glance==33.0.0
    gunicorn==27.0.1
    python-cinderclient==9.10.0
    python-glanceclient==4.13.0
    keystoneauth1==5.18.1
)
PACKAGES=(rabbitmq-server tgt qemu-utils gcc python3-dev python3-venv)

log() { printf 'install-openstack.sh: %s\n' "$*"; }
die() { printf 'install-openstack.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ "${VMTHUNDER_SKIP_OPENSTACK:-0}" == 1 ]]; then
    log "skipped (VMTHUNDER_SKIP_OPENSTACK=1)"
    exit 0
fi
cd "$REPO"

# shellcheck source=scripts/venv-lib.sh
source "$REPO/scripts/venv-lib.sh"
ensure_debian_packages
ensure_venv
STAMP="$VENV/.vmthunder-openstack-install"
STAMP_FILES=("$CONSTRAINTS" setup.cfg setup.py requirements.txt)
check_imports() {
    "$VENV/bin/python" -I -c 'import cinder, glance, gunicorn, cinderclient
import glanceclient, keystoneauth1, vmthunder.cinder.file_driver' 2>/dev/null
}
WANT="$(stamp_value)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && check_imports; then
    log "OpenStack venv: up to date ($VENV)"
    exit 0
fi

start=$SECONDS
install_pins
check_imports \
    || die "the OpenStack venv does not import cinder, glance, gunicorn," \
           "the clients and vmthunder.cinder.file_driver"
printf '%s\n' "$WANT" >"$STAMP"
log "OpenStack venv ready in $((SECONDS - start)) s: $VENV/bin/cinder-api," \
    "cinder-scheduler, cinder-volume, gunicorn (Glance); tests:" \
    "tests/openstack/"
