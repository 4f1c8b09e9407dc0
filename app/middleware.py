"""Pure ASGI middleware: request metrics, upload size limits, a one-line startup failure."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class RequestMetricsMiddleware:
    """Count requests by route and status, and time them.

    The label is the path when it is one of ``routes`` (all static), else ``unmatched``, so
    that scanners cannot grow the label set; it also names requests refused before routing.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Collection[str]):
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``limits[path]`` bytes with a JSON 413.

    A declared ``Content-Length`` over the limit is refused before any of the body is read;
    a body without one (chunked) is cut off as soon as the running count passes the limit, and
    whatever the app made of the truncated body is replaced by the 413.
    """

    def __init__(
        self, app: ASGIApp, limits: dict[str, int], on_reject: Callable[[], None] | None = None
    ):
        self.app = app
        self.limits = limits
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body we cut off; the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):  # unless the app caught it
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not started:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        if self.on_reject is not None:
            self.on_reject()
        response = JSONResponse(
            {"detail": f"request body is over the limit of {limit} bytes"},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class OneLineStartupFailure:
    """Report a lifespan ``StartupError`` as its one-line message instead of a traceback.

    Starlette sends the server the formatted traceback of whatever the lifespan raised; the
    lifespan stores the operator's line in ``app.state.startup_error`` and this swaps it in.
    """

    def __init__(self, app: ASGIApp, startup_error: Callable[[], str | None]):
        self.app = app
        self.startup_error = startup_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            line = self.startup_error()
            if message["type"] == "lifespan.startup.failed" and line:
                message = {**message, "message": line}
            await send(message)

        try:
            await self.app(scope, receive, send_one_line)
        except Exception:
            if self.startup_error() is None:
                raise
