"""Redis backup benchmark: how long the final backup and the restore of a queue backlog take.

Fills a private redis-server (AOF, ``appendfsync always``) with ``--messages`` queue entries of
``--size`` bytes, then times the steps of ``redis-sidecar``: the final backup (``CLIENT PAUSE``
+ ``SAVE``, upload to a local S3 server -- moto on loopback, so the network part is only a lower
bound of a real object store) and the restore (download, SHA-256 and ``redis-check-rdb``,
install as AOF base) plus the time until a fresh redis-server answers PING with the data
loaded.  The pod's terminationGracePeriodSeconds must cover SAVE + upload.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import boto3
import redis
from moto.server import ThreadedMotoServer

from common.config.commonconfig import ObjectStorage
from common.queue import Queues, QueueSettings
from devtools.servers import RedisProcess, free_port, wait_until
from redis_sidecar.backup import Backups, DataLayout, restore
from redis_sidecar.storage import ObjectStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=10_240)
    args = parser.parse_args()
    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket="bench")
    settings = ObjectStorage.model_validate(
        {"bucket": "bench", "endpoint-url": endpoint, "access-key-id": "k", "secret-access-key": "s"}
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
            run(Path(tmp), ObjectStore(settings), args)
    finally:
        s3.stop()


def run(tmp: Path, store: ObjectStore, args: argparse.Namespace) -> None:
    n, size = args.messages, args.size
    print(f"redis backup benchmark: {n} queue entries of {size} bytes, AOF appendfsync always, S3 = moto on loopback")
    source = RedisProcess(tmp / "a").start()
    client = redis.Redis(port=source.port, socket_timeout=600)
    queues = Queues(client, QueueSettings(max_length=0))
    body = os.urandom(size)  # incompressible: RDB compression would flatter a repeated byte
    for i in range(0, n, 500):
        queues.enqueue_many("IB-MAIL-QUEUE-P1", [{"raw": body, "uuid": str(j)} for j in range(i, min(i + 500, n))])
    used = int(client.info("memory")["used_memory"])
    backups = Backups(client, store, DataLayout(tmp / "a"))
    start = time.perf_counter()
    backups._final_snapshot(600)
    save_s = time.perf_counter() - start
    rdb_bytes = (tmp / "a" / "dump.rdb").stat().st_size
    start = time.perf_counter()
    store.upload(tmp / "a" / "dump.rdb")
    upload_s = time.perf_counter() - start
    backups.resume_writes()
    source.stop()
    mb = rdb_bytes / 1e6
    print(f"  dataset: used_memory {used / 1e6:.0f} MB, snapshot {mb:.0f} MB")
    print(f"  final backup: SAVE {save_s:.2f} s ({mb / save_s:.0f} MB/s), ", end="")
    print(f"upload {upload_s:.2f} s ({mb / upload_s:.0f} MB/s)")
    start = time.perf_counter()
    outcome = restore(store, DataLayout(tmp / "b"))
    restore_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh = RedisProcess(tmp / "b").start(timeout_s=600)
    check = redis.Redis(port=fresh.port, socket_timeout=600)
    wait_until(lambda: check.xlen("IB-MAIL-QUEUE-P1") == n, timeout_s=600, what="data loaded")
    load_s = time.perf_counter() - start
    fresh.stop()
    print(f"  restore: download + sha256 + redis-check-rdb + install {restore_s:.2f} s; ", end="")
    print(f"Redis start with the data {load_s:.2f} s")
    print(f"  ({outcome})")


if __name__ == "__main__":
    main()
