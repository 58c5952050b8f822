"""Configuration loading: broken files give one precise line each; valid ones load."""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from common import cli
from common.config import load_config
from common.config.base import UnresolvedSecret
from common.errors import ConfigError
from devtools import testing

REPO = Path(__file__).resolve().parents[2]
CASES = sorted((REPO / "tests/data/config").glob("*.yaml"))
#: A Standard Webhooks secret of 32 random bytes (the shape `echo "whsec_$(openssl rand -base64 32)"` gives).
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw7dBvYsVXnjk="


def _expectations(path: Path) -> tuple[list[str], list[str]]:
    expect, reject = [], []
    for line in path.read_text().splitlines():
        if line.startswith("# expect: "):
            expect.append(line.removeprefix("# expect: "))
        elif line.startswith("# reject: "):
            reject.append(line.removeprefix("# reject: "))
    return expect, reject


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_config_gives_precise_error(case: Path, tmp_path: Path) -> None:
    # Each file is broken in one way; the error names the file and the key path.
    (tmp_path / "dkim.pem").write_bytes(testing.rsa_pem())
    (tmp_path / "garbage.pem").write_text("not a key\n")
    good_global, good_customer = tmp_path / "global.yaml", tmp_path / "customer.yaml"
    good_global.write_text("{}\n")
    good_customer.write_text("{}\n")
    target = tmp_path / case.name
    shutil.copy(case, target)
    is_global = case.name.endswith(".global.yaml")
    expect, reject = _expectations(case)
    assert expect, f"{case.name} has no '# expect:' line"

    with pytest.raises(ConfigError) as info:
        load_config(target if is_global else good_global, good_customer if is_global else target)

    problems = info.value.problems
    for wanted in expect:
        assert any(wanted in line for line in problems), f"{wanted!r} not in {problems}"
    for line in problems:
        assert line.startswith(f"{target}: "), line
    for secret in reject:
        assert all(secret not in line for line in problems)


def _example_dir(tmp_path: Path) -> Path:
    """configs/ with its /secrets/<key> files provided in ``tmp_path/secrets`` (as the pods mount them)."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    customer = tmp_path / "configs" / "inboxbooster-mailer-customer.yaml"
    text = customer.read_text()
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key in set(re.findall(r"/secrets/([-._A-Za-z0-9]+)", text)):
        if key.endswith(".pem"):
            (secrets_dir / key).write_bytes(testing.rsa_pem())
        else:
            (secrets_dir / key).write_text(
                WHSEC if key.startswith("webhook") else base64.b64encode(os.urandom(32)).decode()
            )
    customer.write_text(text.replace("/secrets/", f"{secrets_dir}/"))
    return tmp_path / "configs"


def test_example_configs_load(tmp_path: Path) -> None:
    # The commented examples in configs/ are valid for every service (keys generated here).
    directory = _example_dir(tmp_path)
    config = load_config(directory / "inboxbooster-mailer-global.yaml", directory / "inboxbooster-mailer-customer.yaml")
    assert config.global_.reliable_queue.queue_names.primary_queue == "IB-MAIL-QUEUE-P0"
    assert config.transformer.domain("EXAMPLE.com") is not None
    for service in ("receiver", "httpreceiver", "transformer", "postfixlog", "mxserver", "backdata", "redis"):
        load_config(
            directory / "inboxbooster-mailer-global.yaml",
            directory / "inboxbooster-mailer-customer.yaml",
            service=service,
        )


def test_missing_section_names_the_service(tmp_path: Path) -> None:
    customer = tmp_path / "c.yaml"
    customer.write_text("backdata: {post-url: 'http://127.0.0.1:1/'}\n")
    glob = tmp_path / "g.yaml"
    glob.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(glob, customer, service="receiver")
    assert f"{customer}: receiver: section is missing (required by receiver)" in info.value.problems
    assert f"{customer}: transformer: section is missing (required by receiver)" in info.value.problems


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent-global.yaml", tmp_path / "absent-customer.yaml")
    assert len(info.value.problems) == 2
    assert "absent-global.yaml: cannot read file: No such file or directory" in info.value.problems[0]


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ${env:…} and ${file:…} keep secrets out of the ConfigMap.
    monkeypatch.setenv("IB_TEST_PASSWORD", "s3cret")
    (tmp_path / "whsec").write_text(f"{WHSEC}\n")
    customer = tmp_path / "c.yaml"
    customer.write_text(
        "receiver:\n  bind: {inet-port: 587}\n"
        "  auth-logins: [{username: u, password: '${env:IB_TEST_PASSWORD}'}]\n"
        f"backdata: {{post-url: 'http://x/', webhook-secret: '${{file:{tmp_path}/whsec}}'}}\n"
    )
    glob = tmp_path / "g.yaml"
    glob.write_text("")
    config = load_config(glob, customer)
    assert config.customer.receiver is not None
    assert config.customer.receiver.auth_logins[0].password.get_secret_value() == "s3cret"
    assert config.customer.backdata is not None
    assert config.customer.backdata.webhook_secret is not None
    assert config.customer.backdata.webhook_secret.get_secret_value() == WHSEC
    assert "s3cret" not in repr(config)


def test_secrets_a_service_does_not_read_need_not_be_mounted(tmp_path: Path) -> None:
    # Each pod mounts only its own secrets (least privilege); the shared customer file still
    # names the others.  They stay unresolved, and reading one is an error, never a wrong value.
    (tmp_path / "webhook-secret").write_text(WHSEC + "\n")
    customer = tmp_path / "c.yaml"
    customer.write_text(
        "receiver:\n  bind: {inet-port: 587}\n"
        "  reliable-queue: {redis: {username: receiver, password: '${file:/nonexistent/redis-password-receiver}'}}\n"
        f"backdata: {{post-url: 'http://x/', webhook-secret: '${{file:{tmp_path}/webhook-secret}}'}}\n"
        "common-config: {address-secret: '${env:IB_TEST_SURELY_UNSET}'}\n"
        "redis: {}\n"
    )
    glob = tmp_path / "g.yaml"
    glob.write_text("")
    config = load_config(glob, customer, service="backdata")
    assert config.customer.backdata is not None
    assert config.customer.backdata.webhook_secret is not None
    assert config.customer.backdata.webhook_secret.get_secret_value() == WHSEC
    unresolved = config.redis_for("receiver").password
    assert isinstance(unresolved, UnresolvedSecret)
    with pytest.raises(ConfigError, match=r"receiver.reliable-queue.redis.password: \$\{file:/nonexistent/redis-pas"):
        unresolved.get_secret_value()
    assert isinstance(config.customer.common_config.address_secret, UnresolvedSecret)
    # The services that read them must find them: the Redis pod every service's password.
    with pytest.raises(ConfigError) as info:
        load_config(glob, customer, service="redis")
    assert info.value.problems == [
        f"{customer}: receiver.reliable-queue.redis.password: cannot read /nonexistent/redis-password-receiver: "
        "No such file or directory"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(glob, customer, service="transformer")
    assert f"{customer}: common-config.address-secret: environment variable IB_TEST_SURELY_UNSET is not set" in (
        info.value.problems
    )


def test_service_redis_block_adds_its_user_to_common_config(make_config) -> None:
    # common-config.redis says where Redis is; a service's own block adds its ACL user.
    config = make_config(
        {
            "common-config": {"redis": {"hostname": "redis.internal", "port": 6380}},
            "receiver": {
                "reliable-queue": {
                    "redis": {"hostname": None, "port": None, "username": "receiver", "password": "p" * 20}
                }
            },
        }
    )
    server = config.redis_for("receiver")
    assert (server.hostname, server.port, server.username) == ("redis.internal", 6380, "receiver")
    assert config.redis_for("httpreceiver").username is None  # the test config's own block has none


def test_redis_fallback_order(make_config) -> None:
    # A service's own reliable-queue.redis wins, then common-config.redis, then defaults.
    config = make_config(
        {
            "receiver": {"reliable-queue": {"redis": {"hostname": "own", "port": 1}}},
            "backdata": {"reliable-queue": None},
        }
    )
    assert config.redis_for("receiver").hostname == "own"
    assert config.redis_for("backdata").hostname == "127.0.0.1"
    config = make_config({"common-config": {"redis": None}, "backdata": {"reliable-queue": None}})
    assert config.redis_for("backdata").hostname == "redis"
    assert config.redis_for("backdata").port == 6379


def test_check_config_flag_exits_zero_or_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _example_dir(tmp_path)
    args = argparse.Namespace(
        global_config_file=directory / "inboxbooster-mailer-global.yaml",
        customer_config_file=directory / "inboxbooster-mailer-customer.yaml",
        check_config=True,
    )
    with pytest.raises(SystemExit) as ok:
        cli.load(args, "transformer")
    assert ok.value.code == 0
    assert "configuration OK" in capsys.readouterr().out
    (tmp_path / "secrets" / "dkim-example.com.pem").unlink()
    with pytest.raises(SystemExit) as bad:
        cli.load(args, "transformer")
    assert bad.value.code == 2
    assert "dkim-example.com.pem does not exist" in capsys.readouterr().err
