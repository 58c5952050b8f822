"""The Flask (WSGI) app behind gunicorn's asyncio worker: whole requests in, then a thread.

Every endpoint but ``POST /v1/mail/send`` (answered in the loop, :mod:`httpreceiver.front`,
which also reads its body with :meth:`WsgiBridge.read`) runs here.

Why: with thread workers a request holds a thread from its first byte, so 16 clients sending
one header line every 10 s took every thread of two workers and legitimate requests waited
for minutes (issue 16).  Here gunicorn's ``asgi`` worker parses every connection in its event
loop -- a client trickling its headers costs a socket and a few bytes of buffer, never a
thread -- and :class:`WsgiBridge` reads the whole body, also in the loop, before the app runs
in one of ``httpreceiver.threads`` threads.  So a thread only ever works on a complete request
(password hashing and Redis' fsync, during which the GIL is free for the others).

Limits enforced here:

* the body must arrive within ``httpreceiver.request-timeout-seconds`` of the headers, else
  ``408`` and the connection is closed;
* at most ``max-message-size + 1`` bytes are read (the app answers 413 above the limit); a
  ``Content-Length`` over it is refused by the app from the header alone, nothing is read;
* ``Expect: 100-continue`` clients are answered ``100`` only when the body is read (gunicorn).

The app sees a normal WSGI environ: ``REMOTE_ADDR`` is the peer, ``wsgi.input`` holds the body
and ``CONTENT_LENGTH`` its length (chunked bodies arrive de-chunked).
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
T = TypeVar("T")

_TIMEOUT_BODY: Final = b'{"error": "request-timeout", "message": "the request body did not arrive in time"}'


class _BodyTimeoutError(Exception):
    """The body did not arrive within the deadline."""


class _Disconnected(Exception):
    """The client went away before its body was complete."""


class WsgiBridge:
    """An ASGI application running a WSGI app on complete requests in a thread pool."""

    def __init__(self, app: WsgiApp, *, threads: int, max_body: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (``http`` and ``lifespan``; behind :mod:`httpreceiver.front`, ``http`` only)."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, self._shut_down)
            return
        if scope["type"] != "http":
            return
        body = await self.read(scope, receive, send)
        if body is None:
            return
        declared = content_length(scope)
        environ = _environ(scope, body, declared if declared is not None and declared > self.max_body else len(body))
        loop = asyncio.get_running_loop()
        status, headers, chunks = await loop.run_in_executor(self.pool, self._run, environ)
        await send_response(send, status, headers, b"".join(chunks))

    async def read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body (the limits above), or None when it was answered (408) or the client left.

        A declared ``Content-Length`` over the limit reads nothing (empty body): the endpoint
        refuses it from the header.
        """
        declared = content_length(scope)
        if declared is not None and declared > self.max_body:
            return b""
        try:
            async with asyncio.timeout(self.body_timeout_s):  # no task per request, as wait_for makes
                return await self._read_body(receive)
        except TimeoutError:
            log.info("closing a request whose body did not arrive within %gs", self.body_timeout_s)
            await send_response(
                send, 408, [(b"content-type", b"application/json"), (b"connection", b"close")], _TIMEOUT_BODY
            )
            return None
        except _Disconnected:
            return None

    async def run_blocking(self, call: Callable[[], T]) -> T:
        """Run a blocking call (a password hash) in the request threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    async def _read_body(self, receive: Receive) -> bytes:
        buffer = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            buffer += message.get("body", b"")
            if len(buffer) > self.max_body:
                # Enough to know it is too large (the app says 413); the rest stays unread and
                # gunicorn closes the connection instead of keeping it alive.
                return bytes(buffer)
            if not message.get("more_body", False):
                return bytes(buffer)

    def _run(self, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
        """Call the WSGI app (in a pool thread); its status, headers and body."""
        answer: dict[str, Any] = {}

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            answer["status"] = int(status.split(" ", 1)[0])
            answer["headers"] = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            return lambda _data: None  # the legacy write() callable; Flask never uses it

        result = self.app(environ, start_response)
        try:
            chunks = [bytes(chunk) for chunk in result]
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return answer["status"], answer["headers"], chunks

    def close(self) -> None:
        """Let the running requests finish, then stop the threads."""
        self.pool.shutdown(wait=True)

    async def _shut_down(self) -> None:
        self.close()


async def serve_lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], Awaitable[None]]) -> None:
    """The ASGI lifespan protocol: nothing to start, ``on_shutdown`` when the worker stops."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def content_length(scope: Scope) -> int | None:
    """The request's declared ``Content-Length`` (None: absent or unreadable)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _environ(scope: Scope, body: bytes, length: int) -> dict[str, Any]:
    """The WSGI environ of an ASGI HTTP scope (PEP 3333 strings: latin-1 of the raw bytes)."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(length),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_LENGTH":
            continue
        key = "CONTENT_TYPE" if name == "CONTENT_TYPE" else f"HTTP_{name}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


async def send_response(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send a whole answer."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
