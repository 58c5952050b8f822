"""Fixtures of the infrastructure tests: a local S3 server (moto) and Redis-pod configurations."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from common.config import Config
from devtools.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
REDIS_CONF = ROOT / "Redis" / "redis.conf"
PASSWORD = 'pa ss"word\\with spaces'
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on a free loopback port."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    """A boto3 client of the local S3 server."""
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
    )


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, empty bucket."""
    name = f"backups-{next(_buckets)}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def object_storage(s3_endpoint: str, bucket: str) -> dict[str, Any]:
    """``common-config.object-storage`` for the local S3 server."""
    return {
        "type": "s3",
        "bucket": bucket,
        "region": "us-east-1",
        "access-key-id": "test-key",
        "secret-access-key": "test-secret",
        "endpoint-url": s3_endpoint,
        "object-key": "mailer/dump.rdb",
    }


PodConfig = Callable[..., Config]


@pytest.fixture
def pod_config(make_config: Callable[..., Config], tmp_path: Path) -> PodConfig:
    """Factory: a configuration for one Redis pod (own port and data directory)."""
    counter = itertools.count()

    def make(storage: dict[str, Any] | None = None, *, password: str | None = PASSWORD, **redis: Any) -> Config:
        n = next(counter)
        section = {
            "reliable-queue": None,
            "bind": {"inet-interface": "127.0.0.1", "inet-port": free_port()},
            "config-file": str(REDIS_CONF),
            "data-directory": str(tmp_path / f"data-{n}"),
            **redis,
        }
        common: dict[str, Any] = {"redis": {"hostname": "127.0.0.1", "port": 6379, "password": password}}
        if password is None:
            common["redis"].pop("password")
        if storage is not None:
            common["object-storage"] = storage
        return make_config({"redis": section, "common-config": common}, service="redis")

    return make
