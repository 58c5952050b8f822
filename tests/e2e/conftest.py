"""One running local stack (real Redis, real Postfix, all seven services) for the e2e tests.

Every event the stack's webhook receives is held to the published event schema
(``common/common/contracts/events.schema.json``): a test during which a non-conforming event
arrived fails, naming the event and the problem, and the stack's teardown checks once more for
events that arrived between tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.stack import Stack, free_ports


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole platform on free loopback ports; the sink plays the internet."""
    run_dir: Path = tmp_path_factory.mktemp("stack")
    # Short Postfix retry timers so deferred mail is retried while the tests watch.  The fuzz
    # tests send wrong credentials on purpose: no login lockout, or 127.0.0.1 would be locked
    # out for the other tests (the lockout has tests of its own in tests/receiver, httpreceiver).
    no_lockout = {"auth-lockout": {"lockout-seconds": 0}}
    override = {
        "receiver": no_lockout,
        "httpreceiver": no_lockout,
        "postfixlog": {
            "string-replacer": {
                "main-cf": {
                    "queue_run_delay": "2s",
                    "minimal_backoff_time": "2s",
                    "maximal_backoff_time": "4s",
                }
            }
        },
    }
    stack = Stack(run_dir, ports=free_ports(), customer_override=override)
    stack.start()
    try:
        yield stack
        # Every service ran as its own Redis ACL user (common.redisacl): none was ever refused.
        admin = redis.Redis(port=stack.ports["redis"])
        try:
            denied = admin.acl_log()
        finally:
            admin.close()
        assert denied == [], f"Redis refused commands of a service user: {denied}"
        violations = stack.webhook.violations
        assert not violations, f"events that do not conform to the event schema: {violations}"
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def events_conform(stack: Stack) -> Iterator[None]:
    """Fail the test when an event that does not conform to the event schema arrives during it."""
    before = len(stack.webhook.violations)
    yield
    new = stack.webhook.violations[before:]
    assert not new, "events that do not conform to the event schema: " + "; ".join(
        f"{v.event.get('event')} {v.event.get('uuid')}: {', '.join(v.problems)}" for v in new
    )
