"""Run an ASGI application under a WSGI test client (tests only).

:class:`AsgiAsWsgi` makes HttpReceiver's worker application (:mod:`httpreceiver.front`) a WSGI
callable, so that werkzeug's test client and schemathesis' ``from_wsgi`` drive the whole stack
the gunicorn worker runs -- the send endpoint in the event loop, the others through the bridge
and Flask -- in-process.  Every request runs on one private event loop kept for the adapter's
life (the application's asyncio Redis clients stay bound to it): :meth:`close` ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any

AsgiApp = Callable[[MutableMapping[str, Any], Any, Any], Coroutine[Any, Any, None]]


class AsgiAsWsgi:
    """A WSGI callable running ``app`` one request at a time."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app
        self.runner = asyncio.Runner()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve one WSGI request through the ASGI application."""
        body = environ["wsgi.input"].read()
        messages: list[MutableMapping[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            messages.append(message)

        self.runner.run(self.app(scope_of(environ), receive, send))
        start = messages[0]
        status = int(start["status"])
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [(name.decode("latin-1"), value.decode("latin-1")) for name, value in start["headers"]],
        )
        return [b"".join(message.get("body", b"") for message in messages[1:])]

    def close(self) -> None:
        """Shut the application down (ASGI lifespan) and end the event loop."""

        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.shutdown"}

        async def send(_message: MutableMapping[str, Any]) -> None:
            return None

        self.runner.run(self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        self.runner.close()


def scope_of(environ: dict[str, Any]) -> dict[str, Any]:
    """The ASGI HTTP scope of a WSGI environ."""
    headers: list[tuple[bytes, bytes]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").lower().encode("latin-1"), _wire(value)))
    for key, name in (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length")):
        if environ.get(key):
            headers.append((name, _wire(environ[key])))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": environ["REQUEST_METHOD"],
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "path": environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace"),
        "raw_path": environ.get("PATH_INFO", "/").encode("latin-1"),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "root_path": "",
        "headers": headers,
        "client": (environ.get("REMOTE_ADDR", "127.0.0.1"), int(environ.get("REMOTE_PORT") or 0)),
        "server": (environ.get("SERVER_NAME", "localhost"), int(environ.get("SERVER_PORT") or 80)),
    }


def _wire(value: str) -> bytes:
    """A header value's bytes: WSGI strings are latin-1; a test's other text goes out as UTF-8, as a client sends it."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")
