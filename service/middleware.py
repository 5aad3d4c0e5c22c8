"""What wraps every route: the body size limit, request metrics, and errors in the service's shape
(``{"detail": ..., "errors": [...]}``, a 4xx that says what to fix, a 503 for a store out of reach)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import redis
from fastapi import FastAPI, HTTPException, Request, Response, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import LATENCY, REJECTED, REQUESTS
from service.validation import SECTIONS, InputError, invalid

MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the uploaded file


class BodyLimit:
    """413 with a reason for request bodies over the limit: by Content-Length before reading, else while reading.

    A pure ASGI middleware: the body is never buffered here. FastAPI passes an HTTPException
    raised while it reads the body through to its handler, which answers with the JSON detail.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.detail = (f"the request body is over {limit} bytes "
                       f"(RIB_MAX_UPLOAD_BYTES + {MULTIPART_OVERHEAD} for the form); send a smaller file")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited, send)


async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count every request by route and status, and time it."""
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    if 400 <= response.status_code < 500 and response.status_code not in (401, 404):
        REJECTED.labels(str(response.status_code)).inc()
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


async def input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    """Only a Redis that cannot be reached is a 503; any other Redis error is a bug, and a 500."""
    return JSONResponse({"detail": f"the job store is unavailable ({type(exc).__name__}); retry later"},
                        status_code=503)


def _expected_body(request: Request) -> str | None:
    """The media type the matched route reads its body as, if it has a body."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None)
    if body is None:
        return None
    return "multipart/form-data" if isinstance(body.field_info, params.Form) else "application/json"


def _section(locs: list[tuple[str, ...]]) -> str | None:
    """The stage settings (``rib``, ``refine``, ...) that every error lies inside, if one."""
    found = {loc[1] if len(loc) > 2 and loc[0] == "body" else None for loc in locs}
    section = found.pop() if len(found) == 1 else None
    return section if section in SECTIONS else None


async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks answer in the service's shape, and name a body of the wrong media type.
    Errors all inside one stage's settings answer as when the service checks them merged into its
    defaults (:func:`service.validation.invalid`): fields relative to the settings."""
    pairs = [(tuple(map(str, err["loc"])), str(err["msg"])) for err in exc.errors()]
    if section := _section([loc for loc, _ in pairs]):
        return await input_error(request, invalid(SECTIONS[section], [(".".join(loc[2:]), m) for loc, m in pairs]))
    errors = [{"field": ".".join(loc[1:]) or loc[0], "error": msg} for loc, msg in pairs]
    expected = _expected_body(request)
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if expected and sent != expected and any(err["loc"][0] == "body" for err in exc.errors()):
        detail = f"this endpoint reads a {expected} body; the request sent {sent or 'no Content-Type'}"
    else:
        detail = "invalid request: " + "; ".join(f"{e['field']}: {e['error']}" for e in errors[:5])
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def install(app: FastAPI, max_upload_bytes: int) -> None:
    """The body limit (before any parsing), request metrics and the error handlers."""
    app.add_middleware(BodyLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD)
    app.middleware("http")(observe)
    handlers: list[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]]] = [
        (InputError, input_error), (redis.ConnectionError, redis_down), (redis.TimeoutError, redis_down),
        (RequestValidationError, request_invalid)]
    for exc, handler in handlers:
        app.add_exception_handler(exc, handler)
