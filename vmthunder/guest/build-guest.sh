#!/usr/bin/env bash
# Build a tiny bootable Linux guest for vmthunder tests from Debian packages.
# Run with --help for usage.
set -euo pipefail
set -E

PROG=build-guest
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
GUEST_INIT_DIR=$SCRIPT_DIR/guest-init

APPEND="console=ttyS0 quiet panic=-1"
BOOT_MARKER=VMTHUNDER-BOOT-OK
READ_MARKER=VMTHUNDER-READ-OK
WRITE_MARKER=VMTHUNDER-WRITE-OK
FAIL_MARKER=VMTHUNDER-BOOT-FAILED
ROOT_SIZE_MIB=256
PAYLOAD_MIB=4
# Modules the initramfs needs to reach /dev/vda; their dependencies are
# resolved from the modules' own .modinfo and loaded first.
TARGET_MODULES=(virtio_pci virtio_blk)
# Files that make up a finished guest; STAMP is written last.
STAMP=.complete
OUT_FILES=(vmlinuz initrd.img root.img guest.json)

usage() {
    cat <<EOF
Usage: scripts/build-guest.sh [--force] [OUTDIR]

Build a small bootable Linux guest for vmthunder tests from Debian packages:

  OUTDIR/vmlinuz      Debian cloud kernel (linux-image-*-cloud-amd64)
  OUTDIR/initrd.img   busybox-static initramfs: loads virtio_blk, mounts
                      /dev/vda read-write and switch_roots into it
  OUTDIR/root.img     ${ROOT_SIZE_MIB} MiB ext4 root: busybox, /sbin/init, a ${PAYLOAD_MIB} MiB payload
  OUTDIR/guest.json   file names, kernel version, kernel command line, markers

OUTDIR defaults to <repo>/.cache/guest (git-ignored).

If OUTDIR already holds a finished guest built by the same recipe (this
script and scripts/guest-init/), nothing is rebuilt: the paths are printed
and the script exits 0.  A build happens in OUTDIR/.build.* and is moved
into place only when complete; OUTDIR/$STAMP is written last, so an
interrupted build is never mistaken for a finished one.

Paths are printed on stdout as shell assignments (GUEST_DIR=, KERNEL=,
INITRD=, ROOT=, GUEST_JSON=, KERNEL_VERSION=); progress goes to stderr.

The guest's console (ttyS0) prints, each on a line of its own:
  $BOOT_MARKER     root fs init started
  $READ_MARKER     read a few MiB, payload checksum matched
  $WRITE_MARKER    appended to /var/boot-count and synced
  $FAIL_MARKER: <reason>   any failure (then powers off at once)
and then remounts / read-only and powers off.  Note that root.img is
modified by every boot (/var/boot-count): boot a copy or a snapshot if
you need a pristine image.

Boot it with:
  qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nographic -nodefaults \\
    -serial stdio -no-reboot -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img \\
    -append '$APPEND' -drive file=OUTDIR/root.img,format=raw,if=virtio

Options:
  -f, --force   rebuild even if OUTDIR holds a finished guest
  -h, --help    show this help

Environment:
  VMTHUNDER_GUEST_KERNEL_PKG  kernel package to use (default: what the
                              linux-image-cloud-amd64 metapackage depends on)

Needs apt-get access to a Debian archive.  Missing host tools (e2fsprogs,
cpio, ...) are installed with apt-get, which needs root.
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
FORCE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -f|--force) FORCE=1 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [ -z "$OUTDIR" ] || die "only one OUTDIR may be given (see --help)"
            OUTDIR=$1 ;;
    esac
    shift
done
if [ $# -gt 0 ]; then
    if [ -n "$OUTDIR" ] || [ $# -ne 1 ]; then die "only one OUTDIR may be given (see --help)"; fi
    OUTDIR=$1
fi
OUTDIR=${OUTDIR:-$REPO_ROOT/.cache/guest}

for f in initramfs-init root-init; do
    [ -f "$GUEST_INIT_DIR/$f" ] || die "missing $GUEST_INIT_DIR/$f (incomplete checkout?)"
done

# Identifies the recipe: a cached guest built by another version of this
# script or of the guest init scripts is rebuilt.
RECIPE=$({ cat "${BASH_SOURCE[0]}" "$GUEST_INIT_DIR/initramfs-init" "$GUEST_INIT_DIR/root-init"
          echo "kernel_pkg=${VMTHUNDER_GUEST_KERNEL_PKG:-}"; } | sha256sum | cut -d' ' -f1)

# ----------------------------------------------------------- cached guest?
stamp_field() { sed -n "s/^$1=//p" "$OUTDIR/$STAMP" 2>/dev/null | head -n1 || true; }

is_complete() {
    local f
    [ -f "$OUTDIR/$STAMP" ] || return 1
    for f in "${OUT_FILES[@]}"; do
        [ -s "$OUTDIR/$f" ] || return 1
    done
    return 0
}

print_paths() {
    echo "GUEST_DIR=$OUTDIR"
    echo "KERNEL=$OUTDIR/vmlinuz"
    echo "INITRD=$OUTDIR/initrd.img"
    echo "ROOT=$OUTDIR/root.img"
    echo "GUEST_JSON=$OUTDIR/guest.json"
    echo "KERNEL_VERSION=$(stamp_field kernel_version)"
}

# Returns 0 (and prints the paths) if a usable guest is already there.
use_cached() {
    [ "$FORCE" = 0 ] || return 1
    is_complete || return 1
    if [ "$(stamp_field recipe)" != "$RECIPE" ]; then
        [ -n "${STALE_LOGGED:-}" ] || log "guest in $OUTDIR was built by a different recipe; rebuilding"
        STALE_LOGGED=1
        return 1
    fi
    log "guest already built in $OUTDIR (use --force to rebuild)"
    print_paths
    return 0
}

if [ -d "$OUTDIR" ]; then
    OUTDIR=$(cd "$OUTDIR" && pwd)
    use_cached && exit 0
fi

mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# One build at a time per OUTDIR (e.g. parallel test workers).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUTDIR/.lock" || die "cannot open lock file $OUTDIR/.lock"
    if ! flock -n 9; then
        log "another build is running in $OUTDIR; waiting for it"
        flock 9
    fi
fi

use_cached && exit 0
START=$SECONDS

# --------------------------------------------------------------- host tools
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
APT_UPDATED=0

apt_update() {
    [ "$APT_UPDATED" = 0 ] || return 0
    [ "$IS_ROOT" = 1 ] || die "apt package lists need refreshing but this is not root: run 'sudo apt-get update' (or run this script as root)"
    log "running apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
        || die "apt-get update failed: check network access to the Debian archive and /etc/apt/sources.list*"
    APT_UPDATED=1
}

apt_install() {
    [ "$IS_ROOT" = 1 ] || die "missing host packages: $*; install them with 'sudo apt-get install $*' (or run this script as root)"
    apt_update
    log "installing host packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed: check network access to the Debian archive, or install them by hand"
}

# need_tools cmd:package ...  installs the packages of missing commands.
need_tools() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 \
            || die "'${spec%%:*}' still not found after installing ${spec#*:}"
    done
}

if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    die "apt-get/apt-cache not found: this script needs a Debian-based host"
fi
export PATH=$PATH:/usr/sbin:/sbin
need_tools dpkg-deb:dpkg mkfs.ext4:e2fsprogs e2fsck:e2fsprogs cpio:cpio gzip:gzip \
    sha256sum:coreutils find:findutils

APT_OPTS=()
[ "$IS_ROOT" = 1 ] && APT_OPTS=(-o APT::Sandbox::User=root) # quiet the _apt sandbox warning

# --------------------------------------------------------------- staging
STAGE=$(mktemp -d "$OUTDIR/.build.XXXXXX") || die "cannot create a staging directory in $OUTDIR"
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
mkdir -p "$STAGE/dl" "$STAGE/kernel" "$STAGE/bb" "$STAGE/out"

# apt_download PKG: fetch PKG's .deb into $STAGE/dl, refreshing stale lists once.
apt_download() {
    local pkg=$1
    if ! (cd "$STAGE/dl" && apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2); then
        if [ "$IS_ROOT" = 1 ] && [ "$APT_UPDATED" = 0 ]; then
            log "download of $pkg failed; refreshing package lists and retrying"
            apt_update
            (cd "$STAGE/dl" && apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2) && return 0
        fi
        if [ "$APT_UPDATED" = 1 ]; then
            die "apt-get download $pkg failed even after apt-get update: is the package name right (VMTHUNDER_GUEST_KERNEL_PKG?) and the Debian archive reachable?"
        fi
        die "apt-get download $pkg failed: check network access to the Debian archive; if the package lists are stale run 'apt-get update'"
    fi
}

# --------------------------------------------------------------- kernel
resolve_kernel_pkg() {
    local p
    p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9.]*-[0-9]*-cloud-amd64\)$/\1/p' | head -n1 || true)
    if [ -z "$p" ]; then
        p=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' 2>/dev/null \
            | cut -d' ' -f1 | sort -V | tail -n1 || true)
    fi
    echo "$p"
}

KERNEL_PKG=${VMTHUNDER_GUEST_KERNEL_PKG:-}
if [ -z "$KERNEL_PKG" ]; then
    KERNEL_PKG=$(resolve_kernel_pkg)
    if [ -z "$KERNEL_PKG" ]; then
        log "no linux-image-*-cloud-amd64 package known to apt"
        apt_update
        KERNEL_PKG=$(resolve_kernel_pkg)
    fi
    [ -n "$KERNEL_PKG" ] || die "cannot find a linux-image-*-cloud-amd64 package: is the Debian 'main' archive in /etc/apt/sources.list*? (or set VMTHUNDER_GUEST_KERNEL_PKG)"
fi
log "kernel package: $KERNEL_PKG"
apt_download "$KERNEL_PKG"
dpkg-deb -x "$STAGE"/dl/"$KERNEL_PKG"_*.deb "$STAGE/kernel" \
    || die "cannot unpack $KERNEL_PKG (corrupt download? out of disk space in $OUTDIR?)"

KVERS=()
for d in "$STAGE"/kernel/lib/modules/*/; do
    [ -d "$d" ] && KVERS+=("$(basename "$d")")
done
[ ${#KVERS[@]} -eq 1 ] || die "expected exactly one lib/modules/<version> in $KERNEL_PKG, found ${#KVERS[@]}"
KVER=${KVERS[0]}
MODDIR=$STAGE/kernel/lib/modules/$KVER
[ -f "$STAGE/kernel/boot/vmlinuz-$KVER" ] || die "$KERNEL_PKG has no boot/vmlinuz-$KVER"
log "kernel version: $KVER"

# ------------------------------------------------------------ busybox
# Use the host's busybox-static if installed, else unpack the package
# (busybox-static conflicts with the dynamic busybox, so never install it).
BUSYBOX=
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] \
    && [ -x /bin/busybox ]; then
    BUSYBOX=/bin/busybox
else
    log "busybox-static not installed on the host; downloading it"
    apt_download busybox-static
    dpkg-deb -x "$STAGE"/dl/busybox-static_*.deb "$STAGE/bb" || die "cannot unpack busybox-static"
    BUSYBOX=$STAGE/bb/bin/busybox
    [ -x "$BUSYBOX" ] || die "busybox-static package has no bin/busybox"
fi
APPLETS=$("$BUSYBOX" --list) || die "cannot run $BUSYBOX --list (not an x86-64 static binary?)"
for a in sh insmod mount switch_root poweroff sync sha256sum usleep; do
    grep -qx "$a" <<<"$APPLETS" || die "$BUSYBOX lacks the '$a' applet"
done

# install_busybox DIR: busybox in DIR/bin plus one symlink per applet.
install_busybox() {
    local dir=$1 a
    mkdir -p "$dir/bin" "$dir/sbin"
    cp "$BUSYBOX" "$dir/bin/busybox"
    chmod 755 "$dir/bin/busybox"
    for a in $APPLETS; do
        [ "$a" = busybox ] || [ -e "$dir/bin/$a" ] || ln -s busybox "$dir/bin/$a"
    done
}

# ------------------------------------------------------------ modules
declare -A MOD_STATE=()
MOD_ORDER=()

# find_module NAME: path of NAME.ko[.xz|.gz|.zst] (dash/underscore agnostic).
find_module() {
    local n1=$1 n2=${1//_/-}
    find "$MODDIR/kernel" -type f \( -name "$n1.ko" -o -name "$n1.ko.*" -o -name "$n2.ko" -o -name "$n2.ko.*" \) \
        | head -n1
}

is_builtin() {
    local n1=$1 n2=${1//_/-}
    grep -Eq "/($n1|$n2)\.ko$" "$MODDIR/modules.builtin" 2>/dev/null
}

# add_module NAME: stage NAME (decompressed) and its dependencies, in load order.
add_module() {
    local name=$1 src dst deps d
    case "${MOD_STATE[$name]:-}" in
        done) return 0 ;;
        visiting) die "module dependency cycle at $name" ;;
    esac
    MOD_STATE[$name]=visiting
    src=$(find_module "$name")
    if [ -z "$src" ]; then
        if is_builtin "$name"; then
            MOD_STATE[$name]="done"
            return 0
        fi
        die "kernel $KVER has no module $name and it is not built in: this kernel cannot boot from virtio"
    fi
    dst=$STAGE/initramfs/lib/modules/$name.ko
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz)
            if command -v xz >/dev/null 2>&1; then xz -dc "$src" >"$dst"
            else "$BUSYBOX" xz -dc "$src" >"$dst"; fi ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *.ko.zst)
            need_tools zstd:zstd
            zstd -q -dc "$src" >"$dst" ;;
        *) die "unsupported module compression: $src" ;;
    esac || die "cannot decompress $src"
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    for d in $deps; do
        add_module "$d"
    done
    MOD_STATE[$name]="done"
    MOD_ORDER+=("$name")
}

# ------------------------------------------------------------ initramfs
IRD=$STAGE/initramfs
mkdir -p "$IRD"/{dev,proc,sys,newroot,lib/modules}
install_busybox "$IRD"
for m in "${TARGET_MODULES[@]}"; do
    add_module "$m"
done
printf '%s\n' "${MOD_ORDER[@]}" >"$IRD/lib/modules/load-order"
log "initramfs modules (load order): ${MOD_ORDER[*]}"
install -m 755 "$GUEST_INIT_DIR/initramfs-init" "$IRD/init"
# The kernel's built-in initramfs already provides /dev/console; add it
# anyway when we can (mknod needs root).
if [ "$IS_ROOT" = 1 ]; then mknod -m 600 "$IRD/dev/console" c 5 1 2>/dev/null || true; fi
(cd "$IRD" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet) \
    | gzip -9n >"$STAGE/out/initrd.img" \
    || die "cannot create the initramfs archive"
cp "$STAGE/kernel/boot/vmlinuz-$KVER" "$STAGE/out/vmlinuz"

# ------------------------------------------------------------ root image
RFS=$STAGE/rootfs
mkdir -p "$RFS"/{dev,proc,sys,tmp,var,etc,root,mnt,usr/share/vmthunder}
chmod 755 "$RFS"
chmod 1777 "$RFS/tmp"
install_busybox "$RFS"
install -m 755 "$GUEST_INIT_DIR/root-init" "$RFS/sbin/init"
echo vmthunder-guest >"$RFS/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$RFS/etc/passwd"
printf 'root:x:0:\n' >"$RFS/etc/group"
cat >"$RFS/etc/vmthunder-guest" <<EOF
kernel_package=$KERNEL_PKG
kernel_version=$KVER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
recipe=$RECIPE
EOF
# Incompressible payload the guest reads and checksums at every boot.
head -c $((PAYLOAD_MIB * 1024 * 1024)) /dev/urandom >"$RFS/usr/share/vmthunder/payload.bin"
(cd "$RFS/usr/share/vmthunder" && sha256sum payload.bin >payload.sha256)
truncate -s "${ROOT_SIZE_MIB}M" "$STAGE/out/root.img"
mkfs.ext4 -q -F -L vmthunder-root -E root_owner=0:0 -d "$RFS" "$STAGE/out/root.img" \
    || die "mkfs.ext4 -d failed (e2fsprogs >= 1.43 needed; out of disk space in $OUTDIR?)"
e2fsck -fn "$STAGE/out/root.img" >/dev/null 2>&1 || die "freshly built root.img does not pass e2fsck -fn"

# ------------------------------------------------------------ guest.json
json_list() {
    local out='' x
    for x in "$@"; do out+="${out:+, }\"$x\""; done
    echo "[$out]"
}
cat >"$STAGE/out/guest.json" <<EOF
{
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "root": "root.img",
  "kernel_version": "$KVER",
  "kernel_package": "$KERNEL_PKG",
  "append": "$APPEND",
  "marker": "$BOOT_MARKER",
  "read_marker": "$READ_MARKER",
  "write_marker": "$WRITE_MARKER",
  "failure_marker": "$FAIL_MARKER",
  "root_size_mib": $ROOT_SIZE_MIB,
  "modules": $(json_list "${MOD_ORDER[@]}")
}
EOF

# ------------------------------------------------------------ install
# Drop the stamp first so a half-replaced guest never looks complete.
rm -f "$OUTDIR/$STAMP"
for f in "${OUT_FILES[@]}"; do
    chmod 644 "$STAGE/out/$f"
    mv -f "$STAGE/out/$f" "$OUTDIR/$f" || die "cannot move $f into $OUTDIR"
done
cat >"$STAGE/stamp" <<EOF
kernel_version=$KVER
kernel_package=$KERNEL_PKG
recipe=$RECIPE
EOF
mv -f "$STAGE/stamp" "$OUTDIR/$STAMP"
log "guest built in $OUTDIR in $((SECONDS - START))s"
print_paths
