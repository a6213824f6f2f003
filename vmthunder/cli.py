"""The `vmthunder` command line.

Defaults come from the oslo.config options (vmthunder/opts.py), read from
/etc/vmthunder/vmthunder.conf or --config-file; flags override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from oslo_config import cfg

from vmthunder import aio
from vmthunder import blockdev
from vmthunder import opts
from vmthunder.nbd.address import listen_address_arg, parse_address
from vmthunder.nbd.server import NbdLimits
from vmthunder.sizes import parse_size

CONF = cfg.ConfigOpts()
opts.register_opts(CONF)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmthunder",
        description="Boot many VMs from one image without copying it: a "
                    "shared copy-on-read cache per image and a "
                    "copy-on-write snapshot per VM, served over NBD.")
    parser.add_argument("--config-file", metavar="PATH",
                        help="oslo.config file with defaults for every "
                             f"option (default: {opts.DEFAULT_CONFIG} if it "
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
    serve.add_argument("image", help="what to serve: a raw image file, "
                       "iscsi://[USER@]HOST[:PORT]/IQN/LUN (read lazily; "
                       "chunks checked against the manifest on LUN 2, "
                       "see [iscsi] options), or export:NAME (an image "
                       "`vmthunder export` published on [export] portal)")
    serve.add_argument("--listen", type=listen_address_arg, default=None,
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
    serve.add_argument("--snapshot-size", type=parse_size, default=None,
                       metavar="SIZE",
                       help="virtual size of the --snapshot disks (bytes, "
                            "or 20G, 512M...), at least the image's: past "
                            "the image they read as zeros until written. "
                            "Default: the size a snapshot has (the image's "
                            "for a new one); a larger size grows it, a "
                            "smaller one is refused.")
    serve.add_argument("--read-only", action="store_true",
                       help="make the snapshot exports read-only too")
    serve.add_argument("--chunk-size", type=parse_size, default=None,
                       metavar="BYTES",
                       help="cache chunk size for a new cache (default "
                            "from [cache] chunk_size); an existing cache "
                            "keeps its own")
    serve.add_argument("--sync-interval", type=float, default=None,
                       metavar="SECONDS",
                       help="seconds between cache syncs (default from "
                            "[cache] sync_interval): chunks fetched since "
                            "the last sync are refetched after a crash")
    serve.add_argument("--stats-file", metavar="PATH",
                       help="write counters (bytes read, fetched, written) "
                            "as JSON here every second and at exit")
    serve.add_argument("--trace", metavar="FILE",
                       help="record a block trace of each export's requests "
                            "(default from [nbd] trace_file); with several "
                            "exports, {export} in FILE is replaced by the "
                            "export name, else the name is inserted before "
                            "the first dot (boot.trace.gz -> "
                            "boot.vm1.trace.gz). Exports nobody used get "
                            "no file.")

    boot = sub.add_parser(
        "boot", help="boot the test guest through vmthunder (main job)",
        description="Build the small test guest if missing "
                    "(scripts/build-guest.sh), export its image as an iSCSI "
                    "LUN on a private tgtd (with --origin iscsi, the default "
                    "as root), start `vmthunder serve` on it with a snapshot "
                    "for the VM, boot it under QEMU from the NBD export, "
                    "wait for the guest's boot marker and print the time to "
                    "boot, the bytes the guest read against the image size "
                    "and the bytes fetched from the origin. Everything it "
                    "starts is stopped at the end.")
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
    boot.add_argument("--chunk-size", type=parse_size, default=None,
                      metavar="BYTES",
                      help="cache chunk size for a new cache (default "
                           "from [cache] chunk_size)")
    boot.add_argument("--origin", choices=("auto", "iscsi", "file"),
                      default="auto",
                      help="where the image comes from: iscsi exports it "
                           "on a private tgtd (LUN + manifest, like "
                           "`vmthunder export`) and every VM reads it "
                           "lazily over iSCSI; file serves the file "
                           "directly. auto: iscsi when root with tgtd, "
                           "else file (default)")
    boot.add_argument("--json", action="store_true",
                      help="print the result as one JSON object")
    boot.add_argument("--guest-dir", metavar="DIR",
                      help="guest to boot: a directory with guest.json "
                           "(kernel, initrd, root image, append, marker), "
                           "like scripts/build-guest.sh makes (default "
                           "from [boot] guest_dir)")
    boot.add_argument("--trace", metavar="FILE",
                      help="record the guest's block trace, with the time "
                           "to its boot marker, in FILE (.gz compresses) "
                           "for python -m vmthunder.bench.replay; with "
                           "--vms N > 1 the VM name is inserted before the "
                           "first dot of the file name")

    delete = sub.add_parser(
        "snapshot-delete", help="delete a VM's snapshot overlay",
        description="Delete the copy-on-write overlay of VM NAME on IMAGE. "
                    "The image and the shared cache are not touched.")
    delete.add_argument("image")
    delete.add_argument("name")
    delete.add_argument("--cache-dir", metavar="DIR")

    _add_export_parsers(sub)
    from vmthunder.agent import client as agent_client
    agent_client.add_parsers(sub)
    from vmthunder.transfer import cli as transfer_cli
    transfer_cli.add_parser(sub)
    from vmthunder import trace_cli
    trace_cli.add_parser(sub)
    return parser


def _add_export_parsers(sub) -> None:
    export = sub.add_parser(
        "export", help="export an image read-only over iSCSI (tgtd)",
        description="Store IMAGE (raw, or qcow2 and other formats "
                    "qemu-img converts) as a raw volume under [export] "
                    "export_dir, write its chunk manifest, and export both "
                    "read-only through tgtd as target <iqn_prefix>:NAME: "
                    "LUN 1 the volume, LUN 2 the manifest. Starts tgtd if "
                    "none answers on [export] tgtd_control_port, and "
                    "re-creates the targets of all recorded exports that "
                    "tgtd lost. Exporting the same content under the same "
                    "name again changes nothing. Needs root. IMAGE may "
                    "be glance://IMAGE_ID: the Glance image (raw or qcow2) "
                    "is fetched through the transfer library (its "
                    "os_hash_value checked) into the export, then "
                    "exported the same way. With "
                    "--cinder, IMAGE is glance://IMAGE_ID and the image "
                    "becomes a read-only, multi-attached Cinder volume "
                    "with its manifest in a second small volume (origin "
                    "cinder://VOLUME_ID; [cinder] options).")
    export.add_argument("image", help="image file to export, or "
                                      "glance://IMAGE_ID (always with "
                                      "--cinder)")
    export.add_argument("--name",
                        help="export name: lower-case letters, digits, "
                             "'.', '-' (part of the target IQN); needed "
                             "without --cinder")
    export.add_argument("--cinder", action="store_true",
                        help="export Glance image IMAGE (glance://ID) as a "
                             "Cinder volume: create or find its volume, "
                             "wait for it, publish its manifest (see "
                             "[cinder] options)")
    export.add_argument("--glance-endpoint", metavar="URL",
                        help="glance://IMAGE_ID: Glance's endpoint "
                             "(default [cinder] glance_endpoint, else "
                             "$VMTHUNDER_GLANCE_ENDPOINT); a token from "
                             "$OS_AUTH_TOKEN")
    export.add_argument("--chunk-size", type=parse_size, default=None,
                        metavar="BYTES",
                        help="manifest chunk size, a power of two (default "
                             "from [export] chunk_size)")
    export.add_argument("--chap", action="store_true",
                        help="require CHAP: generate a user and secret, "
                             "stored in <export_dir>/NAME/chap.json "
                             "(mode 0600)")
    export.add_argument("--portal", metavar="HOST:PORT",
                        help="iSCSI portal (default from [export] portal, "
                             "127.0.0.1:3260 unless configured)")
    export.add_argument("--export-dir", metavar="DIR",
                        help="store of exports (default from [export] "
                             "export_dir)")

    unexport = sub.add_parser(
        "unexport", help="stop exporting an image and delete its volume",
        description="Remove the target of export NAME from tgtd (logging "
                    "out initiators still attached) and delete its stored "
                    "volume and manifest. Needs root.")
    unexport.add_argument("name")
    unexport.add_argument("--keep-data", action="store_true",
                          help="keep the stored volume and manifest; "
                               "exporting the same image under NAME later "
                               "reuses them")
    unexport.add_argument("--export-dir", metavar="DIR",
                          help="store of exports (default from [export] "
                               "export_dir)")

    exports = sub.add_parser(
        "exports", help="list exported images",
        description="List the exports recorded under [export] export_dir: "
                    "name, size, chunk size, portal, IQN, initiators "
                    "logged in and state (exported, or not in tgtd after "
                    "a tgtd restart).")
    exports.add_argument("--json", action="store_true",
                         help="print a JSON list, with URLs, tid, source")
    exports.add_argument("--restore", action="store_true",
                         help="first start tgtd if needed and re-create the "
                              "targets of all recorded exports (after a "
                              "tgtd restart or a reboot); needs root")
    exports.add_argument("--export-dir", metavar="DIR",
                         help="store of exports (default from [export] "
                              "export_dir)")

    # Listed here for `vmthunder --help`; main() hands its arguments to
    # the harness, which has its own parser (`vmthunder bench --help`).
    sub.add_parser(
        "bench", add_help=False,
        help="boot N VMs on M hosts (network namespaces) with every boot "
             "strategy and compare them; see `vmthunder bench --help`")


def _load_config(path: str | None) -> None:
    CONF(args=[], project="vmthunder",
         default_config_files=opts.config_files(path, "vmthunder"))


def _cmd_serve(args) -> int:
    from vmthunder import fileio, serve, stack
    fileio.keep_freed_buffers()
    image = args.image
    config = serve.ServeConfig(
        image=image,
        listen=(args.listen
                or parse_address(CONF.nbd.listen, listen=True)),
        cache=stack.CacheOptions.from_conf(
            CONF.cache, directory=args.cache_dir, chunk_size=args.chunk_size,
            sync_interval=args.sync_interval),
        export=(args.export if args.export is not None else
                default_export_name(image)),
        snapshots=args.snapshot,
        snapshot_size=args.snapshot_size,
        block_size=CONF.snapshot.block_size,
        nbd_limits=NbdLimits.from_conf(CONF.nbd),
        read_only=args.read_only,
        stats_file=args.stats_file,
        iscsi=CONF.iscsi,
        exports=_export_config(None),
        cinder=CONF.cinder,
        trace=args.trace or CONF.nbd.trace_file)
    return aio.run(serve.run(config))


def default_export_name(image: str) -> str:
    """The image file's name without extension; an export's or LUN's
    target name for export:NAME and iscsi:// images."""
    from vmthunder import stack
    return stack.Origin.parse(image).default_name()


def _cmd_boot(args) -> int:
    from vmthunder import boot
    return aio.run(boot.run(args, CONF))


def _cmd_snapshot_delete(args) -> int:
    from vmthunder import stack
    from vmthunder.cache import cache_layer, snapshot

    async def identity():
        source = await stack.open_source(stack.Origin.parse(args.image),
                                         CONF.iscsi, _export_config(None),
                                         CONF.cinder)
        try:
            return source.identity()
        finally:
            await source.close()

    directory = os.path.join(args.cache_dir or CONF.cache.cache_dir,
                             cache_layer.cache_key(aio.run(identity())),
                             "snapshots")
    if not snapshot.remove_files(directory, args.name):
        print(f"vmthunder: no snapshot {args.name!r} of {args.image} in "
              f"{directory}", file=sys.stderr)
        return 1
    print(f"deleted snapshot {args.name!r} of {args.image}")
    return 0


def _export_config(args):
    from vmthunder.volume import export
    return export.ExportConfig.from_conf(
        CONF.export, getattr(args, "export_dir", None))


def _export_errors():
    from vmthunder import privileged
    from vmthunder.volume import export, tgt
    return (export.ExportError, tgt.TgtError, privileged.PrivilegedError)


def _cmd_export(args) -> int:
    from vmthunder.volume import export
    if args.cinder:
        return _cmd_export_cinder(args)
    if not args.name:
        print("vmthunder export: error: --name is required (or --cinder "
              "with glance://IMAGE_ID)", file=sys.stderr)
        return 2
    try:
        if args.image.startswith("glance://"):
            from vmthunder.volume import glance_export
            glance_export.export_glance_image(
                _export_config(args), args.image, args.name,
                glance_endpoint=(args.glance_endpoint
                                 or CONF.cinder.glance_endpoint),
                chunk_size=args.chunk_size, chap=args.chap,
                portal=args.portal)
        else:
            export.export_image(_export_config(args), args.image,
                                args.name, chunk_size=args.chunk_size,
                                chap=args.chap, portal=args.portal)
    except _export_errors() as exc:
        print(f"vmthunder export: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_export_cinder(args) -> int:
    from vmthunder.cinder import client, export
    image = args.image
    if not image.startswith("glance://") or \
            not image.removeprefix("glance://").strip("/"):
        print(f"vmthunder export: error: with --cinder, give the image as "
              f"glance://IMAGE_ID, not {image!r}", file=sys.stderr)
        return 2
    try:
        export.export_glance_image(
            client.CinderSettings.from_conf(CONF.cinder),
            image.removeprefix("glance://").strip("/"),
            chunk_size=args.chunk_size or CONF.export.chunk_size)
    except client.CinderError as exc:
        print(f"vmthunder export: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_unexport(args) -> int:
    from vmthunder.volume import export
    try:
        export.unexport(_export_config(args), args.name, args.keep_data)
    except _export_errors() as exc:
        print(f"vmthunder unexport: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_exports(args) -> int:
    import json
    from vmthunder.volume import export
    cfg = _export_config(args)
    try:
        if args.restore:
            export.restore(cfg, out=(lambda text: None) if args.json
                           else print)
        rows, problems = export.list_exports(cfg)
    except _export_errors() as exc:
        print(f"vmthunder exports: error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"vmthunder exports: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(export.format_table(rows))
    else:
        print(f"no exports in {cfg.export_dir}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from vmthunder.bench import harness
        return harness.main(argv[1:])
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
                "snapshot-delete": _cmd_snapshot_delete,
                "export": _cmd_export, "unexport": _cmd_unexport,
                "exports": _cmd_exports}
    from vmthunder.agent import client as agent_client
    for name in agent_client.COMMANDS:
        handlers[name] = lambda args: agent_client.run(args, CONF)
    from vmthunder.transfer import cli as transfer_cli
    handlers["copy"] = lambda args: transfer_cli.run(args, CONF)
    from vmthunder import trace_cli
    handlers["trace"] = lambda args: trace_cli.run(args, CONF)
    try:
        return handlers[args.command](args)
    except (blockdev.BlockError, ValueError) as exc:
        print(f"vmthunder {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
