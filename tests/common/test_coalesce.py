"""Group commit of concurrent asyncio calls (common.coalesce) and its users' guarantees.

The coalescer itself is driven with a plain async function (it is a scheduling utility); the
login guard's coalesced checks run against the real test Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import redis

from common.authguard import AsyncLoginGuard, Attempt, Refused, lockout_key
from common.coalesce import Coalescer
from common.config.base import AuthLockout, RedisServer
from common.queue import connect_async
from devtools.servers import RedisProcess, free_port


class Recorder:
    """A batch sender that records its batches and answers each item doubled."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.fail_on = fail_on

    async def send(self, key: str, items: Sequence[int]) -> list[int]:
        self.batches.append((key, list(items)))
        await asyncio.sleep(0)  # the round trip: other tasks run meanwhile
        if key == self.fail_on:
            raise ConnectionError(f"batch {key} failed")
        return [2 * item for item in items]


def test_a_lone_call_is_sent_at_once_and_concurrent_calls_share_batches() -> None:
    recorder = Recorder()

    async def main() -> tuple[int, list[int]]:
        coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
        alone = await coalescer.call("a", 1)
        together = await asyncio.gather(*(coalescer.call("a", i) for i in range(10)))
        return alone, together

    alone, together = asyncio.run(main())
    assert alone == 2 and together == [2 * i for i in range(10)]
    # The burst's calls all joined before the batch left: one round trip for ten calls.
    assert recorder.batches == [("a", [1]), ("a", list(range(10)))]


def test_batches_hold_one_key_and_a_failed_batch_fails_only_its_callers() -> None:
    recorder = Recorder(fail_on="bad")

    async def main() -> list[object]:
        coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
        calls = [coalescer.call("bad" if i % 2 else "good", i) for i in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert results[0::2] == [0, 4, 8]
    assert all(isinstance(r, ConnectionError) for r in results[1::2])
    assert all(len({key}) == 1 for key, _ in recorder.batches)
    assert sorted(i for _, items in recorder.batches for i in items) == list(range(6))


def test_a_cancelled_caller_is_left_out_of_the_next_batch() -> None:
    recorder = Recorder()

    async def main() -> int:
        coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
        first = asyncio.ensure_future(coalescer.call("a", 1))
        await asyncio.sleep(0)  # the first batch is in flight
        doomed = asyncio.ensure_future(coalescer.call("a", 2))
        kept = asyncio.ensure_future(coalescer.call("a", 3))
        await asyncio.sleep(0)
        doomed.cancel()
        await first
        return await kept

    assert asyncio.run(main()) == 6
    assert recorder.batches == [("a", [1]), ("a", [3])]


@pytest.mark.redis
def test_concurrent_guard_checks_keep_their_own_answers(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    # Twenty logins with known credentials at once (coalesced into shared pipelines), one of them
    # from a locked-out address: each caller gets its own subject's answer.
    redis_client.set(lockout_key("svc", "ip", "192.0.2.13"), 5, px=60_000)
    server = RedisServer(hostname="127.0.0.1", port=redis_server.port)
    before = _eval_calls(redis_client)

    async def main() -> list[Refused | None]:
        client = connect_async(server)
        guard = AsyncLoginGuard(client, "svc", AuthLockout(max_failures=3, lockout_seconds=60))
        try:
            return await asyncio.gather(*(guard.admit(Attempt(f"192.0.2.{i}", "app")) for i in range(20)))
        finally:
            await client.aclose()

    results = asyncio.run(main())
    assert _eval_calls(redis_client) - before == 20  # every check ran its own script
    locked = [i for i, r in enumerate(results) if r is not None]
    assert locked == [13] and results[13] is not None and results[13].reason == "locked-out"


def test_coalesced_guard_checks_fail_closed_when_redis_is_down() -> None:
    server = RedisServer(hostname="127.0.0.1", port=free_port(), socket_timeout=1.0)

    async def main() -> list[Refused | None]:
        client = connect_async(server)
        guard = AsyncLoginGuard(client, "svc", AuthLockout(max_failures=3, lockout_seconds=60))
        try:
            return await asyncio.gather(*(guard.admit(Attempt(f"192.0.2.{i}", "app")) for i in range(3)))
        finally:
            await client.aclose()

    results = asyncio.run(main())
    assert all(r is not None and r.reason == "unavailable" for r in results), results


def _eval_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))
