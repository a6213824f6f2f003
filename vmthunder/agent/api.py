"""The agent's local API: JSON over HTTP on a unix socket (aiohttp).

    GET    /images              {"images": [IMAGE...]}
    POST   /images              {"name": N, "origin": URL}  201 attached,
                                200 already attached from that origin
    GET    /images/N            the image with its counters and precache
    DELETE /images/N            409 while VMs use it
    POST   /images/N/precache   {"trace": "/abs/path" | null} (body
                                optional: the whole image)  202 started,
                                200 already running; the progress
    GET    /images/N/precache   the progress of its last precache (404:
                                never started)
    GET    /vms                 {"vms": [VM...]}
    POST   /vms                 {"name": V, "image": N, "size": BYTES}
                                ("size" optional: the disk's virtual
                                size, at least the image's; absent or
                                null: the image's size)  201
                                {"name", "image", "state", "nbd": URI,
                                "size": BYTES}
    DELETE /vms/V               removes the VM's snapshot files
    POST   /images/N/pin        never evict N's cache (recorded)
    DELETE /images/N/pin        evictable again
    GET    /cache               the cap, what is held, evictions; per
                                cache: image, bytes held, last use, VMs,
                                pinned, state (agent/capacity.py)
    POST   /cache/evict         {"image": N or a cache key} or
                                {"all_unused": true}  200 {"evicted":
                                [...]}; 409 while VMs use it or pinned
    GET    /status              counters per image and per VM
    GET    /healthz             200 {"status": "ok", "checks": ...} when
                                healthy, 503 {"status": "unhealthy",
                                "problems": [what is wrong...], ...}
                                otherwise (agent/health.py); also on
                                [agent] metrics_listen, beside /metrics

Every refusal is a 4xx (5xx: the agent failed) with a body
``{"error": "what was wrong and what to do"}``, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re

from aiohttp import web

from vmthunder.agent import errors
from vmthunder.agent.errors import AgentError, InvalidRequest
from vmthunder.agent.service import Agent

LOG = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# Request bodies are flat objects; nesting deeper than this is refused
# (400) before the JSON is parsed: json.loads recurses once per level,
# and a 64 KiB body holds 32768 of them.
MAX_JSON_DEPTH = 32
_JSON_SPECIAL = re.compile(rb'[\[\]{}"\\]')
PATHS = ("/images, /images/NAME, /images/NAME/precache, /images/NAME/pin, "
         "/vms, /vms/NAME, /cache, /cache/evict, /status, /healthz")
EXAMPLES = {
    "POST /images": '{"name": "debian", "origin": "export:debian"}',
    "POST /vms": '{"name": "vm1", "image": "debian"}',
    "POST /images/NAME/precache": '{"trace": "/var/lib/boot.trace.gz"} or '
                                  '{"trace": null}',
    "POST /cache/evict": '{"image": "debian"} or {"all_unused": true}',
}


def _json(status: int, body: dict) -> web.Response:
    return web.json_response(body, status=status,
                             dumps=lambda o: json.dumps(o, indent=1))


# The HTTP status of each kind of refusal (agent/errors.py).
STATUS = {errors.InvalidRequest: 400, errors.NotFound: 404,
          errors.Conflict: 409, errors.AgentFailure: 500,
          errors.OriginUnavailable: 502}


def error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except AgentError as exc:
        status = STATUS[type(exc)]
        LOG.info("%s %s refused (%d): %s", request.method, request.path,
                 status, exc.message)
        return error(status, exc.message)
    except web.HTTPNotFound:
        return error(404, f"no such API path {request.path!r}; the API "
                          f"has {PATHS}")
    except web.HTTPMethodNotAllowed as exc:
        return error(405, f"{request.method} is not allowed on "
                          f"{request.path}; use "
                          f"{', '.join(sorted(exc.allowed_methods))}")
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body larger than {MAX_BODY} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except Exception as exc:
        LOG.exception("%s %s failed", request.method, request.path)
        return error(500, f"internal error of the agent: {exc}; see its "
                          "log")


def _json_depth(raw: bytes) -> int:
    """How deep ``raw``'s brackets nest (outside strings), counting no
    further than MAX_JSON_DEPTH + 1; linear, looking only at brackets,
    quotes and backslashes."""
    depth = deepest = 0
    in_string = False
    escape_at = -2              # where the last escaping backslash was
    for m in _JSON_SPECIAL.finditer(raw):
        pos, char = m.start(), m.group()
        if in_string:
            if escape_at == pos - 1:
                escape_at = -2          # this byte is escaped
            elif char == b"\\":
                escape_at = pos
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _loads(raw: bytes, example: str):
    """The JSON value of a request body; InvalidRequest saying what is
    wrong (not JSON, or nested too deeply)."""
    too_deep = InvalidRequest(f"request body is JSON nested more than "
                              f"{MAX_JSON_DEPTH} levels deep; send a flat "
                              f"object like {example}")
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise too_deep
    try:
        return json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON ({exc}); "
                             f"send an object like {example}") from None


async def _body(request: web.Request, fields: tuple[str, ...],
                optional: tuple[str, ...] = ()) -> dict:
    """The request's JSON object with exactly ``fields``, all strings,
    and maybe ``optional`` ones (any type: the caller checks them)."""
    example = EXAMPLES[f"{request.method} {request.path}"]
    raw = await request.read()
    body = _loads(raw, example)
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object like "
                             f"{example}, not {type(body).__name__}")
    unknown = sorted(set(body) - set(fields) - set(optional))
    if unknown:
        also = (f" (optional: {', '.join(optional)})" if optional else "")
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; "
                             f"expected {', '.join(fields)}{also}, e.g. "
                             f"{example}")
    for field in fields:
        if field not in body:
            raise InvalidRequest(f"missing field {field!r}; expected "
                                 f"{', '.join(fields)}, e.g. {example}")
        if not isinstance(body[field], str):
            raise InvalidRequest(f"field {field!r} must be a string, not "
                                 f"{type(body[field]).__name__}; e.g. "
                                 f"{example}")
    return body


async def healthz(agent: Agent) -> web.Response:
    """GET /healthz: 200 when every check passes, else 503 with the
    problems named."""
    healthy, body = await agent.health.report()
    return _json(200 if healthy else 503, body)


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)

    async def list_images(request):
        return _json(200, {"images": agent.list_images()})

    async def attach_image(request):
        body = await _body(request, ("name", "origin"))
        info, created = await agent.attach_image(body["name"],
                                                 body["origin"])
        return _json(201 if created else 200, dict(info, created=created))

    async def image_status(request):
        return _json(200, agent.image_detail(request.match_info["name"]))

    async def start_precache(request):
        example = EXAMPLES["POST /images/NAME/precache"]
        raw = await request.read()
        body = {}
        if raw.strip():
            body = _loads(raw, example)
            if not isinstance(body, dict):
                raise InvalidRequest(f"request body must be a JSON object "
                                     f"like {example}, not "
                                     f"{type(body).__name__}")
        unknown = sorted(set(body) - {"trace"})
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; "
                                 f"expected trace, e.g. {example}")
        trace = body.get("trace")
        if trace is not None and not isinstance(trace, str):
            raise InvalidRequest(f"field 'trace' must be a string or null, "
                                 f"not {type(trace).__name__}; e.g. "
                                 f"{example}")
        progress, started = await agent.precache(request.match_info["name"],
                                                 trace)
        return _json(202 if started else 200,
                     dict(progress, started=started))

    async def precache_progress(request):
        return _json(200, agent.precache_progress(
            request.match_info["name"]))

    async def detach_image(request):
        return _json(200, await agent.detach_image(
            request.match_info["name"]))

    async def list_vms(request):
        return _json(200, {"vms": agent.list_vms()})

    async def create_vm(request):
        body = await _body(request, ("name", "image"), optional=("size",))
        return _json(201, await agent.create_vm(body["name"], body["image"],
                                                body.get("size")))

    async def delete_vm(request):
        return _json(200, await agent.delete_vm(request.match_info["name"]))

    async def status(request):
        return _json(200, agent.status())

    async def cache_list(request):
        return _json(200, agent.capacity.listing())

    async def cache_evict(request):
        body = await _body(request, (), optional=("image", "all_unused"))
        image, all_unused = body.get("image"), body.get("all_unused", False)
        example = EXAMPLES["POST /cache/evict"]
        if image is not None and not isinstance(image, str):
            raise InvalidRequest(f"field 'image' must be a string, not "
                                 f"{type(image).__name__}; e.g. {example}")
        if not isinstance(all_unused, bool):
            raise InvalidRequest(f"field 'all_unused' must be true or "
                                 f"false, not {all_unused!r}; e.g. "
                                 f"{example}")
        return _json(200, await agent.capacity.evict(image, all_unused))

    async def pin(request):
        return _json(200, await agent.capacity.pin(
            request.match_info["name"], True))

    async def unpin(request):
        return _json(200, await agent.capacity.pin(
            request.match_info["name"], False))

    async def health(request):
        return await healthz(agent)

    app.router.add_get("/images", list_images)
    app.router.add_post("/images", attach_image)
    app.router.add_get("/images/{name}", image_status)
    app.router.add_delete("/images/{name}", detach_image)
    app.router.add_post("/images/{name}/precache", start_precache)
    app.router.add_get("/images/{name}/precache", precache_progress)
    app.router.add_get("/vms", list_vms)
    app.router.add_post("/vms", create_vm)
    app.router.add_delete("/vms/{name}", delete_vm)
    app.router.add_post("/images/{name}/pin", pin)
    app.router.add_delete("/images/{name}/pin", unpin)
    app.router.add_get("/cache", cache_list)
    app.router.add_post("/cache/evict", cache_evict)
    app.router.add_get("/status", status)
    app.router.add_get("/healthz", health)
    return app


class ApiServer:
    """The API on a unix socket (mode 0660)."""

    def __init__(self, agent: Agent, path: str):
        self.agent = agent
        self.path = path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        from vmthunder.agent.service import prepare_socket_path
        prepare_socket_path(self.path, "API")
        self._runner = web.AppRunner(make_app(self.agent), access_log=None,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.UnixSite(self._runner, self.path)
        await site.start()
        os.chmod(self.path, 0o660)
        LOG.info("API listening on unix:%s", self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
