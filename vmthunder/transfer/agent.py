"""vmthunder://IMAGE: an image through the local vmthunder-agent.

The agent's cache is filled first (its precache: peers that hold a chunk
first, the origin last, every chunk checked against the manifest by the
agent), then read over NBD: the image's peer export when the agent has
one, else a temporary VM disk on the image, deleted afterwards. An image
not attached yet is attached when the ``origin`` option names its origin.
The agent's socket: ``?socket=PATH`` in the URI, the ``agent_socket``
option, else [agent] api_socket.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse

from vmthunder.agent.client import AgentClient, AgentError
from vmthunder.transfer.base import Source
from vmthunder.transfer.errors import SourceError
from vmthunder.transfer.sources import NbdSource, load_config

POLL_S = 0.2


class AgentSource(Source):

    def __init__(self, uri: str, options: dict):
        super().__init__(uri, options)
        parts = urllib.parse.urlsplit(uri)
        self.image = urllib.parse.unquote(parts.netloc + parts.path
                                          ).strip("/")
        if not self.image or "/" in self.image:
            raise SourceError(uri, "expected vmthunder://IMAGE")
        query = urllib.parse.parse_qs(parts.query)
        self.socket = (query.get("socket") or [None])[0] \
            or options.get("agent_socket")
        self.client: AgentClient | None = None
        self.inner: NbdSource | None = None
        self.temp_vm: str | None = None
        self.fetched = {"peers": 0, "origin": 0}

    async def _call(self, method, *args):
        try:
            return await asyncio.to_thread(method, *args)
        except AgentError as exc:
            raise SourceError(self.describe(), f"agent at "
                              f"{self.client.socket_path}: {exc}") from None

    async def open(self) -> None:
        if not self.socket:
            self.socket = load_config(self.options).agent.api_socket
        self.client = AgentClient(self.socket)
        images = {i["name"]: i for i in await self._call(self.client.images)}
        info = images.get(self.image)
        if info is None:
            origin = self.options.get("origin")
            if not origin:
                raise SourceError(self.describe(), f"image {self.image!r} "
                                  "is not attached on the agent at "
                                  f"{self.socket}; attach it (vmthunder "
                                  "image attach) or give its origin "
                                  "(origin option, vmthunder copy "
                                  "--origin)")
            info = await self._call(self.client.attach_image, self.image,
                                    origin)
        if info.get("state", "attached") != "attached" or "size" not in info:
            raise SourceError(self.describe(), f"image {self.image!r} is "
                              f"not usable on the agent: "
                              f"{info.get('error') or info.get('state')}")
        self.size = info["size"]
        self.info = info

    async def prepare(self, report) -> None:
        progress = await self._call(self.client.precache, self.image, None)
        while True:
            self.fetched = {"peers": progress.get("from_peers", 0),
                            "origin": progress.get("from_origin", 0)}
            report("precache", progress.get("bytes_fetched", 0),
                   progress.get("bytes_total", 0))
            if progress["state"] != "running":
                break
            await asyncio.sleep(POLL_S)
            progress = await self._call(self.client.precache_progress,
                                        self.image)
        if progress["state"] != "done":
            raise SourceError(self.describe(), f"the agent's precache "
                              f"{progress['state']}: {progress.get('error')}")
        uri = self.info.get("peer_nbd")
        if not uri:
            name = f"transfer-{secrets.token_hex(6)}"
            vm = await self._call(self.client.create_vm, name, self.image)
            self.temp_vm = name
            uri = vm["nbd"]
        self.inner = NbdSource(uri, self.options)
        await self.inner.open()
        if self.inner.size < self.size:
            raise SourceError(self.describe(), f"the agent's export {uri} "
                              f"has {self.inner.size} bytes, the image "
                              f"{self.size}")

    async def extents(self, offset, length):
        return await self.inner.extents(offset, length)

    async def read(self, offset, length):
        data = await self.inner.read(offset, length)
        self.bytes_read += length
        return data

    def bytes_by_source(self) -> dict:
        """What this copy read, by where the agent had it from: fetched
        from peers, from the origin, or held already."""
        peers, origin = self.fetched["peers"], self.fetched["origin"]
        return {"peers": peers, "origin": origin,
                "held": max(0, self.bytes_read - peers - origin)}

    async def close(self) -> None:
        if self.inner is not None:
            inner, self.inner = self.inner, None
            await inner.close()
        if self.temp_vm is not None:
            name, self.temp_vm = self.temp_vm, None
            try:
                await asyncio.to_thread(self.client.delete_vm, name)
            except AgentError:
                pass
