#!/usr/bin/env bash
# Build a realistic Debian 12 guest (systemd, cloud kernel, 2 GiB ext4 root)
# for the boot benchmarks. Run with --help for usage.
set -euo pipefail
set -E

PROG=build-guest-debian
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

# Bump whenever anything that ends up in the image (or guest.json) changes:
# a cached guest with another version is rebuilt. Editing only the
# --boot-test code needs no bump (and so no multi-minute rebuild).
GUEST_VERSION=2

SUITE=bookworm
MIRROR=${VMTHUNDER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Lean on purpose: minbase + what it takes to boot with systemd from virtio.
INCLUDE=systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools
ROOT_SIZE=2G
GUEST_HOSTNAME=vmthunder-guest
# Fixed machine-id, see configure_root for why.
MACHINE_ID=5f1d0c0e7a3b4c6d9e2f8a1b3c5d7e9f
APPEND="root=/dev/vda rw console=ttyS0 quiet panic=-1"
POWEROFF_FLAG=vmthunder.poweroff=1
BOOT_MARKER=VMTHUNDER-BOOT-OK
FAIL_MARKER=VMTHUNDER-BOOT-FAILED
MEMORY_MB=1024
STAMP=.complete
OUT_FILES=(vmlinuz initrd.img root.img guest.json)

usage() {
    cat <<EOF
Usage: scripts/build-guest-debian.sh [options] [OUTDIR]

Build a realistic Debian 12 (bookworm) guest for the boot benchmarks:

  OUTDIR/root.img    ${ROOT_SIZE} sparse raw ext4 image (label root): debootstrap
                     --variant=minbase + $INCLUDE
  OUTDIR/vmlinuz     the guest's kernel, copied out of its /boot
  OUTDIR/initrd.img  its initramfs-tools initrd (virtio_pci, virtio_blk in it)
  OUTDIR/guest.json  file names, cmdline, marker, package versions, boot time
  OUTDIR/verify-console.log, boot-test-console.log  consoles of the last boots

OUTDIR defaults to <repo>/.cache/guest-debian (git-ignored). Debian packages
are cached in OUTDIR/.debs so a rebuild downloads nothing.

When the guest is up (systemd reached serial-getty@ttyS0), a oneshot unit
prints a line '$BOOT_MARKER' on ttyS0; a getty prints 'login:' there
too (root has no password). With '$POWEROFF_FLAG' on the kernel command
line the guest then powers off; otherwise it keeps running. systemd going
to emergency/rescue mode prints '$FAIL_MARKER: ...'.

A guest is only rebuilt when OUTDIR lacks a finished guest of this recipe
version ($GUEST_VERSION), or with --force. After a build the guest is booted
once under QEMU TCG (from a snapshot: root.img is never modified) and the
time to the marker goes into guest.json.

Boot it with (use a snapshot or a copy-on-write overlay: boots write):
  qemu-system-x86_64 -accel tcg -m $MEMORY_MB -smp 1 -nographic -nodefaults \\
    -serial stdio -no-reboot -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img \\
    -append '$APPEND' \\
    -drive file=OUTDIR/root.img,format=raw,if=virtio,snapshot=on

Options:
  -f, --force        rebuild even if OUTDIR holds a finished guest
  --no-verify        skip the verification boot after a build
  --boot-test        (build if needed, then) boot the guest once, print the
                     seconds to the marker and to 'login:'; exit 1 unless both
                     appear (with --poweroff: unless the marker appears and
                     QEMU exits by itself)
  --poweroff         with --boot-test: add $POWEROFF_FLAG to the cmdline
  --trace-reads      with --boot-test: serve root.img through nbdkit's log
                     filter and print the bytes the boot read (total, distinct)
  --timeout SECONDS  boot timeout (default 300)
  -h, --help         show this help

Output on stdout is shell assignments (GUEST_DIR=, ..., BOOT_SECONDS=);
progress goes to stderr. Needs root (debootstrap, chroot, mkfs.ext4 -d
keeping ownership); missing host packages are installed with apt-get.
EOF
}

log() { echo "$PROG: $*" >&2; }
die() {
    echo "$PROG: ERROR: $*" >&2
    exit 1
}
# shellcheck disable=SC2154  # rc is assigned inside the trap string
trap 'rc=$?; echo "$PROG: ERROR: command failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- arguments
FORCE=0 VERIFY=1 BOOT_TEST=0 POWEROFF=0 TRACE=0 TIMEOUT=300 OUTDIR=
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -f|--force) FORCE=1 ;;
        --no-verify) VERIFY=0 ;;
        --boot-test) BOOT_TEST=1 ;;
        --poweroff) POWEROFF=1 ;;
        --trace-reads) TRACE=1 ;;
        --timeout)
            [ $# -ge 2 ] || die "--timeout needs a value"
            TIMEOUT=$2; shift ;;
        --timeout=*) TIMEOUT=${1#*=} ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [ -z "$OUTDIR" ] || die "only one OUTDIR may be given (see --help)"
            OUTDIR=$1 ;;
    esac
    shift
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout wants whole seconds, not '$TIMEOUT'"
if [ "$BOOT_TEST" = 0 ] && { [ "$POWEROFF" = 1 ] || [ "$TRACE" = 1 ]; }; then
    die "--poweroff and --trace-reads go with --boot-test"
fi
OUTDIR=${OUTDIR:-$REPO_ROOT/.cache/guest-debian}
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PATH=$PATH:/usr/sbin:/sbin

# --------------------------------------------------------------- host tools
APT_UPDATED=0
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing host packages: $*; run as root or 'sudo apt-get install $*'"
    if [ "$APT_UPDATED" = 0 ]; then
        log "running apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "installing host packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

# need_tools cmd:package ...  installs the packages of missing commands.
need_tools() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || die "'${spec%%:*}' not found even after installing ${spec#*:}"
    done
}

# ------------------------------------------------------- cleanup on any exit
# Everything this script starts or mounts is recorded here and undone by
# cleanup(), which runs however the script ends.
STAGE=        # build directory (OUTDIR/.build.*), removed at exit
WORK=         # scratch directory of a boot, removed at exit
PIDS=()       # QEMU / nbdkit we started

# Mount points under $STAGE, deepest first (from the kernel's own table, so
# mounts left behind by an interrupted debootstrap are found too).
stage_mounts() {
    [ -n "$STAGE" ] || return 0
    awk -v p="$STAGE/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

unmount_stage() {
    local m
    for m in $(stage_mounts); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
    done
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [ -z "$WORK" ] || rm -rf "$WORK"
    if [ -n "$STAGE" ] && [ -d "$STAGE" ]; then
        unmount_stage
        # Never rm -rf a tree that still has something mounted in it.
        if [ -n "$(stage_mounts)" ]; then
            log "mounts remain under $STAGE; not removing it"
        else
            rm -rf --one-file-system "$STAGE"
        fi
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------ boot the guest
# boot_guest DIR ROOT_IMG APPEND: boot once under TCG from a snapshot of
# ROOT_IMG and set BOOT_S (seconds to the marker), LOGIN_S (to 'login:'),
# QEMU_EXITED, and with TRACE=1 READ_BYTES, READ_REQUESTS, DISTINCT_BYTES.
# Returns 1 (after printing the console's tail) if the marker never shows.
# The console is kept in $CONSOLE_COPY.
boot_guest() {
    local dir=$1 img=$2 append=$3 drive console t0 el qpid npid=
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
    console=$WORK/console.log
    BOOT_S='' LOGIN_S='' QEMU_EXITED=0
    if [ "$TRACE" = 1 ]; then
        # nbdkit's log filter records every request; -r: the image stays read-only.
        nbdkit -r -U "$WORK/nbd.sock" -P "$WORK/nbdkit.pid" --filter=log \
            file "$img" logfile="$WORK/nbd.log" || die "nbdkit failed to start"
        for _ in $(seq 100); do [ -S "$WORK/nbd.sock" ] && [ -s "$WORK/nbdkit.pid" ] && break; sleep 0.1; done
        npid=$(cat "$WORK/nbdkit.pid")
        PIDS+=("$npid")
        drive="file=nbd+unix:///?socket=$WORK/nbd.sock"
    else
        drive="file=$img"
    fi
    # snapshot=on: the guest's writes go to a temporary overlay (in $WORK).
    t0=$(date +%s.%N)
    TMPDIR=$WORK qemu-system-x86_64 -accel tcg -m "$MEMORY_MB" -smp 1 -nographic -nodefaults \
        -serial stdio -no-reboot -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
        -append "$append" -drive "$drive,format=raw,if=virtio,snapshot=on" \
        </dev/null >"$console" 2>&1 &
    qpid=$!
    PIDS+=("$qpid")
    log "booting under TCG (console kept in $CONSOLE_COPY, timeout ${TIMEOUT}s)"
    while :; do
        el=$(awk -v t0="$t0" -v now="$(date +%s.%N)" 'BEGIN { printf "%.2f", now - t0 }')
        if [ -z "$BOOT_S" ] && grep -aq "$BOOT_MARKER" "$console"; then
            BOOT_S=$el
            log "marker after ${BOOT_S}s"
        fi
        if [ -z "$LOGIN_S" ] && grep -aqE '(^|[[:space:]])login:' "$console"; then
            LOGIN_S=$el
            log "'login:' after ${LOGIN_S}s"
        fi
        if ! kill -0 "$qpid" 2>/dev/null; then QEMU_EXITED=1; break; fi
        # Done: marker and login seen, or (poweroff) QEMU exits by itself.
        if [ -n "$BOOT_S" ] && [ -n "$LOGIN_S" ] && [ "$POWEROFF" = 0 ]; then break; fi
        if [ "${el%.*}" -ge "$TIMEOUT" ]; then break; fi
        # Once the marker is there, give 'login:' / the poweroff 60 s more.
        if [ -n "$BOOT_S" ] && [ $(( ${el%.*} - ${BOOT_S%.*} )) -ge 60 ]; then break; fi
        sleep 0.1
    done
    kill "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    # Keep the console for a look afterwards (WORK is removed at exit).
    cp "$console" "$CONSOLE_COPY" 2>/dev/null || true
    if [ -n "$npid" ]; then
        kill "$npid" 2>/dev/null || true
        # nbdkit is not our child: wait for it to flush its log and go.
        for _ in $(seq 100); do kill -0 "$npid" 2>/dev/null || break; sleep 0.1; done
        # Sum the Read requests; distinct bytes = size of the union of ranges.
        eval "$(python3 - "$WORK/nbd.log" <<'EOF'
import re, sys
reqs = []
for line in open(sys.argv[1]):
    m = re.search(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", line)
    if m:
        reqs.append((int(m[1], 16), int(m[2], 16)))
distinct, end = 0, -1
for off, n in sorted(reqs):
    lo = max(off, end)
    if off + n > lo:
        distinct += off + n - lo
    end = max(end, off + n)
print(f"READ_REQUESTS={len(reqs)} READ_BYTES={sum(n for _, n in reqs)} DISTINCT_BYTES={distinct}")
EOF
)"
    fi
    if [ -z "$BOOT_S" ]; then
        log "no '$BOOT_MARKER' on the console (QEMU exited: $QEMU_EXITED); last lines:"
        tail -n 25 "$console" | tr -d '\r' | sed 's/^/    /' >&2
        return 1
    fi
    if grep -aq "$FAIL_MARKER" "$console"; then
        log "guest reported a failure:"
        grep -a "$FAIL_MARKER" "$console" | tr -d '\r' | sed 's/^/    /' >&2
        return 1
    fi
    return 0
}

# ---------------------------------------------------------- cached guest?
stamp_field() { sed -n "s/^$1=//p" "$OUTDIR/$STAMP" 2>/dev/null | head -n1 || true; }

is_current() {
    local f
    [ -f "$OUTDIR/$STAMP" ] || return 1
    for f in "${OUT_FILES[@]}"; do [ -s "$OUTDIR/$f" ] || return 1; done
    [ "$(stamp_field guest_version)" = "$GUEST_VERSION" ] && [ "$(stamp_field suite)" = "$SUITE" ]
}

print_paths() {
    echo "GUEST_DIR=$OUTDIR"
    echo "KERNEL=$OUTDIR/vmlinuz"
    echo "INITRD=$OUTDIR/initrd.img"
    echo "ROOT=$OUTDIR/root.img"
    echo "GUEST_JSON=$OUTDIR/guest.json"
}

# ------------------------------------------------------------ build steps
# in_root CMD...: run CMD inside the new root.
in_root() {
    chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"
}

run_debootstrap() {
    mkdir -p "$OUTDIR/.debs"
    log "debootstrap $SUITE from $MIRROR (variant minbase, + $INCLUDE)"
    # debootstrap installs Depends only, never Recommends: a lean root.
    if ! debootstrap --variant=minbase --include="$INCLUDE" --components=main \
        --cache-dir="$OUTDIR/.debs" "$SUITE" "$ROOTFS" "$MIRROR" >"$STAGE/debootstrap.out" 2>&1; then
        tail -n 20 "$STAGE/debootstrap.out" | sed 's/^/    /' >&2
        [ -f "$ROOTFS/debootstrap/debootstrap.log" ] \
            && tail -n 20 "$ROOTFS/debootstrap/debootstrap.log" | sed 's/^/    /' >&2
        die "debootstrap failed (is $MIRROR reachable?)"
    fi
}

configure_root() {
    local u masked=()
    echo "$GUEST_HOSTNAME" >"$ROOTFS/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        "$GUEST_HOSTNAME" >"$ROOTFS/etc/hosts"
    rm -f "$ROOTFS/etc/resolv.conf"   # the build host's, meaningless in the guest
    # A fixed machine-id makes every boot the same: an empty or missing one
    # would make each boot of a fresh snapshot a "first boot" (machine-id
    # generation, ConditionFirstBoot units, systemctl preset-all). The cost,
    # clones sharing one id, does not matter for these network-less guests.
    echo "$MACHINE_ID" >"$ROOTFS/etc/machine-id"
    # Boot benchmarks never fsck (passno 0): each VM boots a pristine snapshot.
    printf '/dev/vda\t/\text4\trw,noatime,errors=remount-ro\t0\t0\n' >"$ROOTFS/etc/fstab"
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        >"$ROOTFS/etc/apt/apt.conf.d/90vmthunder-no-recommends"
    # Root without a password: handy on the serial console of a test VM.
    in_root passwd -d root >/dev/null

    # The initrd must reach /dev/vda: force the virtio modules in (MODULES=most
    # is Debian's default and would pull them in; this keeps it so).
    printf 'virtio_pci\nvirtio_blk\n' >>"$ROOTFS/etc/initramfs-tools/modules"
    echo "MODULES=most" >"$ROOTFS/etc/initramfs-tools/conf.d/vmthunder"

    # The boot marker: after the serial getty is started, print it on ttyS0;
    # power off if asked to on the kernel command line.
    cat >"$ROOTFS/usr/local/sbin/vmthunder-boot-ok" <<EOF
#!/bin/sh
# Installed by scripts/build-guest-debian.sh: tells the benchmark harness,
# which watches the serial console, that the system is up.
printf '\n%s\n' '$BOOT_MARKER' >/dev/ttyS0
read -r up _ </proc/uptime
printf 'vmthunder-guest: kernel uptime %s s at the marker\n' "\$up" >/dev/ttyS0
for arg in \$(cat /proc/cmdline); do
    if [ "\$arg" = '$POWEROFF_FLAG' ]; then
        exec systemctl --no-block poweroff
    fi
done
EOF
    chmod 755 "$ROOTFS/usr/local/sbin/vmthunder-boot-ok"
    cat >"$ROOTFS/etc/systemd/system/vmthunder-boot-ok.service" <<EOF
[Unit]
Description=Print the vmthunder boot marker on ttyS0
After=multi-user.target getty.target serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmthunder-boot-ok

[Install]
WantedBy=multi-user.target
EOF
    # A boot that ends in emergency/rescue mode says so instead of hanging silently.
    for u in emergency rescue; do
        mkdir -p "$ROOTFS/etc/systemd/system/$u.service.d"
        cat >"$ROOTFS/etc/systemd/system/$u.service.d/vmthunder.conf" <<EOF
[Service]
ExecStartPre=-/bin/sh -c "echo '$FAIL_MARKER: systemd entered $u mode' >/dev/ttyS0"
EOF
    done
    in_root systemctl enable --quiet vmthunder-boot-ok.service serial-getty@ttyS0.service

    # Timers, scrubbers and network waits: slow or random under TCG, and
    # nothing a boot benchmark wants. getty-static starts gettys on tty2-6
    # when there is no dbus/logind (minbase): pointless on a headless VM and
    # seconds of boot under TCG. Only units that exist are masked.
    for u in getty-static.service apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
        dpkg-db-backup.timer dpkg-db-backup.service e2scrub_all.timer e2scrub_all.service \
        e2scrub_reap.service fstrim.timer fstrim.service man-db.timer logrotate.timer \
        systemd-timesyncd.service systemd-networkd-wait-online.service networking.service \
        ifupdown-wait-online.service; do
        if [ -e "$ROOTFS/lib/systemd/system/$u" ] || [ -e "$ROOTFS/usr/lib/systemd/system/$u" ]; then
            masked+=("$u")
        fi
    done
    [ ${#masked[@]} -eq 0 ] || in_root systemctl mask --quiet "${masked[@]}"
    MASKED=("${masked[@]}")
    log "masked: ${MASKED[*]:-nothing}"

    # Rebuild the initrd with the settings above (needs /proc and /sys).
    mount -t proc proc "$ROOTFS/proc"
    mount -t sysfs sysfs "$ROOTFS/sys"
    log "update-initramfs"
    in_root update-initramfs -u -k all >"$STAGE/initramfs.out" 2>&1 \
        || { tail -n 20 "$STAGE/initramfs.out" >&2; die "update-initramfs failed"; }
    in_root apt-get clean
    unmount_stage
    [ -z "$(stage_mounts)" ] || die "cannot unmount $(stage_mounts | tr '\n' ' ')"

    # systemd runs ldconfig, hwdb and sysusers updates at boot while /etc is
    # older than /usr (ConditionNeedsUpdate): on a fresh snapshot that would
    # be every boot. Mark /etc and /var as up to date with /usr, as
    # systemd-update-done would (the hwdb was built by udev's postinst).
    local t
    t=$(stat -c %Y "$ROOTFS/usr")
    touch -d "@$t" "$ROOTFS/usr"   # drop the sub-second part: whole ns below
    for u in etc var; do
        printf '# Written by scripts/build-guest-debian.sh, as by systemd-update-done.\nTIMESTAMP_NSEC=%s000000000\n' \
            "$t" >"$ROOTFS/$u/.updated"
        touch -d "@$t" "$ROOTFS/$u/.updated"
    done
}

# pkg_version PKG: its version in the new root.
# shellcheck disable=SC2016  # ${Version} is dpkg-query's, not the shell's
pkg_version() { in_root dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

build() {
    [ "$(id -u)" = 0 ] || die "building needs root (debootstrap, chroot, mkfs.ext4 -d keeping ownership)"
    need_tools debootstrap:debootstrap mkfs.ext4:e2fsprogs e2fsck:e2fsprogs python3:python3 \
        qemu-system-x86_64:qemu-system-x86
    local start=$SECONDS kver kpkg f json_masked u
    STAGE=$(mktemp -d "$OUTDIR/.build.XXXXXX")
    ROOTFS=$STAGE/rootfs
    mkdir -p "$STAGE/out"

    run_debootstrap
    log "debootstrap done after $((SECONDS - start))s"
    configure_root

    # The kernel (and its initrd) that linux-image-cloud-amd64 pulled in.
    # shellcheck disable=SC2016
    kpkg=$(in_root dpkg-query -W -f='${Depends}' linux-image-cloud-amd64 | grep -o 'linux-image-[^ ,]*' | head -n1)
    kver=${kpkg#linux-image-}
    if [ ! -f "$ROOTFS/boot/vmlinuz-$kver" ] || [ ! -f "$ROOTFS/boot/initrd.img-$kver" ]; then
        die "no /boot/vmlinuz-$kver or /boot/initrd.img-$kver in the new root"
    fi
    install -m 644 "$ROOTFS/boot/vmlinuz-$kver" "$STAGE/out/vmlinuz"
    install -m 644 "$ROOTFS/boot/initrd.img-$kver" "$STAGE/out/initrd.img"
    local versions
    versions=$(for p in linux-image-cloud-amd64 "$kpkg" systemd udev initramfs-tools; do
        printf '    "%s": "%s",\n' "$p" "$(pkg_version "$p")"; done | sed '$ s/,$//')

    # A sparse image, filled without mounting it (no loop device): mkfs.ext4 -d
    # copies the tree, keeping owners, modes, hard links and xattrs.
    log "mkfs.ext4 -d ($ROOT_SIZE)"
    truncate -s "$ROOT_SIZE" "$STAGE/out/root.img"
    mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$ROOTFS" "$STAGE/out/root.img" \
        || die "mkfs.ext4 -d failed (out of disk space in $OUTDIR?)"
    e2fsck -fn "$STAGE/out/root.img" >/dev/null 2>&1 || die "the new root.img does not pass e2fsck -fn"
    chmod 644 "$STAGE/out/root.img"
    BUILD_S=$((SECONDS - start))
    log "image built in ${BUILD_S}s"

    local boot_json=null login_json=null
    if [ "$VERIFY" = 1 ]; then
        CONSOLE_COPY=$OUTDIR/verify-console.log
        boot_guest "$STAGE/out" "$STAGE/out/root.img" "$APPEND" \
            || die "the new guest did not boot (see the console above); nothing installed"
        [ -n "$LOGIN_S" ] || die "the new guest printed the marker but no 'login:' on ttyS0"
        boot_json=$BOOT_S login_json=$LOGIN_S
    fi

    json_masked=$(for u in "${MASKED[@]}"; do printf '"%s", ' "$u"; done | sed 's/, $//')
    cat >"$STAGE/out/guest.json" <<EOF
{
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "root": "root.img",
  "root_size_bytes": $(stat -c %s "$STAGE/out/root.img"),
  "root_allocated_bytes": $(($(stat -c %b "$STAGE/out/root.img") * $(stat -c %B "$STAGE/out/root.img"))),
  "append": "$APPEND",
  "cmdline": "$APPEND",
  "poweroff_flag": "$POWEROFF_FLAG",
  "marker": "$BOOT_MARKER",
  "failure_marker": "$FAIL_MARKER",
  "login_prompt": "login:",
  "memory_mb": $MEMORY_MB,
  "distribution": "debian $SUITE",
  "hostname": "$GUEST_HOSTNAME",
  "machine_id": "$MACHINE_ID",
  "kernel_version": "$kver",
  "packages": {
$versions
  },
  "masked_units": [$json_masked],
  "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "build_seconds": $BUILD_S,
  "guest_version": $GUEST_VERSION,
  "boot_seconds": $boot_json,
  "login_seconds": $login_json,
  "boot_measured_with": "qemu-system-x86_64 -accel tcg -m $MEMORY_MB -smp 1, root.img as a plain file, snapshot=on"
}
EOF
    python3 -m json.tool "$STAGE/out/guest.json" >/dev/null || die "wrote invalid JSON (bug)"

    # Drop the stamp first so a half-replaced guest never looks complete.
    rm -f "$OUTDIR/$STAMP"
    for f in "${OUT_FILES[@]}"; do mv -f "$STAGE/out/$f" "$OUTDIR/$f"; done
    printf 'guest_version=%s\nsuite=%s\nkernel_version=%s\n' "$GUEST_VERSION" "$SUITE" "$kver" >"$STAGE/stamp"
    mv -f "$STAGE/stamp" "$OUTDIR/$STAMP"
    log "guest built in $OUTDIR in $((SECONDS - start))s"
    echo "BUILD_SECONDS=$BUILD_S"
    [ "$VERIFY" = 0 ] || echo "BOOT_SECONDS=$BOOT_S"
}

# ------------------------------------------------------------------ main
# One build at a time per OUTDIR (e.g. parallel test workers).
exec 9>"$OUTDIR/.lock"
if ! flock -n 9; then
    log "another build is running in $OUTDIR; waiting for it"
    flock 9
fi

if [ "$FORCE" = 0 ] && is_current; then
    log "guest already built in $OUTDIR (use --force to rebuild)"
else
    build
fi
print_paths

if [ "$BOOT_TEST" = 1 ]; then
    need_tools qemu-system-x86_64:qemu-system-x86 python3:python3
    [ "$TRACE" = 0 ] || need_tools nbdkit:nbdkit
    append=$APPEND
    [ "$POWEROFF" = 0 ] || append="$append $POWEROFF_FLAG"
    CONSOLE_COPY=$OUTDIR/boot-test-console.log
    boot_guest "$OUTDIR" "$OUTDIR/root.img" "$append" || die "boot test failed: no '$BOOT_MARKER' within ${TIMEOUT}s"
    echo "BOOT_SECONDS=$BOOT_S"
    echo "LOGIN_SECONDS=${LOGIN_S:-}"
    if [ "$TRACE" = 1 ]; then
        echo "READ_REQUESTS=$READ_REQUESTS"
        echo "READ_BYTES=$READ_BYTES"
        echo "DISTINCT_READ_BYTES=$DISTINCT_BYTES"
    fi
    if [ "$POWEROFF" = 1 ]; then
        [ "$QEMU_EXITED" = 1 ] || die "boot test failed: the guest did not power off within 60 s of the marker"
        log "guest powered off by itself"
    else
        [ -n "$LOGIN_S" ] || die "boot test failed: marker seen but no 'login:' on ttyS0"
    fi
fi
