"""The VMs of one benchmark host: virtual (trace replay) or real (QEMU).

The harness starts one of these per compute host, inside the host's
network namespace, once the host's strategy has given every VM a disk
(an NBD URI). It boots all of them at once and prints one JSON line per
VM when it has booted or failed, so the harness can show progress and
time every boot on one clock (CLOCK_MONOTONIC is shared by all network
namespaces of the machine).

    python -m vmthunder.bench.vmhost SPEC.json

SPEC: {"vms": {"NAME": "NBD-URI", ...}, "workload": "replay"|"qemu",
       "trace": PATH (replay), "guest_dir": DIR (qemu),
       "timeout_s": N}
Output lines: {"vm": NAME, "event": "booted"|"failed", "t": MONOTONIC,
               "boot_s": S, ...}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from vmthunder.bench import replay as replay_mod
from vmthunder import trace as trace_mod


def emit(vm: str, event: str, **fields) -> None:
    print(json.dumps({"vm": vm, "event": event, "t": time.monotonic(),
                      **fields}), flush=True)


def until_boot(trace):
    """The part of a trace a boot needs: requests issued before the boot
    marker (what a guest does after it, e.g. powering off, is not boot)."""
    if trace.boot_s is None:
        return trace
    return trace_mod.Trace(trace.header, [r for r in trace.requests
                                          if r.issue_s <= trace.boot_s])


async def replay_vm(name: str, uri: str, trace, timeout: float) -> None:
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(
            replay_mod.replay_nbd(trace, uri), timeout)
    except Exception as exc:                    # noqa: BLE001 - VM fails
        emit(name, "failed", error=f"{type(exc).__name__}: {exc}")
        return
    if result["failed"]:
        emit(name, "failed", error=result["error"], **_io(result))
    else:
        # Booted when the marker came, not when the last I/O ended.
        print(json.dumps({"vm": name, "event": "booted",
                          "t": started + result["boot_s"],
                          "boot_s": result["boot_s"], **_io(result)}),
              flush=True)


def _io(result: dict) -> dict:
    return {k: result[k] for k in ("bytes_read", "bytes_written",
                                   "requests", "errors", "read_wait_s",
                                   "read_ms") if k in result}


async def qemu_vm(name: str, uri: str, guest, conf,
                  timeout: float) -> None:
    """Boot the real guest from ``uri``; booted when its marker appears."""
    from vmthunder import boot as boot_mod
    argv = boot_mod.qemu_command(conf, guest, uri)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    tail = b""
    try:
        async def watch() -> bool:
            nonlocal tail
            while True:
                data = await proc.stdout.read(4096)
                if not data:
                    return False
                tail = (tail + data)[-4096:]
                if guest.marker.encode() in tail:
                    return True
                if guest.failure_marker.encode() in tail:
                    return False
        ok = await asyncio.wait_for(watch(), timeout)
    except asyncio.TimeoutError:
        ok = False
        tail += f"\n[no boot marker within {timeout:g} s]".encode()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    if ok:
        emit(name, "booted", boot_s=round(time.monotonic() - t0, 3))
    else:
        emit(name, "failed", error="QEMU: " + tail.decode(
            errors="replace")[-400:].strip())


async def run(spec: dict) -> None:
    timeout = float(spec.get("timeout_s", 600))
    vms = spec["vms"]
    if spec["workload"] == "replay":
        trace = until_boot(trace_mod.load(spec["trace"]))
        jobs = [replay_vm(n, u, trace, timeout) for n, u in vms.items()]
    else:
        from vmthunder import boot as boot_mod
        from vmthunder.bench.iscsi_origin import make_conf
        guest = boot_mod.load_guest(spec["guest_dir"], build=False)
        conf = make_conf()
        jobs = [qemu_vm(n, u, guest, conf, timeout)
                for n, u in vms.items()]
    await asyncio.gather(*jobs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
