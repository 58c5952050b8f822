"""Least privilege inside the cluster (issue 16, probe 5): one Redis ACL user per service.

A real redis-server runs with the ``user`` lines :mod:`common.redisacl` generates from the
configuration; each service's own code (queues, consumer groups, login guard, idempotency,
bindings, parking, Lua scripts) works as that service's user, and a key outside its patterns
or a command outside its set is refused.  The e2e stack runs every service as its own user too
and checks that Redis' ACL LOG stays empty (tests/e2e/conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

from backdata.parking import PARKED, Parking
from common import binding, keys, redisacl
from common.addressing import AddressSigner, load_secret
from common.authguard import AsyncLoginGuard, Attempt, Checked, LoginGuard
from common.config import Config, load_config
from common.config.base import AuthLockout
from common.errors import ConfigError
from common.queue import AsyncQueues, Consumer, HashWrite, Output, Queues, QueueSettings, connect, connect_async
from common.retry import RetryPolicy
from devtools import testing
from devtools.asgi import AsgiAsWsgi
from devtools.servers import RedisProcess, free_port, wait_until
from httpreceiver.app import create_api

pytestmark = pytest.mark.redis

P0, P1, EVENTS, INCOMING = "IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1", "EVENT_QUEUE", "INCOMING-TO-POSTFIX"
SETTINGS = QueueSettings(max_length=1000, max_deliveries=3, claim_idle_ms=500, batch_size=10)


@pytest.fixture(scope="module")
def acl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, RedisProcess]]:
    """The test customer file with a Redis user per service, and redis-server with those users.

    One per module (starting Redis for each of the ~50 tests cost seconds); ``acl_redis`` empties
    it and its ACL log before each test. The default user stays the (password-less, loopback) admin.
    """
    tmp_path = tmp_path_factory.mktemp("acl")
    customer = testing.merge(testing.customer_config(tmp_path, redis_port=free_port()), testing.redis_users())
    config = load_config(*testing.write_configs(tmp_path / "configs", customer))
    server = RedisProcess(tmp_path / "redis", config.redis_for("receiver").port, users=redisacl.user_lines(config))
    server.start()
    yield config, server
    server.stop()


@pytest.fixture
def acl_config(acl_stack: tuple[Config, RedisProcess]) -> Config:
    return acl_stack[0]


@pytest.fixture
def acl_redis(acl_stack: tuple[Config, RedisProcess]) -> RedisProcess:
    server = acl_stack[1]
    with redis.Redis(port=server.port) as admin:
        admin.flushall()
        admin.acl_log_reset()
    return server


def _as(config: Config, service: str) -> redis.Redis:
    return connect(config.redis_for(service), client_name=service)


def test_generated_users_match_the_configuration(acl_config: Config) -> None:
    lines = redisacl.user_lines(acl_config)
    assert [line.split()[1] for line in lines] == list(redisacl.SERVICES)
    password = acl_config.redis_for("receiver").password
    assert password is not None
    receiver = lines[0]
    assert password.get_secret_value() not in receiver  # only its SHA-256
    assert receiver.startswith("user receiver reset on #")
    assert " ~IB-MAIL-QUEUE-P0 ~IB-MAIL-QUEUE-P1 ~IB:receiver:* ~IB:trace:* resetchannels -@all " in receiver
    assert "+xadd" in receiver and "+xreadgroup" not in receiver and "+flushall" not in receiver


def test_every_service_does_its_work_as_its_own_user(acl_config: Config, acl_redis: RedisProcess) -> None:
    admin = redis.Redis(port=acl_redis.port)
    clients = {service: _as(acl_config, service) for service in redisacl.SERVICES}
    assert all(client.ping() for client in clients.values())  # each logged in as its own user

    # Receiver: the login guard (Lua) and the durable hand-off.
    async def receiver() -> None:
        client = connect_async(acl_config.redis_for("receiver"), client_name="receiver")
        guard = AsyncLoginGuard(client, "receiver", AuthLockout(max_failures=3))

        async def wrong() -> bool:
            return False

        assert await guard.attempt(Attempt("192.0.2.1", "app"), wrong) == Checked(ok=False)
        assert await guard.admit(Attempt("192.0.2.2", "app")) is None
        await AsyncQueues(client, SETTINGS).enqueue(P1, {"uuid": "u1", "raw": b"x"})
        await client.aclose()

    asyncio.run(receiver())

    # HttpReceiver: the whole app in-process as its user (guard, idempotency, enqueue).
    # HttpReceiver connects as its user from the configuration, as in production.
    api = AsgiAsWsgi(create_api(acl_config, registry=CollectorRegistry()))
    app = Client(api)
    auth = {"Authorization": "Basic " + _b64(f"{testing.RECEIVER_USER}:{testing.RECEIVER_PASSWORD}")}
    message = f"From: a@{testing.SENDER_DOMAIN}\r\nTo: b@dest.test\r\nSubject: s\r\nX-Uuid: h1\r\n\r\nx\r\n"
    sent = app.post(
        "/v1/mail/send",
        data=message.encode(),
        headers={**auth, "Content-Type": "message/rfc822", "Idempotency-Key": "k1"},
    )
    assert sent.status_code == 200, sent.get_json()
    wrong = app.post("/v1/mail/send", data=b"x", headers={"Authorization": "Basic " + _b64("app:nope")})
    assert wrong.status_code == 401

    # Transformer: consume P0/P1, hand off to INCOMING with the binding record, dead-letter, events.
    transformer = Queues(clients["transformer"], SETTINGS)
    consumer = Consumer(transformer, [P0, P1], keys.GROUP_TRANSFORMER, "t1", block_ms=100)
    consumer.setup()
    batch = _read(consumer, 2)
    record = binding.record_write("h1", ["b@dest.test"], "stream", testing.SENDER_DOMAIN, 3600)
    consumer.complete([(batch[0], [Output(INCOMING, {"uuid": "h1"}), record])])
    consumer.dead_letter([(batch[1], "test: poison", [Output(EVENTS, {"data": "{}"})])])
    assert transformer.stats(P1, keys.GROUP_TRANSFORMER).dead == 1
    assert isinstance(record, HashWrite) and admin.exists(record.key)

    # HttpReceiver again: a one-click unsubscribe resolves the record and emits once (Lua).
    signer = AddressSigner(testing.ADDRESS_SECRET.encode())
    url = f"/unsubscribe/{signer.unsubscribe_token('h1', 'b@dest.test')}"
    assert app.post(url, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert app.post(url, data={"List-Unsubscribe": "One-Click"}).status_code == 200  # once only
    api.close()

    # The address secret kept in Redis (when none is configured): first writer wins, all read it.
    no_secret = _without_address_secret(acl_config)
    signers = {s: load_secret(no_secret, clients[s]) for s in ("transformer", "httpreceiver", "mxserver")}
    assert len({signer.tag("bounce", "u", "r@x") for signer in signers.values()}) == 1

    # PostfixLog: consume INCOMING, report to EVENT_QUEUE, its own records, requeue.
    postfixlog = Queues(clients["postfixlog"], SETTINGS)
    injector = Consumer(postfixlog, [INCOMING], keys.GROUP_POSTFIXLOG, "p1", block_ms=100)
    injector.setup()
    (entry,) = _read(injector, 1)
    qid = keys.service_key("postfixlog", "qid", "ABC123")
    injector.complete([(entry, [Output(EVENTS, {"data": "{}"}), HashWrite(qid, {"uuid": "h1"}, 60)])])
    assert clients["postfixlog"].hgetall(qid) == {b"uuid": b"h1"}
    postfixlog.enqueue(INCOMING, {"uuid": "h1"}, limit=False)  # requeue on shutdown

    # MxServer: resolve a bounce through the binding record, report the event.
    found = binding.decode_record(clients["mxserver"].hgetall(keys.sent_record("h1")))
    assert [s.recipient for s in found] == ["b@dest.test"]
    Queues(clients["mxserver"], SETTINGS).enqueue(EVENTS, {"data": "{}"})

    # BackData: consume events, park one, requeue it when due (Lua), its own streams.
    backdata = Queues(clients["backdata"], SETTINGS)
    poster = Consumer(backdata, [EVENTS], keys.GROUP_BACKDATA, "b1", block_ms=100)
    poster.setup()
    events = _read(poster, 5)
    parking = Parking(backdata, EVENTS, policy=RetryPolicy(base_s=0.01, cap_s=0.01))
    parked = parking.output(events[0], "webhook 400", since=time.time(), not_after=time.time() + 60, now=0.0)
    poster.complete([(events[0], [parked]), *((e, []) for e in events[1:])])
    assert parking.requeue_due(now=time.time() + 3600) == 1
    backdata.ensure_group(keys.BOUNCE_MANAGER_STREAM, keys.GROUP_BACKDATA)
    assert backdata.length(PARKED) == 0

    assert admin.acl_log() == [], "a service's real operation was refused"
    for client in clients.values():
        client.close()
    admin.close()


#: (service, what, call) that must be refused: a key outside the service's patterns, or a
#: command outside its set.
REFUSED: list[tuple[str, str, Callable[[redis.Redis], Any]]] = [
    ("receiver", "event queue", lambda c: c.xadd(EVENTS, {"data": "forged"})),
    ("receiver", "address secret", lambda c: c.get(keys.ADDRESS_SECRET)),
    ("receiver", "reading a queue", lambda c: c.xreadgroup("transformer", "x", {P1: ">"})),
    ("receiver", "another service's keys", lambda c: c.get("IB:httpreceiver:idem:app:k1")),
    ("httpreceiver", "consuming mail", lambda c: c.xreadgroup("transformer", "x", {P1: ">"})),
    ("httpreceiver", "writing bindings", lambda c: c.hset(keys.sent_record("u"), "r@x", "1")),
    ("httpreceiver", "the Postfix queue", lambda c: c.xadd(INCOMING, {"uuid": "forged"})),
    ("transformer", "the login guard", lambda c: c.delete("IB:receiver:lockout:ip:192.0.2.1")),
    ("transformer", "configuration", lambda c: c.config_get("requirepass")),
    ("postfixlog", "the mail queues", lambda c: c.xadd(P1, {"uuid": "forged"})),
    ("postfixlog", "bindings", lambda c: c.hgetall(keys.sent_record("h1"))),
    ("mxserver", "the mail queues", lambda c: c.xadd(P0, {"uuid": "forged"})),
    ("mxserver", "consuming events", lambda c: c.xreadgroup("backdata", "x", {EVENTS: ">"})),
    ("backdata", "the mail queues", lambda c: c.xadd(P0, {"uuid": "forged"})),
    ("backdata", "address secret", lambda c: c.set(keys.ADDRESS_SECRET, "mine")),
    *[(s, "FLUSHALL", lambda c: c.flushall()) for s in redisacl.SERVICES],
    *[(s, "KEYS", lambda c: c.keys("*")) for s in redisacl.SERVICES],
    *[(s, "ACL", lambda c: c.acl_list()) for s in redisacl.SERVICES],
    *[(s, "CLIENT LIST", lambda c: c.client_list()) for s in redisacl.SERVICES],
    *[(s, "SCRIPT FLUSH", lambda c: c.script_flush()) for s in redisacl.SERVICES],
]


@pytest.mark.parametrize(("service", "what", "call"), REFUSED, ids=[f"{s}-{w}" for s, w, _ in REFUSED])
def test_a_service_is_refused_outside_its_keys_and_commands(
    acl_config: Config, acl_redis: RedisProcess, service: str, what: str, call: Callable[[redis.Redis], Any]
) -> None:
    client = _as(acl_config, service)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call(client)
    finally:
        client.close()
    # The refusal is recorded (an operator sees who tried what).
    admin = redis.Redis(port=acl_redis.port)
    try:
        (entry,) = admin.acl_log()
        assert entry["username"] == service
    finally:
        admin.close()


def test_wrong_password_or_someone_elses_user_is_refused(acl_config: Config, acl_redis: RedisProcess) -> None:
    stolen = acl_config.redis_for("receiver").model_copy(update={"username": "backdata"})
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(stolen).ping()


def test_two_services_sharing_a_user_or_a_user_without_password_is_a_config_error(tmp_path: Path) -> None:
    customer = testing.merge(testing.customer_config(tmp_path, redis_port=6379), testing.redis_users())
    customer = testing.merge(
        customer,
        {
            "backdata": {"reliable-queue": {"redis": {"username": "receiver"}}},
            "mxserver": {"reliable-queue": {"redis": {"password": None}}},
        },
    )
    config = load_config(*testing.write_configs(tmp_path / "configs", customer))
    with pytest.raises(ConfigError) as info:
        redisacl.users(config)
    assert [line.split(": ", 1)[1] for line in info.value.problems] == [
        "mxserver.reliable-queue.redis.password: the Redis user 'mxserver' needs a password",
        "backdata.reliable-queue.redis.username: 'receiver' is already the user of receiver",
    ]


@pytest.mark.slow
def test_redis_launcher_starts_redis_with_every_service_user(tmp_path: Path) -> None:
    # redis-sidecar server (the Redis pod) feeds the same user lines to redis-server on stdin.
    admin_password = "admin-" + os.urandom(12).hex()
    port = free_port()
    customer = testing.merge(testing.customer_config(tmp_path, redis_port=port), testing.redis_users())
    customer = testing.merge(
        customer,
        {
            "common-config": {"redis": {"hostname": "127.0.0.1", "port": port, "password": admin_password}},
            "redis": {
                "reliable-queue": None,
                "bind": {"inet-interface": "127.0.0.1", "inet-port": port},
                "config-file": str(Path(__file__).resolve().parents[2] / "Redis" / "redis.conf"),
                "data-directory": str(tmp_path / "data"),
            },
        },
    )
    gpath, cpath = testing.write_configs(tmp_path / "configs", customer)
    config = load_config(gpath, cpath)
    log_path = tmp_path / "launcher.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            testing.service_command("redis_sidecar", gpath, cpath, "server"), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        admin = redis.Redis(port=port, password=admin_password)
        wait_until(lambda: _answers(admin), timeout_s=20, what="the launcher's Redis")
        names = sorted(line.split()[1] for line in admin.acl_list())
        assert names == sorted(["default", *redisacl.SERVICES])
        assert _as(config, "receiver").xlen(P1) == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            _as(config, "receiver").xlen(EVENTS)
        text = log_path.read_text()
        assert "ACL users: receiver, httpreceiver, transformer, postfixlog, mxserver, backdata" in text
        for service in redisacl.SERVICES:
            secret = config.redis_for(service).password
            assert secret is not None and secret.get_secret_value() not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _read(consumer: Consumer, count: int) -> list[Any]:
    got: list[Any] = []

    def more() -> bool:
        got.extend(consumer.read())
        return len(got) >= count

    wait_until(more, timeout_s=10, what=f"{count} entries")
    return got


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _without_address_secret(config: Config) -> Config:
    common = config.customer.common_config.model_copy(update={"address_secret": None})
    customer = config.customer.model_copy(update={"common_config": common})
    return Config(config.global_, customer, config.global_path, config.customer_path)


def test_login_guard_as_its_user_is_shared_by_processes(acl_config: Config, acl_redis: RedisProcess) -> None:
    # The synchronous guard (HttpReceiver) with the same user: a second "process" sees the lockout.
    settings = AuthLockout(max_failures=2, lockout_seconds=60)
    first = LoginGuard(_as(acl_config, "httpreceiver"), "httpreceiver", settings)
    second = LoginGuard(_as(acl_config, "httpreceiver"), "httpreceiver", settings)
    for _ in range(2):
        first.attempt(Attempt("192.0.2.9", "app"), lambda: False)
    refused = second.admit(Attempt("192.0.2.9", "other"))
    assert refused is not None and refused.reason == "locked-out"


#: What each service must refuse when started with deploy/secret.example.yaml's placeholders.
WEAK = {
    "receiver": ["receiver.reliable-queue.redis: password: 9 characters; at least 16"],
    "httpreceiver": [
        "httpreceiver.reliable-queue.redis: password: 9 characters",
        "common-config.address-secret: 9 bytes; at least 32 are required",
    ],
    "transformer": ["transformer.reliable-queue.redis: password", "common-config.address-secret: 9 bytes"],
    "postfixlog": ["postfixlog.reliable-queue.redis: password: 9 characters"],
    "mxserver": ["mxserver.reliable-queue.redis: password", "common-config.address-secret"],
    "backdata": [
        "backdata.reliable-queue.redis: password",
        "backdata.webhook-secret: the key after whsec_ decodes to 6 bytes; at least 24 are required",
    ],
    "redis": ["redis.reliable-queue.redis: password: 9 characters", "receiver.reliable-queue.redis: password"],
}


@pytest.mark.parametrize("service", sorted(WEAK))
def test_the_example_secrets_are_refused_at_start(tmp_path: Path, service: str) -> None:
    # Issue 16: example secrets used to be accepted as they were (whsec_change-me is a 6-byte
    # key).  Each service now refuses them, naming the file, the key and how to make a good one.
    root = Path(__file__).resolve().parents[2]
    secret = yaml.safe_load((root / "deploy" / "secret.example.yaml").read_text())
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in secret["stringData"].items():
        (secrets_dir / key).write_bytes(testing.rsa_pem() if key.startswith("dkim-") else value.encode())
    customer = tmp_path / "inboxbooster-mailer-customer.yaml"
    text = (root / "configs" / "inboxbooster-mailer-customer.yaml").read_text()
    customer.write_text(text.replace("/secrets/", f"{secrets_dir}/"))
    with pytest.raises(ConfigError) as info:
        load_config(root / "configs" / "inboxbooster-mailer-global.yaml", customer, service=service)
    problems = info.value.problems
    for expected in WEAK[service]:
        assert any(line.startswith(f"{customer}: ") and expected in line for line in problems), (expected, problems)
    assert all("openssl rand" in line for line in problems if "at least" in line)
    assert not any("CHANGE-ME" in line for line in problems)  # never the secret itself
