"""`vmthunder trace`: record a boot trace of an image, publish it with the
image's export, show one.

- ``record``: boots the guest once through `vmthunder boot` (which has
  `vmthunder serve` record the VM's block trace and adds the boot
  marker's time) into one trace file.
- ``publish``: a trace beside an export's manifest (LUN 3, its digest in
  the manifest's header: vmthunder/volume/published_trace.py); hosts
  attaching the image prefetch it at VM create.
- ``info``: the summary `python -m vmthunder.trace info` prints.
"""

from __future__ import annotations

import argparse
import os
import sys

from vmthunder import aio
from vmthunder.sizes import parse_size


def add_parser(sub) -> None:
    trace = sub.add_parser(
        "trace", help="record, publish and show boot traces of images",
        description="Boot traces are data of an image: what a boot reads, "
                    "in order. `record` makes one from a real boot, "
                    "`publish` puts it beside an export's manifest (with "
                    "its digest in the manifest's header, so hosts trust "
                    "it as they trust the manifest) for hosts to prefetch "
                    "at VM create, `info` summarises one.")
    cmds = trace.add_subparsers(dest="trace_command", metavar="ACTION",
                                required=True)
    record = cmds.add_parser(
        "record", help="boot the guest once and write its trace",
        description="Boot the guest once through `vmthunder boot` (a "
                    "fresh cache, QEMU from vmthunder serve's NBD export) "
                    "and write the block trace of that boot, with the "
                    "time of the guest's boot marker, to OUTPUT.")
    record.add_argument("output", help="trace file to write (.gz "
                                       "compresses)")
    record.add_argument("--guest-dir", metavar="DIR",
                        help="guest to boot (default from [boot] "
                             "guest_dir)")
    record.add_argument("--image", metavar="PATH",
                        help="root disk image (default: the guest's)")
    record.add_argument("--origin", choices=("auto", "iscsi", "file"),
                        default="auto",
                        help="how the image is served during the boot "
                             "(see `vmthunder boot --help`)")
    record.add_argument("--chunk-size", type=parse_size, default=None,
                        metavar="BYTES", help="cache chunk size")
    publish = cmds.add_parser(
        "publish", help="publish a trace with an export (origin host)",
        description="Publish TRACE with export NAME: stored as trace.lun "
                    "in the export's directory, served read-only as LUN 3 "
                    "of its target, its size and digest written into the "
                    "manifest's header. Hosts read it when a VM is created "
                    "on the image and prefetch its chunks; a trace that "
                    "does not match the digest is refused. Publishing "
                    "again replaces it. Needs root.")
    publish.add_argument("name", help="export name")
    publish.add_argument("trace", help="trace file (from `vmthunder trace "
                                       "record` or `vmthunder boot "
                                       "--trace`)")
    publish.add_argument("--export-dir", metavar="DIR",
                         help="store of exports (default from [export] "
                              "export_dir)")
    info = cmds.add_parser("info", help="summary of a trace file")
    info.add_argument("trace")
    info.add_argument("--json", action="store_true",
                      help="print one JSON object")


def run(args, conf) -> int:
    if args.trace_command == "record":
        return _record(args, conf)
    if args.trace_command == "publish":
        return _publish(args, conf)
    from vmthunder import trace as trace_mod
    return trace_mod.main(["info", args.trace]
                          + (["--json"] if args.json else []))


def _record(args, conf) -> int:
    from vmthunder import boot
    from vmthunder import trace as trace_mod
    output = os.path.abspath(args.output)
    boot_args = argparse.Namespace(
        vms=1, guest_dir=args.guest_dir, image=args.image, cache_dir=None,
        origin=args.origin, chunk_size=args.chunk_size, trace=output,
        json=False)
    try:
        code = aio.run(boot.run(boot_args, conf))
    except boot.BootError as exc:
        print(f"vmthunder trace record: {exc}", file=sys.stderr)
        return 1
    if code != 0:
        return code
    summary = trace_mod.load(output).summary()
    print(f"trace {output}: {summary['requests']} requests, working set "
          f"{summary['working_set_bytes'] / 2**20:.1f} MiB, boot marker at "
          f"{summary['boot_s']} s")
    return 0


def _publish(args, conf) -> int:
    from vmthunder import privileged
    from vmthunder.volume import export, published_trace, tgt
    cfg = export.ExportConfig.from_conf(conf.export, args.export_dir)
    try:
        published_trace.publish(cfg, args.name, args.trace)
    except (export.ExportError, tgt.TgtError,
            privileged.PrivilegedError) as exc:
        print(f"vmthunder trace publish: error: {exc}", file=sys.stderr)
        return 1
    return 0
