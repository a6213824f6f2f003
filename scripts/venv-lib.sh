# Shell functions shared by scripts/install-nova.sh and
# scripts/install-openstack.sh (sourced, not run). Each expects log and die
# defined, and the variables it names below.
#
# A venv is installed from a wheelhouse under <repo>/.cache (git-ignored)
# without an index: quick, and the same bytes every time; the wheelhouse is
# filled from the index (pip wheel) only when something is missing.

# PACKAGES: the Debian packages to have; installs the missing ones (apt-get,
# as root or through sudo) unless VMTHUNDER_SKIP_APT=1 or not on Debian.
ensure_debian_packages() {
    [[ "${VMTHUNDER_SKIP_APT:-0}" != 1 ]] && command -v dpkg-query \
        >/dev/null || return 0
    local installed p missing=() sudo=()
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" \
        2>/dev/null | awk '$NF == "installed" && $(NF-1) == "ok" {print $1}' \
        || true)"
    for p in "${PACKAGES[@]}"; do
        grep -qxF "$p" <<<"$installed" || missing+=("$p")
    done
    ((${#missing[@]} > 0)) || return 0
    log "Debian packages missing: ${missing[*]}"
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null \
            || die "installing ${missing[*]} needs root (no sudo found)"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
}

# VENV, PYTHON: a working venv at $VENV (a broken one is made again).
ensure_venv() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found on PATH"
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' 2>/dev/null
    then
        return 0
    fi
    if [[ -e "$VENV" ]]; then
        log "venv $VENV is broken: recreating it"
        rm -rf "$VENV"
    fi
    log "creating venv $VENV ($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed"
}

# STAMP_FILES: files whose content, with the venv's Python and PINS, makes
# the stamp; prints its value.
stamp_value() {
    {
        "$VENV/bin/python" -V 2>&1
        printf '%s\n' "${PINS[@]}"
        cat "${STAMP_FILES[@]}" 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}

# REPO, VENV, WHEELS, PINS, CONSTRAINTS: PINS and vmthunder (editable) into
# the venv, from the wheelhouse WHEELS alone, filling it first if needed.
# Arguments: what to say if building the wheels fails (a hint), optional.
install_pins() {
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
    local constraints=()
    [[ -f "$CONSTRAINTS" ]] && constraints=(-c "$CONSTRAINTS")
    if ! git -C "$REPO" rev-parse -q --verify HEAD >/dev/null 2>&1; then
        export PBR_VERSION="${PBR_VERSION:-0.0.0}"  # pbr needs a version
    fi
    mkdir -p "$WHEELS"
    if "${pip[@]}" install -q --no-index --find-links "$WHEELS" \
        "${constraints[@]}" "${PINS[@]}" -e "$REPO" \
        2>"$VENV/.pip-offline.log"; then
        log "installed from the wheelhouse $WHEELS"
        return 0
    fi
    log "filling the wheelhouse $WHEELS: pip wheel ${PINS[*]} and" \
        "vmthunder's requirements (a few minutes the first time)"
    "${pip[@]}" wheel -q --wheel-dir "$WHEELS" --find-links "$WHEELS" \
        "${constraints[@]}" "${PINS[@]}" -r "$REPO/requirements.txt" \
        pbr setuptools wheel || die "pip wheel failed${*:+ ($*)}"
    "${pip[@]}" install -q --no-index --find-links "$WHEELS" \
        "${constraints[@]}" "${PINS[@]}" -e "$REPO" \
        2>"$VENV/.pip-offline.log" \
        || die "pip install from $WHEELS failed:" \
               "$(tail -5 "$VENV/.pip-offline.log")"
}
