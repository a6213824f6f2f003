"""The `vmthunder` command line.

Defaults come from the oslo.config options (vmthunder/opts.py), read from
/etc/vmthunder/vmthunder.conf or --config-file; flags override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from oslo_config import cfg

from vmthunder import blockdev
from vmthunder import opts
from vmthunder.nbd.address import parse_address

CONF = cfg.ConfigOpts()
opts.register_opts(CONF)

DEFAULT_CONFIG = "/etc/vmthunder/vmthunder.conf"


def _size(text: str) -> int:
    """Parse 4096, 64K, 1M, 2G (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 65536, 64K, 1M)") from None


def _address(text: str):
    try:
        return parse_address(text, listen=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmthunder",
        description="Boot many VMs from one image without copying it: a "
                    "shared copy-on-read cache per image and a "
                    "copy-on-write snapshot per VM, served over NBD.")
    parser.add_argument("--config-file", metavar="PATH",
                        help="oslo.config file with defaults for every "
                             f"option (default: {DEFAULT_CONFIG} if it "
                             "exists; sample in "
                             "etc/vmthunder/vmthunder.conf.sample)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="serve an image over NBD through the cache",
        description="Serve IMAGE over NBD like qemu-nbd, through vmthunder's "
                    "copy-on-read cache: the cache is exported read-only "
                    "under --export, and each --snapshot NAME is a "
                    "writable copy-on-write export of its own, all sharing "
                    "the one cache. Runs until SIGTERM or Ctrl-C; then "
                    "snapshots are flushed and the cache map saved. Prints "
                    "one 'vmthunder: ready export=NAME uri=URI' line per "
                    "export once it accepts connections.")
    serve.add_argument("image", help="raw image file to serve")
    serve.add_argument("--listen", type=_address, default=None,
                       metavar="tcp:HOST:PORT|unix:PATH",
                       help="where to listen (default from [nbd] listen, "
                            "tcp:127.0.0.1:10809 unless configured); port 0 "
                            "picks a free one")
    serve.add_argument("--export", default=None, metavar="NAME",
                       help="export name of the shared read-only cache "
                            "(default: the image file's name without "
                            "extension). The empty export name opens the "
                            "snapshot if exactly one is given, else this.")
    serve.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="cache directory (default from [cache] "
                            "cache_dir); reused across restarts")
    serve.add_argument("--snapshot", action="append", default=[],
                       metavar="NAME",
                       help="add a writable copy-on-write export for VM "
                            "NAME; repeat for more VMs. Its overlay stays in "
                            "the cache directory until deleted with "
                            "`vmthunder snapshot-delete`.")
    serve.add_argument("--read-only", action="store_true",
                       help="make the snapshot exports read-only too")
    serve.add_argument("--chunk-size", type=_size, default=None,
                       metavar="BYTES",
                       help="cache chunk size for a new cache (default "
                            "from [cache] chunk_size); an existing cache "
                            "keeps its own")
    serve.add_argument("--stats-file", metavar="PATH",
                       help="write counters (bytes read, fetched, written) "
                            "as JSON here every second and at exit")

    boot = sub.add_parser(
        "boot", help="boot the test guest through vmthunder (main job)",
        description="Build the small test guest if missing "
                    "(scripts/build-guest.sh), start `vmthunder serve` on "
                    "it with a snapshot for the VM, boot it under QEMU from "
                    "the NBD export, wait for the guest's boot marker and "
                    "print the time to boot and the bytes the guest read "
                    "against the image size.")
    boot.add_argument("--image", metavar="PATH",
                      help="root disk image (default: the built guest's "
                           "root.img)")
    boot.add_argument("--cache-dir", metavar="DIR",
                      help="cache directory (default: a fresh temporary "
                           "one, so the boot starts cold)")
    boot.add_argument("--vms", type=int, default=1, metavar="N",
                      help="boot N VMs one after the other on the same "
                           "cache; the later ones show the warm cache "
                           "(default 1)")
    boot.add_argument("--chunk-size", type=_size, default=None,
                      metavar="BYTES",
                      help="cache chunk size for a new cache (default "
                           "from [cache] chunk_size)")
    boot.add_argument("--json", action="store_true",
                      help="print the result as one JSON object")

    delete = sub.add_parser(
        "snapshot-delete", help="delete a VM's snapshot overlay",
        description="Delete the copy-on-write overlay of VM NAME on IMAGE. "
                    "The image and the shared cache are not touched.")
    delete.add_argument("image")
    delete.add_argument("name")
    delete.add_argument("--cache-dir", metavar="DIR")
    return parser


def _load_config(path: str | None) -> None:
    files = []
    if path:
        if not os.path.exists(path):
            sys.exit(f"vmthunder: config file {path} does not exist")
        files = [path]
    elif os.path.exists(DEFAULT_CONFIG):
        files = [DEFAULT_CONFIG]
    CONF(args=[], project="vmthunder", default_config_files=files)


def _cmd_serve(args) -> int:
    from vmthunder import serve
    image = args.image
    config = serve.ServeConfig(
        image=image,
        listen=(args.listen
                or parse_address(CONF.nbd.listen, listen=True)),
        cache_dir=args.cache_dir or CONF.cache.cache_dir,
        export=(args.export if args.export is not None else
                os.path.splitext(os.path.basename(image))[0]),
        snapshots=args.snapshot,
        chunk_size=args.chunk_size or CONF.cache.chunk_size,
        block_size=CONF.snapshot.block_size,
        max_pending_writes=CONF.cache.max_pending_writes,
        max_request=CONF.nbd.max_request_bytes,
        max_inflight=CONF.nbd.max_inflight_bytes,
        read_only=args.read_only,
        stats_file=args.stats_file)
    return _run(serve.run(config))


def _cmd_boot(args) -> int:
    from vmthunder import boot
    return _run(boot.run(args, CONF))


def _cmd_snapshot_delete(args) -> int:
    from vmthunder import serve
    from vmthunder.cache import cache_layer, snapshot
    source = serve.open_source(args.image)
    directory = os.path.join(args.cache_dir or CONF.cache.cache_dir,
                             cache_layer.cache_key(source.identity()),
                             "snapshots")
    removed = 0
    for path in snapshot.snapshot_paths(directory, args.name):
        if os.path.exists(path):
            os.unlink(path)
            removed += 1
    if not removed:
        print(f"vmthunder: no snapshot {args.name!r} of {args.image} in "
              f"{directory}", file=sys.stderr)
        return 1
    print(f"deleted snapshot {args.name!r} of {args.image}")
    return 0


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose,
                                                               2)]
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: "
                               "%(message)s")
    _load_config(args.config_file)
    handlers = {"serve": _cmd_serve, "boot": _cmd_boot,
                "snapshot-delete": _cmd_snapshot_delete}
    try:
        return handlers[args.command](args)
    except (blockdev.BlockError, ValueError) as exc:
        print(f"vmthunder {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
