"""HttpReceiver as deployed: the console script (gunicorn master + 2 workers) on loopback ports,
real HTTP clients (requests, raw sockets) and a real redis-server."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import redis
import requests
import yaml

from common import binding
from common.addressing import AddressSigner
from devtools.servers import RedisProcess, wait_until
from tests.httpreceiver.conftest import EVENTS, P0, P1, Gunicorn, basic, entries, headers, message

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SIGNER = AddressSigner(b"test-address-secret-0123456789abcdef")


def test_every_answer_of_the_send_endpoint(gunicorn: Gunicorn, redis_client: redis.Redis) -> None:
    raw = message("e2e1", priority="0", body="Grüße\r\n".encode())
    ok = gunicorn.post(raw)
    assert ok.status_code == 200
    assert ok.json() == {"uuid": "e2e1", "queue": P0}
    [fields] = entries(redis_client, P0)
    assert fields[b"raw"] == raw  # byte for byte

    cases = [
        (gunicorn.post(raw, headers={"Content-Type": "message/rfc822"}), 401, "unauthorized"),
        (gunicorn.post(raw, headers={**headers(), "Authorization": basic(password="no")}), 401, "unauthorized"),
        (gunicorn.post(raw, headers={**headers(), "Content-Type": "text/plain"}), 415, "content-type"),
        (gunicorn.post(message("bad!")), 400, "x-uuid-malformed"),
        (gunicorn.post(raw.replace(b"example.test", b"elsewhere.test")), 400, "from-domain"),
    ]
    for resp, status, rule in cases:
        assert resp.status_code == status, resp.text
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.json()["error"] == rule
        assert resp.json()["message"]
    assert cases[0][0].headers["WWW-Authenticate"].startswith("Basic ")
    assert redis_client.xlen(P0) + redis_client.xlen(P1) == 1


def test_over_the_size_limit_is_413(tmp_path: Path, redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    server = Gunicorn(tmp_path, redis_server.port, {"max-message-size": 4096}).start()
    try:
        # A body a little over the limit: the client gets the JSON answer.
        resp = server.post(message(body=b"x" * 5000))
        assert resp.status_code == 413
        assert resp.json()["error"] == "too-large"
        # A chunked upload (no Content-Length) over the limit.
        chunks = iter([message(body=b""), b"y" * 3000, b"y" * 3000])
        resp = server.post(chunks)  # type: ignore[arg-type]
        assert resp.status_code == 413
        # A huge Content-Length is refused from the headers: the body is never sent.
        with socket.create_connection(("127.0.0.1", server.api_port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/mail/send HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
                + f"Authorization: {basic()}\r\nContent-Length: 1000000000\r\n\r\n".encode()
            )
            status, body = _response(sock)
        assert status == 413
        assert json.loads(body)["error"] == "too-large"
        # A chunked body just under the limit is accepted whole.
        raw = message("chunked1", body=b"z" * 3000)
        resp = server.post(iter([raw[:1000], raw[1000:]]))  # type: ignore[arg-type]
        assert resp.status_code == 200
        [fields] = entries(redis_client, P1)
        assert fields[b"raw"] == raw + b"\r\n"  # the intake rule ends every message with CRLF
    finally:
        assert server.stop() == 0


def test_idempotency_key_over_http(gunicorn: Gunicorn, redis_client: redis.Redis) -> None:
    raw = message("idem1")
    first = gunicorn.post(raw, headers=headers(Idempotency_Key="order-17"))
    second = gunicorn.post(raw, headers=headers(Idempotency_Key="order-17"))
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert redis_client.xlen(P1) == 1


def test_concurrent_duplicates_queue_once(gunicorn: Gunicorn, redis_client: redis.Redis) -> None:
    # Both workers race with the same key: exactly one entry; the others get 200 (replay) or 409.
    raw = message("race1")
    statuses: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        resp = gunicorn.post(raw, headers=headers(Idempotency_Key="race"))
        with lock:
            statuses.append(resp.status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert redis_client.xlen(P1) == 1
    assert 200 in statuses
    assert set(statuses) <= {200, 409}


def test_redis_down_gives_503_then_accepts_after_restart(tmp_path: Path) -> None:
    own = RedisProcess(tmp_path / "redis").start()
    server = Gunicorn(tmp_path, own.port).start()
    try:
        assert server.post(message("before")).status_code == 200
        own.stop()
        down = server.post(message("during"))
        assert down.status_code == 503
        # The login guard asks Redis first and fails closed (no password is checked without it).
        assert down.json()["error"] == "auth-unavailable"
        assert int(down.headers["Retry-After"]) > 0
        assert requests.get(server.metrics_url + "/readyz", timeout=5).status_code == 503
        own.start()
        wait_until(lambda: server.post(message("after")).status_code == 200, 10, what="a 200 after restart")
        client = redis.Redis(port=own.port)
        uuids = [fields[b"uuid"] for fields in entries(client, P1)]
        assert uuids[0] == b"before"  # kept in the AOF across the restart
        assert b"after" in uuids and b"during" not in uuids
        assert requests.get(server.metrics_url + "/readyz", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0
        own.stop()


def test_one_click_unsubscribe_over_http(gunicorn: Gunicorn, redis_client: redis.Redis) -> None:
    pipe = redis_client.pipeline(transaction=True)
    binding.record_write("unsub42", ["jo@dest.test"], None, "example.test", 3600).write(pipe)
    pipe.execute()
    url = f"{gunicorn.url}/unsubscribe/{SIGNER.unsubscribe_token('unsub42', 'jo@dest.test')}"
    page = requests.get(url, timeout=5)
    assert page.status_code == 200
    assert '<form method="post">' in page.text
    resp = requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=5, allow_redirects=False)
    assert resp.status_code == 200
    [fields] = entries(redis_client, EVENTS)
    event = json.loads(fields[b"data"])
    assert (event["event"], event["uuid"], event["source"]) == ("unsubscribe", "unsub42", "one-click")
    assert event["recipient"] == "jo@dest.test"
    forged = f"{gunicorn.url}/unsubscribe/{AddressSigner(b'x').unsubscribe_token('unsub42', 'jo@dest.test')}"
    assert requests.post(forged, data={"List-Unsubscribe": "One-Click"}, timeout=5).status_code == 404
    assert redis_client.xlen(EVENTS) == 1


def test_metrics_and_health_only_on_the_metrics_port(gunicorn: Gunicorn, redis_client: redis.Redis) -> None:
    before = _metric(gunicorn, "nbr_emails_enqueued_total")
    for i in range(6):  # spread over both workers: the master serves their sum
        assert gunicorn.post(message(f"m{i}")).status_code == 200
    assert gunicorn.post(message("bad!")).status_code == 400
    assert _metric(gunicorn, "nbr_emails_enqueued_total") == before + 6
    assert _metric(gunicorn, "nbr_recipients_total") >= 6
    assert _metric(gunicorn, "nbr_dropped_emails_total") >= 1
    text = requests.get(gunicorn.metrics_url + "/metrics", timeout=5).text
    assert 'mailer_httpreceiver_requests_total{endpoint="send",status="200"}' in text
    assert requests.get(gunicorn.metrics_url + "/healthz", timeout=5).status_code == 200
    assert requests.get(gunicorn.metrics_url + "/readyz", timeout=5).status_code == 200
    for path in ("/metrics", "/healthz", "/readyz"):
        assert requests.get(gunicorn.url + path, timeout=5).status_code == 404
    assert requests.post(gunicorn.metrics_url + "/v1/mail/send", data=message(), timeout=5).status_code in (
        404,
        501,
    )


def _metric(server: Gunicorn, name: str) -> float:
    for line in requests.get(server.metrics_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_finishes_the_request_in_progress(tmp_path: Path, redis_server: RedisProcess) -> None:
    # A client is half-way through its upload when SIGTERM arrives: it still gets its 200, and
    # the process exits 0 once the request is done.
    server = Gunicorn(tmp_path, redis_server.port).start()
    raw = message("graceful1", body=b"x" * 5000)
    try:
        with socket.create_connection(("127.0.0.1", server.api_port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/mail/send HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
                + f"Authorization: {basic()}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
                + raw[:1000]
            )
            # In progress = accepted by a worker (the listening socket's accept queue is empty
            # again); connections still waiting in the kernel's queue are reset when it closes.
            wait_until(lambda: _accept_queue(server.api_port) == 0, 10, what="a worker to accept the connection")
            assert server.proc is not None
            server.proc.terminate()
            wait_until(lambda: "Handling signal: term" in server.log(), 10, what="SIGTERM handled")
            sock.sendall(raw[1000:])
            status, body = _response(sock)
        assert status == 200, body
        assert server.proc.wait(25) == 0
        assert "queued uuid=graceful1" in server.log()
    finally:
        server.stop()


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP response from a raw socket (status, body)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.read()


def _accept_queue(port: int) -> int:
    """Connections waiting to be accepted on a listening loopback socket (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return int(queues.split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def test_check_config(tmp_path: Path, redis_server: RedisProcess) -> None:
    server = Gunicorn(tmp_path, redis_server.port)
    ok = subprocess.run(server.command("--check-config"), capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    customer = yaml.safe_load(server.customer_path.read_text())
    customer["httpreceiver"]["bind"]["inet-port-metrics"] = customer["httpreceiver"]["bind"]["inet-port"]
    customer["httpreceiver"]["bogus-key"] = 1
    server.customer_path.write_text(yaml.safe_dump(customer))
    bad = subprocess.run(server.command("--check-config"), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert f"{server.customer_path}: httpreceiver.bogus-key: unknown key" in bad.stderr
    assert f"{server.customer_path}: httpreceiver.bind: inet-port and inet-port-metrics must differ" in bad.stderr


def test_metrics_port_in_use_is_a_clear_error(tmp_path: Path, redis_server: RedisProcess) -> None:
    server = Gunicorn(tmp_path, redis_server.port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.metrics_port))
        busy.listen()
        result = subprocess.run(server.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "inet-port-metrics" in result.stderr
    assert "Traceback" not in result.stderr
