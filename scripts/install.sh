#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine to run and test vmthunder:
#   1. Debian packages (apt-get, only when some are missing),
#   2. a virtualenv in <repo>/.venv with vmthunder installed editable plus
#      requirements.txt and test-requirements.txt,
#   3. the small test guest (scripts/build-guest.sh, when present) and its
#      whole-disk variant (scripts/build-guest-disk.sh).
# Idempotent: a re-run only checks and is quick.
#
# Run as root, or as a user with sudo (used for apt-get only).
# Environment:
#   VMTHUNDER_SKIP_APT=1    do not check/install Debian packages
#   VMTHUNDER_SKIP_GUEST=1  do not build the test guest
#   PYTHON=/path/python3    interpreter for the venv (default: python3 on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PYTHON="${PYTHON:-python3}"

log() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

cd "$REPO"

# --- 1. Debian packages -----------------------------------------------------
PACKAGES=(
    python3 python3-venv python3-dev gcc
    tgt
    qemu-system-x86 qemu-utils qemu-block-extra
    libnbd-bin nbdkit python3-libnbd
    busybox-static e2fsprogs cpio xz-utils
    fio
    # curl: the HTTP peer of the transfer benchmark (vmthunder/bench/transfer.py)
    curl
    libiscsi-bin libiscsi-dev
    iproute2
    redis-server debootstrap
    # etcd, the other coordination backend the membership tests start
    etcd-server
    # the whole-disk test guest (scripts/build-guest-disk.sh)
    fdisk dosfstools mtools syslinux syslinux-common
    # libvirtd for the tests (tests/functional/libvirt_fixtures.py);
    # libvirt-dev and pkg-config build libvirt-python
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    libvirt-dev pkg-config
    # the OpenStack services the Cinder tests start (tests/openstack/):
    # RabbitMQ for oslo.messaging; Cinder's tgtadm target helper runs
    # tgt-admin (package tgt, above)
    rabbitmq-server
)

missing_packages() {
    # One dpkg-query for all packages; unknown ones print nothing.
    local installed
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" \
        2>/dev/null | awk '$NF == "installed" && $(NF-1) == "ok" {print $1}' \
        || true)"
    local p
    for p in "${PACKAGES[@]}"; do
        grep -qxF "$p" <<<"$installed" || printf '%s\n' "$p"
    done
}

if [[ "${VMTHUNDER_SKIP_APT:-0}" == 1 ]]; then
    log "skipping Debian packages (VMTHUNDER_SKIP_APT=1)"
else
    command -v dpkg-query >/dev/null \
        || die "dpkg-query not found: this script expects Debian 12"
    mapfile -t MISSING < <(missing_packages)
    if ((${#MISSING[@]} == 0)); then
        log "Debian packages: all ${#PACKAGES[@]} present"
    else
        log "Debian packages missing: ${MISSING[*]}"
        if [[ "$(id -u)" -eq 0 ]]; then
            SUDO=()
        elif command -v sudo >/dev/null; then
            SUDO=(sudo)
            log "not root: using sudo for apt-get"
        else
            die "installing Debian packages needs root: run this script" \
                "as root (no sudo found), or install: ${MISSING[*]}"
        fi
        "${SUDO[@]}" apt-get update || die "apt-get update failed"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${MISSING[@]}" \
            || die "apt-get install failed"
        mapfile -t STILL < <(missing_packages)
        ((${#STILL[@]} == 0)) \
            || die "still missing after apt-get install: ${STILL[*]}"
        log "Debian packages installed"
    fi
fi

# --- 2. virtualenv ------------------------------------------------------------
command -v "$PYTHON" >/dev/null \
    || die "$PYTHON not found on PATH (Debian: apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "vmthunder needs Python >= 3.11; $(command -v "$PYTHON") is" \
           "$("$PYTHON" -V 2>&1)"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
    log "venv: $VENV ($("$VENV/bin/python" -V 2>&1))"
else
    if [[ -e "$VENV" ]]; then
        log "venv at $VENV is broken: recreating it"
        rm -rf "$VENV"
    fi
    log "creating venv $VENV with $(command -v "$PYTHON")" \
        "($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$VENV" \
        || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi

# Re-run pip only when what it installs from has changed.
STAMP="$VENV/.vmthunder-install"
stamp_value() {
    {
        "$VENV/bin/python" -V 2>&1
        cat setup.py setup.cfg pyproject.toml requirements.txt \
            test-requirements.txt 2>/dev/null
    } | sha256sum | cut -d' ' -f1
}
WANT="$(stamp_value)"
# -I: do not let the repo (cwd) on sys.path hide a missing install.
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/vmthunder" ]] \
    && "$VENV/bin/python" -I -c 'import vmthunder, oslo_config, pytest' \
        2>/dev/null; then
    log "python packages: up to date"
else
    # pbr takes the version from git; without git history fall back to a
    # fixed one so an exported tree (tarball, no commits yet) installs too.
    if ! git -C "$REPO" rev-parse -q --verify HEAD >/dev/null 2>&1; then
        export PBR_VERSION="${PBR_VERSION:-0.0.0}"
    fi
    log "pip install -e . with requirements and test requirements"
    "$VENV/bin/python" -m pip install -q \
        -r requirements.txt -r test-requirements.txt -e .
    printf '%s\n' "$WANT" >"$STAMP"
    log "python packages installed"
fi

# Debian's python3-libnbd (the `nbd` module) lives in the system
# dist-packages, which a venv does not see: link it in when the venv's
# Python can load that build (same CPython minor version).
if ! "$VENV/bin/python" -c 'import nbd' 2>/dev/null; then
    SITE="$("$VENV/bin/python" -c \
        'import sysconfig; print(sysconfig.get_path("purelib"))')"
    TAG="$("$VENV/bin/python" -c \
        'import sys; print(sys.implementation.cache_tag)')"
    linked=0
    for f in /usr/lib/python3/dist-packages/nbd.py \
             /usr/lib/python3/dist-packages/libnbdmod."$TAG"-*.so; do
        [[ -e "$f" ]] || continue
        ln -sf "$f" "$SITE/$(basename "$f")"
        linked=$((linked + 1))
    done
    if ((linked == 2)) && "$VENV/bin/python" -c 'import nbd' 2>/dev/null; then
        log "python3-libnbd: linked into the venv"
    else
        rm -f "$SITE/nbd.py" "$SITE"/libnbdmod.*.so
        log "python3-libnbd: not usable from the venv's Python" \
            "($TAG); tests that need it will skip"
    fi
fi

# --- 3. test guest ----------------------------------------------------------
if [[ "${VMTHUNDER_SKIP_GUEST:-0}" == 1 ]]; then
    log "skipping the test guest (VMTHUNDER_SKIP_GUEST=1)"
elif [[ -f scripts/build-guest.sh ]]; then
    log "test guest: scripts/build-guest.sh"
    bash scripts/build-guest.sh || die "scripts/build-guest.sh failed"
    if [[ -f scripts/build-guest-disk.sh ]]; then
        log "whole-disk test guest: scripts/build-guest-disk.sh"
        bash scripts/build-guest-disk.sh >/dev/null \
            || die "scripts/build-guest-disk.sh failed"
    fi
else
    log "test guest: scripts/build-guest.sh not there yet, skipped"
fi

# --- 4. the Nova side ----------------------------------------------------------
# A venv of its own (.venv-nova: pinned nova, libvirt-python, Nova's test
# libraries) for nova_driver/ and tests/nova/; VMTHUNDER_SKIP_NOVA=1 skips.
bash "$REPO/scripts/install-nova.sh" || die "scripts/install-nova.sh failed"

# --- 5. the OpenStack services -------------------------------------------------
# A venv of its own (.venv-openstack: pinned Cinder, Glance, gunicorn and the
# clients) for the Cinder volume driver (vmthunder/cinder/file_driver.py) and
# tests/openstack/; VMTHUNDER_SKIP_OPENSTACK=1 skips.
bash "$REPO/scripts/install-openstack.sh" \
    || die "scripts/install-openstack.sh failed"

log "done: .venv/bin/vmthunder boot | .venv/bin/python -m pytest -q tests"
