"""The classifier worker pool: fairness between clients, time budget, worker replacement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mxserver.pool import ClassifierPool, Overrun, _FairQueue
from tests.mxserver.conftest import SETTINGS


def test_a_freed_worker_goes_to_the_least_recently_served_client() -> None:
    # "bomber" queued three mails before "good" arrived: "good" is served next, not fourth.
    async def scenario() -> list[str]:
        queue = _FairQueue()
        slot: Any = object()
        queue.put(slot)
        served: list[str] = []
        first = await queue.get("bomber")  # the only worker: busy from now on

        async def wait(client: str) -> None:
            got = await queue.get(client)
            served.append(client)
            queue.put(got)

        tasks = [asyncio.create_task(wait("bomber")) for _ in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(wait("good")))
        await asyncio.sleep(0)
        queue.put(first)
        await asyncio.gather(*tasks)
        assert first is slot and queue.free == [slot]
        return served

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ["good", "bomber", "bomber", "bomber"]


def test_a_cancelled_waiter_does_not_lose_a_worker() -> None:
    async def scenario() -> int:
        queue = _FairQueue()
        queue.put(object())  # type: ignore[arg-type]
        held = await queue.get("a")
        waiter = asyncio.create_task(queue.get("b"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        queue.put(held)
        return len(queue.free)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 1


@pytest.mark.slow
def test_overrun_replaces_the_worker_and_the_pool_goes_on() -> None:
    slow = b"From: MAILER-DAEMON@x.example\r\nSubject: Undelivered Mail\r\n\r\n" + b"550-5.1.1 x@y.z\r\n" * 200_000

    async def scenario() -> tuple[str, int]:
        pool = ClassifierPool(SETTINGS, 1, 0.05)
        await pool.start()
        try:
            with pytest.raises(Overrun):
                await pool.analyse(["postmaster@bounces.example.test"], slow, "127.0.0.9")
            pool.timeout_s = 30
            analysis = await pool.analyse(["postmaster@bounces.example.test"], b"Subject: hi\r\n\r\nhello\r\n")
            return analysis.kind, pool.replaced
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == ("unclassified", 1)
