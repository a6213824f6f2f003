"""`vmthunder copy SRC DST`: the transfer library's command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from vmthunder.sizes import parse_size
from vmthunder.transfer.base import DESTINATION_FORMS, SOURCE_FORMS

MiB = 1 << 20
REDRAW_S = 0.1


def add_parser(sub) -> None:
    """Add `copy` to the `vmthunder` subcommands."""
    def bullets(items):
        return "\n".join(textwrap.fill(f"- {f}", 78, initial_indent="  ",
                                       subsequent_indent="    ")
                         for f in items)
    forms, dforms = bullets(SOURCE_FORMS), bullets(DESTINATION_FORMS)
    p = sub.add_parser(
        "copy", help="copy an image from any source vmthunder reads to a "
                     "file or an NBD export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Copy SRC to DST with several requests in flight. Holes the "
            "source reports\n(NBD block status, SEEK_DATA) and blocks of "
            "zeros are not written, so the\ncopy is sparse. Digests the "
            "source offers are checked: every chunk against\nthe manifest "
            "(iscsi://, export:, cinder://), the whole image against\n"
            "Glance's os_hash_value (or --checksum). A file is written "
            "under a temporary\nname (.NAME.part-...) and renamed when "
            "complete and verified: a failed,\ncancelled or killed copy "
            "leaves no file that looks finished.\n\n"
            f"SRC is one of:\n{forms}\n\n"
            f"DST is one of:\n{dforms}\n\n"
            "Prints a summary (or --json, the result as JSON) on stdout; "
            "--progress draws\na progress line on stderr like `qemu-img "
            "convert -p`. Exit 1 on error, the\nmessage naming the side "
            "(source or destination) that failed."))
    p.add_argument("src", metavar="SRC", help="what to copy (forms above)")
    p.add_argument("dst", metavar="DST", help="where to (forms above)")
    p.add_argument("-p", "--progress", action="store_true",
                   help="show progress on stderr")
    p.add_argument("--rate-limit", type=parse_size, metavar="BYTES",
                   help="read at most BYTES per second (50M, 1G...)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object")
    p.add_argument("--dst-format", choices=("raw", "qcow2"), default="raw",
                   help="format of a file DST (qcow2 through qemu-img "
                        "convert; default raw)")
    p.add_argument("--max-in-flight", type=int, metavar="N",
                   help="requests in flight (default: the driver's)")
    p.add_argument("--request-size", type=parse_size, metavar="BYTES",
                   help="bytes per request (default: the driver's)")
    p.add_argument("--digest", default="blake3", metavar="ALGORITHM",
                   help="digest of what was written, in the result "
                        "(blake3, sha256, ... or none; a source's own "
                        "whole-image hash algorithm wins)")
    p.add_argument("--checksum", metavar="ALGORITHM:HEX",
                   help="http(s) SRC: the whole image's expected digest "
                        "(sha256:...), checked before DST is committed")
    p.add_argument("--header", action="append", default=[],
                   metavar="'NAME: VALUE'",
                   help="http(s) SRC: an extra request header; repeat")
    p.add_argument("--glance-endpoint", metavar="URL",
                   help="glance:// SRC: the image service's endpoint "
                        "(default $VMTHUNDER_GLANCE_ENDPOINT); a token "
                        "from $OS_AUTH_TOKEN")
    p.add_argument("--agent-socket", metavar="PATH",
                   help="vmthunder:// SRC: the agent's API socket "
                        "(default from [agent] api_socket)")
    p.add_argument("--origin", metavar="ORIGIN",
                   help="vmthunder://IMAGE SRC: attach IMAGE from ORIGIN "
                        "when the agent does not have it")
    p.add_argument("--no-overwrite", action="store_true",
                   help="fail if a file DST exists (default: replace it "
                        "once the copy is complete)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_progress(p) -> str:
    """One progress line, qemu-img convert -p style."""
    if p.stage not in ("copying", "committing", "done") \
            and p.stage_total:
        pct = 100.0 * p.stage_done / p.stage_total
        return f"    {p.stage} ({pct:.2f}/100%)"
    pct = 100.0 * p.done / p.total if p.total else 0.0
    return (f"    ({pct:.2f}/100%)  {_size(p.data_rate)}/s, "
            f"{_size(p.copied)} read, {_size(p.skipped)} of holes")


def summary(result) -> str:
    rate = result.bytes_copied / result.seconds if result.seconds else 0
    parts = [f"copied {result.source} to {result.destination}: "
             f"{_size(result.size)} ({_size(result.bytes_copied)} read, "
             f"{_size(result.bytes_skipped)} of holes skipped) in "
             f"{result.seconds:.2f} s, {_size(rate)}/s"]
    if len(result.by_source) > 1:
        parts.append("from " + ", ".join(
            f"{k} {_size(v)}" for k, v in result.by_source.items()))
    if result.verified:
        parts.append(f"verified: {result.verified}")
    if result.digest:
        parts.append(result.digest)
    return "; ".join(parts)


def _headers(lines: list[str]) -> dict:
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {line!r}: expected 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    return headers


def run(args, conf) -> int:
    from vmthunder import transfer
    err = sys.stderr
    try:
        options = dict(
            rate_limit=args.rate_limit, dst_format=args.dst_format,
            max_in_flight=args.max_in_flight,
            request_size=args.request_size,
            digest=None if args.digest.lower() == "none" else args.digest,
            overwrite=not args.no_overwrite, config=conf,
            checksum=args.checksum, headers=_headers(args.header),
            glance_endpoint=args.glance_endpoint,
            agent_socket=args.agent_socket, origin=args.origin)
        options = {k: v for k, v in options.items() if v is not None}
        task = transfer.copy(args.src, args.dst, **options)
    except (transfer.TransferError, ValueError) as exc:
        print(f"vmthunder copy: error: {exc}", file=err)
        return 1
    tty = err.isatty()
    shown = ""
    logged = None
    try:
        while not task.done():
            if args.progress:
                p = task.progress()
                line = format_progress(p)
                if tty and line != shown:
                    pad = " " * max(0, len(shown) - len(line))
                    err.write(f"\r{line}{pad}")
                    err.flush()
                    shown = line
                elif not tty:
                    # A log gets a line per stage and whole percent.
                    key = (p.stage, int(100 * p.fraction), p.stage_total
                           and int(100 * p.stage_done / p.stage_total))
                    if key != logged:
                        err.write(line + "\n")
                        err.flush()
                        logged = key
            try:
                task.wait(REDRAW_S if args.progress else 1.0)
            except TimeoutError:
                continue
            except transfer.TransferError:
                break
    except KeyboardInterrupt:
        task.cancel()
        try:
            task.wait(30)
        except (transfer.TransferError, TimeoutError):
            pass
        if args.progress and tty:
            err.write("\n")
        print("vmthunder copy: cancelled; no destination was committed",
              file=err)
        return 130
    if args.progress:
        err.write(("\r" if tty else "") + format_progress(task.progress())
                  + "\n")
        err.flush()
    try:
        result = task.wait()
    except transfer.TransferError as exc:
        print(f"vmthunder copy: error: {exc}", file=err)
        return 1
    print(json.dumps(result.to_dict()) if args.json else summary(result))
    return 0


def main(argv=None) -> int:
    """`python -m vmthunder.transfer.cli SRC DST ...` (no config file)."""
    parser = argparse.ArgumentParser(prog="vmthunder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["copy", *(sys.argv[1:] if argv is None
                                        else argv)])
    return run(args, None)


if __name__ == "__main__":
    sys.exit(main())
