"""HTTP(S) sources, and Glance image data on top of them.

:class:`HttpSource` asks for the first byte with a Range header: a 206
answer means the server does ranges, and pieces are then fetched in
parallel with range requests (``If-Match`` on the first answer's strong
ETag, so an image replaced on the server mid-copy fails the copy instead
of mixing two images); a 200 answer is kept as one stream and read in
order. Every answer is checked for its length: a body cut short or a
connection reset fails the copy with what was received.

:class:`GlanceSource` reads ``glance://IMAGE_ID`` from Glance's v2 API
(``GET /v2/images/ID`` for size and ``os_hash_algo``/``os_hash_value``,
``/v2/images/ID/file`` for the bytes), the endpoint from the
``glance_endpoint`` option or ``$VMTHUNDER_GLANCE_ENDPOINT``, a token
from ``glance_token`` or ``$OS_AUTH_TOKEN``. The whole image is hashed
and checked against ``os_hash_value`` (else the legacy md5 ``checksum``)
before the copy is committed.
"""

from __future__ import annotations

import asyncio
import os
import re
import urllib.parse

import aiohttp

from vmthunder.redaction import redact_url
from vmthunder.transfer.base import MiB, Source
from vmthunder.transfer.errors import SourceError

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 60.0


def _why(exc: BaseException) -> str:
    """An aiohttp or stream error in words."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return (f"the connection ended after {len(exc.partial)} of "
                f"{exc.expected} bytes")
    if isinstance(exc, aiohttp.ClientPayloadError):
        if isinstance(exc.__cause__, ConnectionResetError) \
                or "ConnectionResetError" in str(exc):
            return "the connection was reset before the body was complete"
        return ("the server closed the connection before the body was "
                "complete")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timed out waiting for the server"
    text = str(exc) or type(exc).__name__
    return text


def parse_checksum(text: str) -> tuple[str, str]:
    """``ALGORITHM:HEX`` (sha256:..., sha512:..., md5:...)."""
    algorithm, sep, value = (text or "").partition(":")
    if not sep or not algorithm or not re.fullmatch(r"[0-9a-fA-F]+",
                                                    value):
        raise ValueError(f"checksum {text!r}: expected ALGORITHM:HEX, e.g. "
                         "sha256:9f86d0...")
    return algorithm.lower(), value.lower()


class HttpSource(Source):
    """http:// and https:// (options: ``headers``, ``checksum``
    ``ALGORITHM:HEX`` checked over the whole image, ``timeout``)."""

    request_size = 4 * MiB
    max_in_flight = 4

    def __init__(self, uri: str, options: dict):
        super().__init__(uri, options)
        self.data_url = uri
        self.session: aiohttp.ClientSession | None = None
        self.ranges = False
        self.etag: str | None = None
        self._stream: aiohttp.ClientResponse | None = None
        self._pos = 0
        self._turn: asyncio.Condition | None = None
        if options.get("checksum"):
            try:
                self.whole_digest = parse_checksum(options["checksum"])
            except ValueError as exc:
                raise SourceError(self.describe(), str(exc)) from None

    def headers(self) -> dict:
        return dict(self.options.get("headers") or {})

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            timeout = self.options.get("timeout")
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout or CONNECT_TIMEOUT,
                    sock_read=timeout or READ_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
                headers={"Accept-Encoding": "identity", **self.headers()})
        return self.session

    async def _get(self, url: str, headers: dict | None = None
                   ) -> aiohttp.ClientResponse:
        try:
            return await self._session().get(url, headers=headers or {},
                                             allow_redirects=True)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise SourceError(self.describe(), f"cannot reach the server: "
                              f"{_why(exc)}") from exc

    def _http_error(self, resp: aiohttp.ClientResponse, what: str
                    ) -> SourceError:
        return SourceError(self.describe(), f"{what}: HTTP {resp.status} "
                           f"{resp.reason or ''}".rstrip())

    async def open(self) -> None:
        await self.open_data()

    async def open_data(self) -> None:
        """Learn the size and whether ranges work, with one request."""
        resp = await self._get(self.data_url, {"Range": "bytes=0-0"})
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            resp.release()
            if not m or m.group(3) == "*":
                raise SourceError(self.describe(), "the server answered a "
                                  "range request without the image's size "
                                  "in Content-Range")
            self.size = int(m.group(3))
            self.ranges = True
            etag = resp.headers.get("ETag")
            if etag and not etag.startswith("W/"):
                self.etag = etag
        elif resp.status == 200:
            if resp.content_length is None:
                resp.release()
                raise SourceError(self.describe(), "the server sent no "
                                  "Content-Length: the image's size is "
                                  "unknown")
            self.size = resp.content_length
            self._stream = resp
            self.sequential = True
            self.max_in_flight = 2
            self._turn = asyncio.Condition()
        else:
            resp.release()
            raise self._http_error(resp, "GET")
        if self.size <= 0:
            self._close_stream()
            raise SourceError(self.describe(), "the image is empty")

    async def read(self, offset: int, length: int):
        if self._stream is not None:
            return await self._read_stream(offset, length)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        resp = await self._get(self.data_url, headers)
        try:
            if resp.status == 412:
                raise SourceError(self.describe(), "the image changed on "
                                  "the server during the copy (its ETag "
                                  f"is no longer {self.etag})")
            if resp.status != 206:
                raise self._http_error(resp, f"range {offset}-"
                                       f"{offset + length - 1}")
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset \
                    or int(m.group(2)) != offset + length - 1:
                raise SourceError(self.describe(), f"asked for bytes "
                                  f"{offset}-{offset + length - 1}, the "
                                  f"server sent Content-Range "
                                  f"{resp.headers.get('Content-Range')!r}")
            try:
                data = await resp.content.readexactly(length)
            except (aiohttp.ClientError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError, OSError) as exc:
                raise SourceError(self.describe(), f"range at offset "
                                  f"{offset}: {_why(exc)}") from exc
        finally:
            resp.release()
        self.bytes_read += length
        return data

    async def _read_stream(self, offset: int, length: int):
        async with self._turn:
            await self._turn.wait_for(lambda: self._pos == offset)
            try:
                data = await self._stream.content.readexactly(length)
            except (aiohttp.ClientError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError, OSError) as exc:
                got = self._pos + len(getattr(exc, "partial", b""))
                raise SourceError(self.describe(), f"{_why(exc)}; "
                                  f"{got} of {self.size} bytes of the "
                                  "image received") from exc
            self._pos += length
            self.bytes_read += length
            self._turn.notify_all()
        return data

    def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    async def close(self) -> None:
        self._close_stream()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


class GlanceSource(HttpSource):
    """glance://IMAGE_ID: Glance v2 image data, its hash checked."""

    def __init__(self, uri: str, options: dict):
        super().__init__(uri, options)
        parts = urllib.parse.urlsplit(uri)
        self.image_id = (parts.netloc + parts.path).strip("/")
        if not self.image_id or "/" in self.image_id:
            raise SourceError(uri, "expected glance://IMAGE_ID")
        endpoint = (options.get("glance_endpoint")
                    or os.environ.get("VMTHUNDER_GLANCE_ENDPOINT"))
        if not endpoint:
            raise SourceError(uri, "no Glance endpoint: give the "
                              "glance_endpoint option (vmthunder copy "
                              "--glance-endpoint URL) or set "
                              "$VMTHUNDER_GLANCE_ENDPOINT")
        self.endpoint = endpoint.rstrip("/")
        quoted = urllib.parse.quote(self.image_id, safe="")
        self.meta_url = f"{self.endpoint}/v2/images/{quoted}"
        self.data_url = f"{self.meta_url}/file"

    def describe(self) -> str:
        endpoint = getattr(self, "endpoint", None)
        return (f"{self.uri} (Glance at {redact_url(endpoint)})" if endpoint
                else self.uri)

    def headers(self) -> dict:
        headers = super().headers()
        token = (self.options.get("glance_token")
                 or os.environ.get("OS_AUTH_TOKEN"))
        if token:
            headers["X-Auth-Token"] = token
        return headers

    async def open(self) -> None:
        resp = await self._get(self.meta_url)
        try:
            if resp.status == 404:
                raise SourceError(self.describe(), "no such image")
            if resp.status != 200:
                raise self._http_error(resp, "GET /v2/images/ID")
            try:
                image = await resp.json(content_type=None)
            except (ValueError, aiohttp.ClientError) as exc:
                raise SourceError(self.describe(), "the image record is "
                                  f"not JSON: {exc}") from exc
        finally:
            resp.release()
        if not isinstance(image, dict):
            raise SourceError(self.describe(), "the image record is not a "
                              "JSON object")
        if image.get("status") != "active":
            raise SourceError(self.describe(), f"image status is "
                              f"{image.get('status')!r}, not 'active': no "
                              "data to copy yet")
        algo, value = image.get("os_hash_algo"), image.get("os_hash_value")
        if self.whole_digest is None:
            if algo and value:
                self.whole_digest = (str(algo).lower(), str(value).lower())
            elif image.get("checksum"):
                self.whole_digest = ("md5", str(image["checksum"]).lower())
        size = image.get("size")
        await self.open_data()
        if isinstance(size, int) and size != self.size:
            raise SourceError(self.describe(), f"the image record says "
                              f"{size} bytes, its data has {self.size}")
