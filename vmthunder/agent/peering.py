"""This host among its peers: membership (mesh mode, through tooz), the
NBD server that exports image caches (and their digest tables) to peer
hosts, and the directory an image's ImageVolume asks who else holds it.
The agent (service.py) owns one Peering."""

from __future__ import annotations

import logging

from vmthunder.nbd.address import Address, parse_address
from vmthunder.nbd.server import NbdServer
from vmthunder.p2p.digest_table import image_of, table_name
from vmthunder.p2p.export import PeerExport
from vmthunder.p2p.volume import StaticPeers
from vmthunder.ratelimit import RateLimit, format_rate

LOG = logging.getLogger(__name__)


class ImageUris:
    """A PeerDirectory giving NBD URIs of an image's export on each peer
    (peers export every image cache under the image's name).

    With a ``membership`` (vmthunder/agent/membership.py: ``members()``
    and ``member_id``) it also names the image's owners (``owners_for``,
    see vmthunder/p2p/owners.py): every live member that announced the
    image, keyed by member id, and this host (uri None) whether it
    announced the image yet or not.
    """

    def __init__(self, endpoints, membership=None):
        self.endpoints = endpoints      # .peers_for(image) -> addresses
        self.membership = membership

    def peers_for(self, image: str) -> list[str]:
        if self.endpoints is None:
            return []
        uris = []
        # An image's digest table is exported by the hosts of the image.
        for endpoint in self.endpoints.peers_for(image_of(image)):
            try:
                uris.append(parse_address(endpoint).nbd_uri(image))
            except ValueError as exc:
                LOG.warning("peer endpoint %r is not usable: %s", endpoint,
                            exc)
        return uris

    def owners_for(self, image: str) -> list[tuple[str, str | None]]:
        if self.membership is None:
            return []
        me = self.membership.member_id
        owners: list[tuple[str, str | None]] = []
        for member, info in self.membership.members().items():
            if member == me or image_of(image) not in info["images"] \
                    or not info["endpoint"]:
                continue
            try:
                owners.append((member, parse_address(info["endpoint"])
                               .nbd_uri(image)))
            except ValueError:
                continue        # peers_for warns about it
        owners.append((me, None))
        return owners


def endpoint_of(address: Address) -> str:
    """What other agents dial: tcp:HOST:PORT (unix:PATH reaches only the
    agents of this host, e.g. in tests)."""
    if address.kind == "tcp" and address.port == 0:
        raise ValueError(f"peer_listen {address}: give a fixed port, or "
                         "[agent] peer_advertise: peers must know where "
                         "to dial")
    return str(address)


class Peering:
    """Peers of one agent (``config``: its AgentConfig)."""

    def __init__(self, config, prepare_socket):
        self.config = config
        # prepare_socket(path, what): clears a stale unix socket path.
        self._prepare_socket = prepare_socket
        self.server: NbdServer | None = None
        self.address: Address | None = None
        self.membership = None          # mesh peers: who holds what
        # [agent] peer_upload_rate: one bucket for every peer connection.
        rate = getattr(config, "peer_upload_rate", 0) or 0
        self.upload_limit = RateLimit(rate) if rate else None

    @property
    def enabled(self) -> bool:
        return (self.config.peer_listen is not None
                and self.config.peer_mode != "off")

    def directory(self):
        """Who else serves an image (a PeerDirectory for ImageVolume)."""
        if self.config.peer_mode == "tree":
            parent = self.config.peer_parent
            return ImageUris(StaticPeers([parent] if parent else []))
        return ImageUris(self.membership, membership=self.membership)

    async def start_membership(self) -> None:
        """Join the peer group (mesh mode) to announce the images held
        here and to learn who holds the others'."""
        if not self.enabled or self.config.peer_mode != "mesh":
            return
        from vmthunder.agent.membership import Membership
        coord = self.config.coordination
        endpoint = self.config.peer_advertise or endpoint_of(
            self.config.peer_listen)
        self.membership = Membership(
            coord.backend_url, coord.member_id, endpoint,
            group=coord.group, heartbeat_s=coord.heartbeat_interval,
            refresh_s=coord.heartbeat_interval)
        await self.membership.start()
        LOG.info("joined peer group %r as %s (%s) through %s", coord.group,
                 coord.member_id, endpoint, coord.backend_url)

    async def announce(self, images, traces: dict | None = None) -> None:
        """Tell the group which images this host holds (their names), and
        the small entries of the boot traces it recorded (``traces``:
        agent/trace_recording.py capabilities())."""
        if self.membership is not None:
            await self.membership.announce(sorted(images), traces)

    async def start_server(self, images) -> None:
        """Serve the caches of ``images`` (attached ones) read-only to
        peer hosts, when [agent] peer_listen is set (export name = image
        name)."""
        if self.config.peer_listen is None:
            return
        # A read that would wait for the upload limit longer than half
        # a peer's timeout is refused ("not now"): the peer reads it
        # elsewhere instead of timing out and avoiding this host.
        self.server = NbdServer(
            self.config.nbd_limits, upload_limit=self.upload_limit,
            upload_max_wait=self.config.peer_timeout / 2)
        for image in images:
            if image.cache is not None:
                self.export(image)
        listen = self.config.peer_listen
        if listen.kind == "unix":
            self._prepare_socket(listen.path, "peer NBD")
        self.address = await self.server.listen(listen)
        LOG.info("serving image caches to peers on %s", self.address)

    def upload_stats(self) -> dict:
        """What this host sent its peers, host-wide, and the limit:
        ``rate`` bytes/s (0: none), ``bytes_sent`` (image and digest
        table reads), ``wait_s`` (replies' time waiting for the limit,
        summed), ``refused`` (reads refused: the limit's queue was
        full), ``queued_s`` (how long a reply asked now would wait)."""
        limit, server = self.upload_limit, self.server
        return {
            "rate": limit.rate if limit else 0,
            "limit": format_rate(limit.rate if limit else 0),
            "bytes_sent": server.read_bytes if server else 0,
            "wait_s": round(limit.waited, 3) if limit else 0.0,
            "refused": server.upload_refused if server else 0,
            "queued_s": round(limit.backlog(), 3) if limit else 0.0,
        }

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.membership is not None:
            await self.membership.stop()

    def export_device(self, image) -> PeerExport:
        """What peers read of ``image``: its cache, held chunks only in
        mesh mode (a peer's read never starts a fetch here), reading
        through in tree mode (children read everything from us)."""
        if image.peer_export is None or \
                image.peer_export.cache is not image.cache:
            mode = self.export_mode
            # Mesh: the chunks this host owns are fetched for the peers
            # asking (the owner computation of the image's ImageVolume).
            image.peer_export = PeerExport(
                image.cache, mode=mode,
                owns=image.volume.owns if image.volume is not None
                and mode != "through" else None)
        return image.peer_export

    @property
    def export_mode(self) -> str:
        """How peers read what this host exports: held chunks only
        (mesh), or reading through (tree: children read everything from
        their parent)."""
        return "through" if self.config.peer_mode == "tree" else "held"

    def export(self, image) -> None:
        """Export ``image``'s cache (and digest table) to peers, when the
        peer server runs."""
        if self.server is None:
            return
        self.server.add_export(
            image.name, self.export_device(image), read_only=True,
            description=f"cache of image {image.name}")
        table = image.volume.digest_table if image.volume else None
        if table is not None:
            self.server.add_export(
                table.name, table.peer_export(self.export_mode),
                read_only=True,
                description=f"manifest digests of image {image.name}")

    def unexport(self, image) -> None:
        if self.server is None:
            return
        for name in (image.name, table_name(image.name)):
            if name in self.server.exports:
                self.server.remove_export(name)
