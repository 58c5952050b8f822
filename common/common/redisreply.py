"""Typed views of Redis replies, for every service's synchronous ``redis.Redis`` client.

Every client of the platform is made by :func:`common.queue.connect` (or ``redis.Redis`` in tools)
without ``decode_responses``, so Redis answers bytes.  redis-py's type hints cannot know that:
they describe a reply as ``bytes | str | None`` and some commands (``execute_command``) as untyped.
The helpers here say once what such a client really returns, so callers stay typed without a
``cast`` or an ``Any`` at every call site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias, cast

import redis
import redis.asyncio.client
import redis.client
from redis.typing import EncodableT, FieldT

#: One stream entry as ``XRANGE`` returns it: its id and its fields.
StreamRow: TypeAlias = tuple[bytes, dict[bytes, bytes]]


def stream_rows(reply: object) -> list[StreamRow]:
    """The rows of an ``XRANGE``/``XREVRANGE`` reply (an empty list for none)."""
    return cast("list[StreamRow]", reply) if reply else []


def strings(reply: object) -> list[bytes]:
    """The items of an ``LRANGE``/``MGET``-like reply of a bytes client."""
    return cast("list[bytes]", reply) if reply else []


def scored(reply: object) -> list[tuple[bytes, float]]:
    """The members and scores of a ``ZRANGE ... WITHSCORES`` reply."""
    return cast("list[tuple[bytes, float]]", reply) if reply else []


def text(value: bytes | str) -> str:
    """A reply item as text (bytes clients answer bytes; tests may use decoding clients)."""
    return value.decode() if isinstance(value, bytes) else value


def command(client: redis.Redis, *args: str | int | float | bytes) -> object:
    """Run a command that redis-py offers no typed method for (``CLIENT PAUSE``, ``ROLE``, ...)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped in redis-py


def fields(mapping: Mapping[bytes, bytes] | None) -> dict[bytes, bytes]:
    """A hash or stream entry's fields, empty when Redis answered none."""
    return dict(mapping) if mapping else {}


def optional_bytes(reply: object) -> bytes | None:
    """A ``GET``/``HGET`` reply of a bytes client: the value, or None when the key is missing."""
    return cast("bytes | None", reply)


#: A pipeline of either client: :class:`common.queue.Write` objects add their commands to both
#: the sync services' transactions and the asyncio receivers'.
Pipeline: TypeAlias = "redis.client.Pipeline | redis.asyncio.client.Pipeline"


def field_map(fields: Mapping[str, bytes | str]) -> dict[FieldT, EncodableT]:
    """A stream entry's or hash's fields in the mapping type redis-py's ``XADD``/``HSET`` take."""
    return {name: value for name, value in fields.items()}


def role(client: redis.Redis) -> str:
    """What ``ROLE`` says this server is: ``master``, ``slave`` or ``sentinel``.

    Raises:
        redis.exceptions.RedisError: the server did not answer.
    """
    reply = strings(command(client, "ROLE"))
    return text(reply[0]) if reply else ""
