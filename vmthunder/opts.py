"""oslo.config options of vmthunder, exported through list_opts().

``oslo-config-generator --namespace vmthunder`` builds the sample config in
``etc/vmthunder/vmthunder.conf.sample`` from these; command-line flags of
``vmthunder`` default to the values here, so a config file sets the defaults
of a whole host.
"""

from __future__ import annotations

import os

from oslo_config import cfg

KiB = 1024
MiB = 1024 * KiB

cache_opts = [
    cfg.StrOpt(
        "cache_dir",
        default="/var/lib/vmthunder/cache",
        help="Directory holding the copy-on-read caches (one subdirectory "
             "per image) and the per-VM snapshot overlays. Survives "
             "restarts: a cache found here is reused."),
    cfg.IntOpt(
        "chunk_size",
        default=256 * KiB,
        min=4 * KiB,
        max=64 * MiB,
        help="Bytes fetched from the image source per cache miss; a power "
             "of two. Smaller fetches less that the guest never reads, "
             "larger needs fewer round trips to the origin. Chosen by the "
             "boot measurement in docs/benchmarks.md."),
    cfg.IntOpt(
        "max_pending_writes",
        default=32,
        min=1,
        help="Fetched chunks that may wait in memory to be written to the "
             "cache; bounds memory on a cold read storm."),
]

snapshot_opts = [
    cfg.IntOpt(
        "block_size",
        default=4 * KiB,
        min=512,
        max=1 * MiB,
        help="Copy-on-write granularity of a per-VM snapshot; a power of "
             "two. A write smaller than this costs a read of the rest of "
             "the block from below."),
]

nbd_opts = [
    cfg.StrOpt(
        "listen",
        default="tcp:127.0.0.1:10809",
        help="Where `vmthunder serve` listens: tcp:HOST:PORT or "
             "unix:PATH."),
    cfg.IntOpt(
        "max_request_bytes",
        default=32 * MiB,
        min=64 * KiB,
        help="Largest read or write one NBD request may carry; larger "
             "requests get EINVAL/EOVERFLOW (the spec's limit for "
             "well-behaved clients is 32 MiB)."),
    cfg.IntOpt(
        "max_inflight_bytes",
        default=64 * MiB,
        min=1 * MiB,
        help="Bytes of requests in progress over all NBD clients of one "
             "process; past it the server stops reading new requests "
             "until replies drain, so memory does not grow with clients."),
]

boot_opts = [
    cfg.StrOpt(
        "guest_dir",
        default=os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), ".cache", "guest"),
        sample_default="<repo>/.cache/guest",
        help="Where scripts/build-guest.sh puts the small test guest "
             "(vmlinuz, initrd.img, root.img)."),
    cfg.StrOpt(
        "qemu_binary",
        default="qemu-system-x86_64",
        help="QEMU system emulator used by `vmthunder boot`."),
    cfg.StrOpt(
        "qemu_accel",
        default="tcg",
        help="QEMU accelerator (-accel); tcg works everywhere, kvm where "
             "/dev/kvm is usable."),
    cfg.IntOpt(
        "memory_mb",
        default=512,
        min=64,
        help="Guest memory for `vmthunder boot`."),
    cfg.IntOpt(
        "boot_timeout",
        default=120,
        min=5,
        help="Seconds `vmthunder boot` waits for the guest's boot marker "
             "before it gives up."),
    cfg.StrOpt(
        "boot_marker",
        default="VMTHUNDER-BOOT-OK",
        help="Line the guest prints on its serial console once booted."),
]

GROUPS = {
    "cache": cache_opts,
    "snapshot": snapshot_opts,
    "nbd": nbd_opts,
    "boot": boot_opts,
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts():
    """Entry point for oslo-config-generator (oslo.config.opts)."""
    return [(group, list(opts)) for group, opts in GROUPS.items()]
