#!/usr/bin/env bash
# Build the whole-disk variant of the small vmthunder test guest: one raw
# disk image with an MBR partition table and a bootloader, bootable by a
# plain BIOS (as Nova boots a cloud image), with no -kernel/-initrd.
# Run with --help for usage.
set -euo pipefail
set -E

PROG=build-guest-disk
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
BUILD_GUEST=$SCRIPT_DIR/build-guest.sh

ROOT_DEVICE=/dev/vda1
# Partition 1 (the root) starts at 1 MiB; the boot partition follows it.
ROOT_START_SECTOR=2048
BOOT_SIZE_MIB=32
# Fixed ids rather than random ones per build.
DISK_ID=0x564d5444            # "VMTD"
BOOT_VOLUME_ID=564d5442       # "VMTB"
BOOT_LABEL=VMTBOOT
MBR_BIN_CANDIDATES=(/usr/lib/syslinux/mbr/mbr.bin /usr/lib/SYSLINUX/mbr.bin)
STAMP=.complete
OUT_FILES=(disk.img guest.json)

usage() {
    cat <<EOF
Usage: scripts/build-guest-disk.sh [--force] [--guest-dir DIR] [OUTDIR]

Build a whole-disk variant of the small test guest (scripts/build-guest.sh):

  OUTDIR/disk.img     raw disk, MBR partition table (disk id $DISK_ID):
                        partition 1  ext4 root: the guest's root.img as is
                                     (the kernel finds it as $ROOT_DEVICE)
                        partition 2  FAT boot partition (active): SYSLINUX,
                                     the guest's vmlinuz and initrd.img, and a
                                     syslinux.cfg that boots at once (no prompt,
                                     no timeout) with
                                     'root=$ROOT_DEVICE <the guest's append>'
                      and SYSLINUX's mbr.bin in the MBR.
  OUTDIR/guest.json   file name, size, layout, kernel command line, markers

OUTDIR defaults to <repo>/.cache/guest-disk (git-ignored).  The small guest
is built first (in --guest-dir, default <repo>/.cache/guest) if it is not
there yet.

The disk boots to the same console markers as the small guest
(VMTHUNDER-BOOT-OK, -READ-OK, -WRITE-OK, or VMTHUNDER-BOOT-FAILED: ...) and
powers itself off.  Every boot writes to its root (/var/boot-count): boot
a copy, a snapshot (qemu snapshot=on) or a vmthunder snapshot to keep
disk.img pristine.

If OUTDIR already holds a disk built by this script from the same guest
files (same size, mtime and inode of vmlinuz, initrd.img, root.img), nothing
is rebuilt.  A build happens in OUTDIR/.build.* and is moved into place when
complete; OUTDIR/$STAMP is written last.

Needs no root and no loop device: the partition table is written by
sfdisk, the FAT by mkfs.vfat and mtools, SYSLINUX by its mtools installer.
Missing tools are installed with apt-get when run as root.

Paths are printed on stdout as shell assignments (GUEST_DISK_DIR=, DISK=,
GUEST_DISK_JSON=); progress goes to stderr.

Boot it with:
  qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nographic -nodefaults \\
    -serial stdio -no-reboot \\
    -drive file=OUTDIR/disk.img,format=raw,if=virtio,snapshot=on

Options:
  -f, --force       rebuild even if OUTDIR holds a current disk
  --guest-dir DIR   the small guest to take kernel, initramfs and root from
  -h, --help        show this help
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
GUEST_DIR=
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -f|--force) FORCE=1 ;;
        --guest-dir)
            [ $# -ge 2 ] || die "--guest-dir needs a directory"
            GUEST_DIR=$2; shift ;;
        --guest-dir=*) GUEST_DIR=${1#--guest-dir=} ;;
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
OUTDIR=${OUTDIR:-$REPO_ROOT/.cache/guest-disk}
GUEST_DIR=${GUEST_DIR:-$REPO_ROOT/.cache/guest}

# ------------------------------------------------------------ the small guest
# build-guest.sh is idempotent: it returns at once when the guest is there.
bash "$BUILD_GUEST" "$GUEST_DIR" >/dev/null \
    || die "scripts/build-guest.sh $GUEST_DIR failed"
GUEST_DIR=$(cd "$GUEST_DIR" && pwd)
for f in guest.json vmlinuz initrd.img root.img .complete; do
    [ -s "$GUEST_DIR/$f" ] || die "no $GUEST_DIR/$f after scripts/build-guest.sh"
done

# json_field KEY: a top-level string or number of the guest's guest.json.
json_field() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
        "$GUEST_DIR/guest.json" "$1"
}

# What the disk is made of: this script and the guest's files as they are
# now (a rebuilt guest, or a boot that wrote to root.img, changes them).
inputs() {
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    cat "$GUEST_DIR/.complete" "$GUEST_DIR/guest.json"
    (cd "$GUEST_DIR" && stat -c '%n %s %.9Y %i' vmlinuz initrd.img root.img)
}
RECIPE=$(inputs | sha256sum | cut -d' ' -f1)

# ------------------------------------------------------------ cached disk?
stamp_field() { sed -n "s/^$1=//p" "$OUTDIR/$STAMP" 2>/dev/null | head -n1 || true; }

is_current() {
    local f
    [ "$FORCE" = 0 ] || return 1
    [ -f "$OUTDIR/$STAMP" ] || return 1
    for f in "${OUT_FILES[@]}"; do [ -s "$OUTDIR/$f" ] || return 1; done
    [ "$(stamp_field recipe)" = "$RECIPE" ]
}

print_paths() {
    echo "GUEST_DISK_DIR=$OUTDIR"
    echo "DISK=$OUTDIR/disk.img"
    echo "GUEST_DISK_JSON=$OUTDIR/guest.json"
}

mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if is_current; then
    log "disk already built in $OUTDIR (use --force to rebuild)"
    print_paths
    exit 0
fi

# One build at a time per OUTDIR (e.g. parallel test workers).
exec 9>"$OUTDIR/.lock" || die "cannot open lock file $OUTDIR/.lock"
if ! flock -n 9; then
    log "another build is running in $OUTDIR; waiting for it"
    flock 9
fi
if is_current; then
    log "disk already built in $OUTDIR"
    print_paths
    exit 0
fi
START=$SECONDS

# --------------------------------------------------------------- host tools
export PATH=$PATH:/usr/sbin:/sbin
APT_UPDATED=0
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing host packages: $*; install them with 'sudo apt-get install $*' (scripts/install.sh does), or run this script as root"
    if [ "$APT_UPDATED" = 0 ]; then
        log "running apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "installing host packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

find_mbr_bin() {
    local p
    for p in "${MBR_BIN_CANDIDATES[@]}"; do
        [ -s "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

missing=()
for spec in sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools syslinux:syslinux \
    python3:python3 flock:util-linux; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
done
find_mbr_bin >/dev/null || missing+=(syslinux-common)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
for t in sfdisk mkfs.vfat mcopy mdir syslinux python3; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' still not found"
done
MBR_BIN=$(find_mbr_bin) || die "no SYSLINUX mbr.bin (package syslinux-common) in ${MBR_BIN_CANDIDATES[*]}"

# --------------------------------------------------------------- staging
STAGE=$(mktemp -d "$OUTDIR/.build.XXXXXX") || die "cannot create a staging directory in $OUTDIR"
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

APPEND="root=$ROOT_DEVICE $(json_field append)"
KVER=$(json_field kernel_version)
ROOT_BYTES=$(stat -c %s "$GUEST_DIR/root.img")
[ $((ROOT_BYTES % 512)) = 0 ] || die "$GUEST_DIR/root.img is not a whole number of sectors"
ROOT_SECTORS=$((ROOT_BYTES / 512))
BOOT_START_SECTOR=$((ROOT_START_SECTOR + ROOT_SECTORS))
# Keep the boot partition 1 MiB aligned.
BOOT_START_SECTOR=$(( (BOOT_START_SECTOR + 2047) / 2048 * 2048 ))
BOOT_SECTORS=$((BOOT_SIZE_MIB * 2048))
DISK_SECTORS=$((BOOT_START_SECTOR + BOOT_SECTORS))
NEED_BYTES=$(( $(stat -c %s "$GUEST_DIR/vmlinuz") + $(stat -c %s "$GUEST_DIR/initrd.img") + 1048576 ))
[ "$NEED_BYTES" -lt $((BOOT_SECTORS * 512 * 9 / 10)) ] \
    || die "kernel + initramfs ($NEED_BYTES bytes) do not fit a ${BOOT_SIZE_MIB} MiB boot partition: raise BOOT_SIZE_MIB"

DISK=$STAGE/disk.img
BOOTFS=$STAGE/boot.fat
truncate -s $((DISK_SECTORS * 512)) "$DISK"

# Partition table: 1 = root (Linux), 2 = boot (FAT32 LBA, active).
log "partitions: root ${ROOT_SECTORS} sectors at $ROOT_START_SECTOR, boot ${BOOT_SIZE_MIB} MiB at $BOOT_START_SECTOR"
printf 'label: dos\nlabel-id: %s\nunit: sectors\n\nstart=%s, size=%s, type=83\nstart=%s, size=%s, type=c, bootable\n' \
    "$DISK_ID" "$ROOT_START_SECTOR" "$ROOT_SECTORS" "$BOOT_START_SECTOR" "$BOOT_SECTORS" \
    | sfdisk -q --no-reread --no-tell-kernel "$DISK" >&2 \
    || die "sfdisk could not write the partition table"
# The MBR boot code (first 440 bytes; the table after it stays).
dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none

# The boot FAT, built as a file of its own: its boot sector records the
# partition's start (hidden sectors), which SYSLINUX's loader uses.
truncate -s $((BOOT_SECTORS * 512)) "$BOOTFS"
mkfs.vfat -n "$BOOT_LABEL" -i "$BOOT_VOLUME_ID" -h "$BOOT_START_SECTOR" "$BOOTFS" >/dev/null \
    || die "mkfs.vfat failed"
syslinux --install "$BOOTFS" || die "syslinux --install failed"
# PROMPT 0 + TIMEOUT 0 + NOESCAPE 1: boot the one entry at once.
cat >"$STAGE/syslinux.cfg" <<EOF
# Written by scripts/build-guest-disk.sh
SERIAL 0 115200
DEFAULT vmthunder
PROMPT 0
TIMEOUT 0
NOESCAPE 1
LABEL vmthunder
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $APPEND
EOF
MTOOLS_SKIP_CHECK=1 mcopy -m -i "$BOOTFS" "$GUEST_DIR/vmlinuz" "$GUEST_DIR/initrd.img" \
    "$STAGE/syslinux.cfg" ::/ || die "mcopy to the boot FAT failed"
MTOOLS_SKIP_CHECK=1 mdir -a -b -i "$BOOTFS" ::/ | grep -qi 'ldlinux.sys' \
    || die "no ldlinux.sys on the boot FAT after syslinux --install"

dd if="$BOOTFS" of="$DISK" bs=1M seek=$((BOOT_START_SECTOR * 512)) oflag=seek_bytes \
    conv=notrunc status=none
# The root, as is; conv=sparse keeps its holes as holes.
dd if="$GUEST_DIR/root.img" of="$DISK" bs=1M seek=$((ROOT_START_SECTOR * 512)) oflag=seek_bytes \
    conv=notrunc,sparse status=none
rm -f "$BOOTFS"

# Check what was written: the table, and the root read back bit for bit.
table=$(sfdisk -d "$DISK" 2>/dev/null) || die "sfdisk cannot read back the partition table"
grep -q "start= *$ROOT_START_SECTOR, size= *$ROOT_SECTORS, type=83" <<<"$table" \
    || die "unexpected partition table: $table"
cmp -s -n "$ROOT_BYTES" -i $((ROOT_START_SECTOR * 512)):0 "$DISK" "$GUEST_DIR/root.img" \
    || die "partition 1 differs from $GUEST_DIR/root.img"
chmod 644 "$DISK"

cat >"$STAGE/guest.json" <<EOF
{
  "disk": "disk.img",
  "format": "raw",
  "size_bytes": $((DISK_SECTORS * 512)),
  "partition_table": "dos",
  "disk_id": "$DISK_ID",
  "bootloader": "syslinux $(dpkg-query -W -f='${Version}' syslinux 2>/dev/null || echo unknown)",
  "root_device": "$ROOT_DEVICE",
  "root_partition": {"number": 1, "start_bytes": $((ROOT_START_SECTOR * 512)), "size_bytes": $ROOT_BYTES, "type": "83", "filesystem": "ext4"},
  "boot_partition": {"number": 2, "start_bytes": $((BOOT_START_SECTOR * 512)), "size_bytes": $((BOOT_SECTORS * 512)), "type": "c", "filesystem": "vfat", "active": true},
  "append": "$APPEND",
  "kernel_version": "$KVER",
  "marker": "$(json_field marker)",
  "read_marker": "$(json_field read_marker)",
  "write_marker": "$(json_field write_marker)",
  "failure_marker": "$(json_field failure_marker)",
  "memory_mb": 256,
  "source_guest_dir": "$GUEST_DIR"
}
EOF
python3 -m json.tool "$STAGE/guest.json" >/dev/null || die "wrote invalid JSON (bug)"

# ------------------------------------------------------------ install
rm -f "$OUTDIR/$STAMP"
for f in "${OUT_FILES[@]}"; do
    mv -f "$STAGE/$f" "$OUTDIR/$f" || die "cannot move $f into $OUTDIR"
done
printf 'recipe=%s\nkernel_version=%s\n' "$RECIPE" "$KVER" >"$STAGE/stamp"
mv -f "$STAGE/stamp" "$OUTDIR/$STAMP"
log "disk guest built in $OUTDIR in $((SECONDS - START))s"
print_paths
