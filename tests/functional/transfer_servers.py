"""Real HTTP servers for the transfer tests, in a thread of the test
process: aiohttp's web server (FileResponse does Range requests), a
streaming variant that does not, servers that lie, and a stand-in of
Glance's image-data API served the same way."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

from aiohttp import web


class HttpServer:
    """An aiohttp app on 127.0.0.1:<free port>, run in a thread; counts
    requests with and without a Range header."""

    def __init__(self, app: web.Application):
        self.app = app
        self.ranged = 0
        self.plain = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever,
                                       daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

        @web.middleware
        async def count(request, handler):
            if "Range" in request.headers:
                self.ranged += 1
            else:
                self.plain += 1
            return await handler(request)

        app.middlewares.append(count)

    def start(self) -> HttpServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self):
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(),
                                         self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def file_app(path: str) -> web.Application:
    """GET /image: the file, with Range support (aiohttp FileResponse)."""
    app = web.Application()

    async def image(request):
        return web.FileResponse(path)

    app.router.add_get("/image", image)
    return app


async def _stream(request, path: str, *, length: int | None = None,
                  cut_at: int | None = None, reset: bool = False,
                  pace: float = 0.0):
    """Send ``path`` whole with status 200 and no Accept-Ranges (a Range
    header is ignored); ``length`` lies about Content-Length; at
    ``cut_at`` bytes stop, closing (or with ``reset``, resetting) the
    connection."""
    size = os.path.getsize(path)
    resp = web.StreamResponse(status=200)
    resp.content_length = length if length is not None else size
    resp.content_type = "application/octet-stream"
    await resp.prepare(request)
    sent = 0
    with open(path, "rb") as f:
        while sent < size:
            block = f.read(256 * 1024)
            if cut_at is not None and sent + len(block) >= cut_at:
                await resp.write(block[:cut_at - sent])
                await asyncio.sleep(0.05)
                transport = request.transport
                if reset:
                    sock = transport.get_extra_info("socket")
                    import socket
                    import struct
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                transport.abort() if reset else transport.close()
                return resp
            await resp.write(block)
            sent += len(block)
            if pace:
                await asyncio.sleep(pace)
    if length is not None and length > size:
        # It promised more than it had, and hangs up.
        await asyncio.sleep(0.05)
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp


def stream_app(path: str, **lies) -> web.Application:
    """GET /image: one 200 stream, no ranges (``lies``: see _stream)."""
    app = web.Application()

    async def image(request):
        return await _stream(request, path, **lies)

    app.router.add_get("/image", image)
    return app


def glance_app(images: dict, *, token: str | None = None,
               wrong_hash: bool = False,
               disk_formats: dict | None = None) -> web.Application:
    """A stand-in of Glance's v2 image API, for what a download reads:
    ``GET /v2/images/ID`` (the image record: status, size, disk_format,
    checksum, os_hash_algo, os_hash_value) and ``GET /v2/images/ID/file``
    (the data, with Range support). ``images``: id -> path;
    ``disk_formats``: id -> disk_format (raw otherwise)."""
    app = web.Application()

    def record(image_id: str, path: str) -> dict:
        data = open(path, "rb").read()
        value = hashlib.sha512(data).hexdigest()
        if wrong_hash:
            value = hashlib.sha512(data + b"x").hexdigest()
        return {"id": image_id, "status": "active", "size": len(data),
                "disk_format": (disk_formats or {}).get(image_id, "raw"),
                "container_format": "bare",
                "checksum": hashlib.md5(data).hexdigest(),
                "os_hash_algo": "sha512", "os_hash_value": value}

    def check(request):
        if token is not None and request.headers.get("X-Auth-Token") \
                != token:
            raise web.HTTPUnauthorized()
        image_id = request.match_info["id"]
        if image_id not in images:
            raise web.HTTPNotFound()
        return image_id

    async def show(request):
        image_id = check(request)
        return web.json_response(record(image_id, images[image_id]))

    async def data(request):
        return web.FileResponse(images[check(request)])

    app.router.add_get("/v2/images/{id}", show)
    app.router.add_get("/v2/images/{id}/file", data)
    return app
