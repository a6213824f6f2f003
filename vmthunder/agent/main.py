"""`vmthunder-agent` (also `python -m vmthunder.agent`): the host daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from oslo_config import cfg

from vmthunder import aio
from vmthunder import opts
from vmthunder.agent import state as state_mod
from vmthunder.nbd.address import listen_address_arg, parse_address
from vmthunder.nbd.server import NbdLimits

LOG = logging.getLogger("vmthunder.agent")

# Printed on stdout once the API and the NBD servers accept connections.
READY_PREFIX = "vmthunder-agent: ready"


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify units: etc/systemd/vmthunder-agent.service)
    ``state`` (READY=1, STOPPING=1) on $NOTIFY_SOCKET; False when not run
    by systemd or it cannot be told (never fatal)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]             # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        LOG.warning("cannot notify systemd (%s) of %s: %s",
                    os.environ["NOTIFY_SOCKET"], state, exc)
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmthunder-agent",
        description="The vmthunder host agent: attaches images (one shared "
                    "copy-on-read cache each), creates per-VM "
                    "copy-on-write snapshots and serves them to the "
                    "hypervisor over NBD, and takes orders on a local "
                    "JSON/HTTP API (`vmthunder image|vm|status` talk to "
                    "it). Images and VMs are recorded in the state "
                    "directory and restored at start. Runs until SIGTERM or "
                    "Ctrl-C, then flushes every snapshot and cache. Each "
                    "flag defaults to its [agent] option in the config "
                    "file.")
    parser.add_argument("--config-file", metavar="PATH",
                        help="oslo.config file (default: "
                             f"{opts.DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where state.json (images and VMs) is kept "
                             "([agent] state_dir, default "
                             "/var/lib/vmthunder/agent); one agent per "
                             "directory")
    parser.add_argument("--api-socket", metavar="PATH",
                        help="unix socket of the local API ([agent] "
                             "api_socket, default /run/vmthunder/agent.sock)")
    parser.add_argument("--hypervisor-listen", type=listen_address_arg,
                        metavar="unix:PATH|tcp:127.0.0.1:PORT",
                        help="where VM disks are served over NBD, one "
                             "export per VM named after it ([agent] "
                             "hypervisor_listen, default "
                             "unix:/run/vmthunder/nbd.sock)")
    parser.add_argument("--peer-listen", type=listen_address_arg,
                        metavar="tcp:HOST:PORT|unix:PATH",
                        help="serve each image's cache read-only to peer "
                             "hosts here, export name = image name "
                             "([agent] peer_listen; default: not served)")
    parser.add_argument("--peer-mode", choices=("mesh", "tree", "off"),
                        help="how missing chunks are fetched with "
                             "--peer-listen: mesh (peers that hold them, "
                             "found through [coordination]), tree (only "
                             "--peer-parent), off (origin only); default "
                             "[agent] peer_mode")
    parser.add_argument("--peer-parent", metavar="tcp:HOST:PORT",
                        help="tree mode: the parent agent's peer endpoint "
                             "(default [agent] peer_parent; none: read the "
                             "origin)")
    parser.add_argument("--metrics-listen", type=listen_address_arg,
                        metavar="tcp:HOST:PORT|unix:PATH",
                        help="serve Prometheus metrics (/metrics) and "
                             "health (/healthz) over HTTP here ([agent] "
                             "metrics_listen; default: not served, "
                             "/healthz stays on the API socket)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="image caches and VM overlays ([agent] "
                             "cache_dir, else [cache] cache_dir)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug log output")
    return parser


def load_config(path: str | None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(args=[], project="vmthunder",
         default_config_files=opts.config_files(path, "vmthunder-agent"))
    return conf


def make_config(args, conf):
    from vmthunder import stack
    from vmthunder.agent.capacity import CapacityConfig
    from vmthunder.agent.prefetch import PrefetchOptions
    from vmthunder.agent.service import AgentConfig
    from vmthunder.volume import export
    a = conf.agent
    try:
        hypervisor = (args.hypervisor_listen
                      or parse_address(a.hypervisor_listen, listen=True))
        peer = args.peer_listen or (parse_address(a.peer_listen, listen=True)
                                    if a.peer_listen else None)
        metrics = args.metrics_listen or (
            parse_address(a.metrics_listen, listen=True)
            if a.metrics_listen else None)
    except ValueError as exc:
        raise SystemExit(f"vmthunder-agent: error: [agent] option: {exc}")
    try:
        capacity = CapacityConfig.from_conf(conf.cache)
    except ValueError as exc:
        raise SystemExit(f"vmthunder-agent: error: {exc}")
    return AgentConfig(
        state_dir=args.state_dir or a.state_dir,
        api_socket=os.path.abspath(args.api_socket or a.api_socket),
        hypervisor_listen=hypervisor,
        peer_listen=peer,
        cache=stack.CacheOptions.from_conf(
            conf.cache, directory=args.cache_dir or a.cache_dir or None),
        block_size=conf.snapshot.block_size,
        nbd_limits=NbdLimits.from_conf(conf.nbd),
        iscsi=conf.iscsi,
        exports=export.ExportConfig.from_conf(conf.export, None),
        cinder=conf.cinder,
        peer_mode=args.peer_mode or a.peer_mode,
        peer_parent=args.peer_parent or a.peer_parent,
        peer_advertise=a.peer_advertise,
        peer_timeout=a.peer_timeout,
        peer_avoid_s=a.peer_avoid_seconds,
        peer_upload_rate=a.peer_upload_rate or 0.0,
        coordination=conf.coordination,
        metrics_listen=metrics,
        stalled_read_seconds=a.stalled_read_seconds,
        health_min_free_bytes=a.health_min_free_mib * 1024 * 1024,
        prefetch=PrefetchOptions.from_conf(a),
        capacity=capacity)


async def run(config) -> int:
    from vmthunder.agent.api import ApiServer
    from vmthunder.agent.metrics import MetricsServer
    from vmthunder.agent.service import Agent
    agent = Agent(config)
    api = ApiServer(agent, config.api_socket)
    metrics = MetricsServer(agent, config.metrics_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        await api.start()
        await metrics.start()
    except BaseException:
        await metrics.stop()
        await api.stop()
        await agent.stop()
        raise
    LOG.info("agent ready: %d image(s), %d VM(s); API unix:%s, VM disks "
             "on %s", len(agent.images), len(agent.vms), config.api_socket,
             agent.hypervisor_address)
    print(f"{READY_PREFIX} api=unix:{config.api_socket} "
          f"nbd={agent.hypervisor_address}"
          + (f" peers={agent.peering.address}" if agent.peering.address
             else "")
          + (f" metrics={metrics.address}" if metrics.address else ""),
          flush=True)
    sd_notify("READY=1")
    await stop.wait()
    sd_notify("STOPPING=1")
    LOG.info("stopping: closing the API and NBD servers, flushing "
             "snapshots and caches")
    await metrics.stop()
    await api.stop()
    await agent.stop()
    LOG.info("stopped; state in %s", agent.store.path)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = load_config(args.config_file)
    config = make_config(args, conf)
    try:
        return aio.run(run(config))
    except state_mod.StateError as exc:
        print(f"vmthunder-agent: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vmthunder-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
