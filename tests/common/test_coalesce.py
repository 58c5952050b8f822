"""Group commit of concurrent asyncio calls (common.coalesce) and its users' guarantees.

The coalescer itself is driven with a plain async function (it is a scheduling utility); the
login guard's coalesced checks run against the real test Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from common.authguard import AsyncLoginGuard, Attempt, Refused, account_id, failures_key, flight_key, lockout_key
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
    # The batches' MGETs cleared the others; only the locked-out address ran the check script,
    # which says for how long.
    assert _eval_calls(redis_client) - before == 1
    locked = [i for i, r in enumerate(results) if r is not None]
    assert locked == [13] and results[13] is not None and results[13].reason == "locked-out"
    assert 55 < results[13].retry_after_s <= 60


@pytest.mark.redis
@pytest.mark.parametrize("grant_mget", [True, False])
def test_batched_guard_checks_answer_as_the_check_script_does(
    redis_server: RedisProcess, redis_client: redis.Redis, grant_mget: bool
) -> None:
    # Every subject state the check script knows, in one batch: the MGET shortcut admits exactly
    # the attempts the script admits, and the others get the script's own answer.  Without the
    # MGET grant (a Redis user from before it was used) every check falls back to the script.
    cases = {
        "192.0.2.1": (None, "app"),  # nothing recorded
        "192.0.2.2": ("locked-out", "app"),  # address locked out
        "192.0.2.3": ("busy", "app"),  # its budget spent on failures
        "192.0.2.4": ("busy", "app"),  # 2 failed + 1 being checked
        "192.0.2.5": (None, "app"),  # one failure left
        "192.0.2.6": ("locked-out", "locked"),  # the account locked out
        "192.0.2.7": ("unavailable", "app"),  # a counter that is no number: the script fails
    }
    redis_client.set(lockout_key("svc", "ip", "192.0.2.2"), 3, px=30_000)
    redis_client.set(failures_key("svc", "ip", "192.0.2.3"), 3, px=40_000)
    redis_client.set(failures_key("svc", "ip", "192.0.2.4"), 2)
    redis_client.set(flight_key("svc", "ip", "192.0.2.4"), 1)
    redis_client.set(failures_key("svc", "ip", "192.0.2.5"), 2)
    redis_client.set(lockout_key("svc", "user", account_id("locked")), 3, px=20_000)
    redis_client.set(failures_key("svc", "ip", "192.0.2.7"), "junk")
    attempts = [Attempt(ip, account) for ip, (_, account) in cases.items()]
    user = f"guard-{grant_mget}"
    commands = ["+@all"] if grant_mget else ["+@all", "-mget"]
    redis_client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=commands)
    server = RedisServer(hostname="127.0.0.1", port=redis_server.port, username=user, password=SecretStr("pw"))
    before = _eval_calls(redis_client)

    async def main() -> tuple[list[Refused | None], list[Refused | None]]:
        client = connect_async(server)
        guard = AsyncLoginGuard(client, "svc", AuthLockout(max_failures=3, lockout_seconds=60))
        try:
            batched = await asyncio.gather(*(guard.admit(a) for a in attempts))
            scripted = [await _scripted(guard, client, a) for a in attempts]
            return list(batched), scripted
        finally:
            await client.aclose()

    batched, scripted = asyncio.run(main())
    reasons = [r.reason if r is not None else None for r in batched]
    assert reasons == [reason for reason, _ in cases.values()]
    assert reasons == [r.reason if r is not None else None for r in scripted]
    locked = batched[1]
    assert locked is not None and 25 < locked.retry_after_s <= 30  # the lockout's own time left
    # With MGET: one script call per unclear attempt (5 of 7) in the batch, then the 7 of the
    # comparison; without, a script call for each.
    assert _eval_calls(redis_client) - before == (5 if grant_mget else 7) + 7


async def _scripted(guard: AsyncLoginGuard, client: Any, attempt: Attempt) -> Refused | None:
    """The check script's own answer for ``attempt`` (a failing script: unavailable)."""
    try:
        return guard._state(await client.eval(*guard._check_args(attempt)), attempt)
    except redis.exceptions.ResponseError as exc:
        return guard._unavailable(exc)


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
