"""Redis pod: backup to S3-compatible object storage on stop, restore into a fresh Redis on start.

Everything runs for real: ``redis-sidecar server`` as a subprocess (SIGTERM as Kubernetes sends
it), redis-server from the static Redis/redis.conf, and moto's S3 server on loopback.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import keys
from common.config import Config
from common.lifecycle import Stopper
from common.queue import Consumer, Queues, QueueSettings
from devtools import testing
from devtools.servers import wait_until
from redis_sidecar import connection
from redis_sidecar.backup import BackupError, Backups, DataLayout, restore
from redis_sidecar.server import RedisLauncher
from redis_sidecar.storage import ObjectStore, StorageError

PodConfig = Callable[..., Config]
PASSWORD = 'pa ss"word\\with spaces'  # the conftest's; quoting must survive redis.conf parsing
# Each test starts real processes (the service, a Redis of its own): slow, not in ./mailer test --fast.
pytestmark = [pytest.mark.redis, pytest.mark.slow]

P0 = "IB-MAIL-QUEUE-P0"
EVENTS = "EVENT_QUEUE"


def _client(config: Config) -> redis.Redis:
    server = connection.local_server(config)
    return redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, socket_timeout=5)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


class Pod:
    """``redis-sidecar server`` in a subprocess."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            testing.service_command("redis_sidecar", config.global_path, config.customer_path, "server"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.client = _client(config)

    def wait_ready(self) -> Pod:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode}: {self.proc.communicate()[1]}")
            return _answers(self.client)

        wait_until(ready, timeout_s=15, what="redis-sidecar server")
        return self

    def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        self.client.close()
        return self.proc.returncode, err


def _fill(client: redis.Redis) -> None:
    """Queue entries in every state a restore must keep: waiting, pending, dead-lettered."""
    queues = Queues(client, QueueSettings())
    queues.enqueue_many(P0, [{"payload": f"mail-{i}"} for i in range(5)])
    queues.enqueue(EVENTS, {"event": "unsubscribe", "uuid": "abc123"})
    consumer = Consumer(queues, [P0], keys.GROUP_TRANSFORMER, "transformer-0", batch_size=2, block_ms=100)
    consumer.setup()
    first, second = consumer.read()
    consumer.dead_letter([(first, "unparsable", [])])
    assert second.fields[b"payload"] == b"mail-1"  # left pending on purpose
    client.set("IB:postfixlog:qid:ABC123", "uuid")


def _assert_filled(client: Any) -> None:
    queues = Queues(client, QueueSettings())
    stats = queues.stats(P0, keys.GROUP_TRANSFORMER)
    assert (stats.length, stats.pending, stats.dead) == (4, 1, 1)
    assert [f[b"payload"] for _, f in client.xrange(P0)] == [b"mail-1", b"mail-2", b"mail-3", b"mail-4"]
    assert queues.dead_letters(P0)[0].fields[b"dl-reason"] == b"unparsable"
    assert client.xrange(EVENTS)[0][1][b"event"] == b"unsubscribe"
    assert client.get("IB:postfixlog:qid:ABC123") == b"uuid"


def _objects(s3_client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_data_written_before_stop_is_there_after_restore_into_a_fresh_redis(
    pod_config: PodConfig, object_storage: dict[str, Any], s3_client: Any, bucket: str
) -> None:
    # The original README's promise: stop Redis, start it elsewhere with an empty disk, and the
    # queues (including in-flight and dead-lettered entries) come back from object storage.
    first = Pod(pod_config(object_storage)).wait_ready()
    _fill(first.client)
    status, log = first.terminate()
    assert status == 0, log
    assert "uploaded s3://" in log
    assert _objects(s3_client, bucket) == ["mailer/dump.rdb"]

    fresh = pod_config(object_storage)
    assert not Path(connection.section(fresh).data_directory).exists()
    second = Pod(fresh).wait_ready()
    try:
        _assert_filled(second.client)
        second.client.xadd(P0, {"payload": "after-restore"})
    finally:
        status, log = second.terminate()
    assert status == 0, log
    assert "(the object is kept)" in log
    # Never deleted after a restore (the original did, so a crash then lost everything).
    assert _objects(s3_client, bucket) == ["mailer/dump.rdb"]

    # The restored data dir is a normal AOF: a restart keeps everything, including new writes.
    third = Pod(fresh).wait_ready()
    try:
        assert third.client.xlen(P0) == 5
    finally:
        third.terminate()


def test_final_backup_pauses_writes_so_nothing_after_the_snapshot_is_acknowledged(
    pod_config: PodConfig, object_storage: dict[str, Any]
) -> None:
    # A write that arrives during the final backup is held, never answered: its sender retries.
    config = pod_config(object_storage)
    pod = Pod(config).wait_ready()
    try:
        backups = Backups(pod.client, _store(object_storage), DataLayout(connection.section(config).data_directory))
        backups.backup(final=True, timeout_s=30)
        port = connection.local_server(config).port
        late = redis.Redis(
            host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.exceptions.TimeoutError):
            late.xadd(P0, {"payload": "too-late"})
        assert pod.client.xlen(P0) == 0  # reads are still served; the write never happened
        backups.resume_writes()
        late.close()
    finally:
        pod.terminate()


def test_periodic_backup_uploads_while_running_and_is_exported(
    pod_config: PodConfig, object_storage: dict[str, Any], s3_client: Any, bucket: str
) -> None:
    config = pod_config(object_storage, **{"backup-interval-seconds": 1})
    pod = Pod(config).wait_ready()
    try:
        pod.client.set("k", "v")
        wait_until(lambda: pod.client.get("IB:redis:last-backup") is not None, timeout_s=15, what="a backup")
        assert _objects(s3_client, bucket) == ["mailer/dump.rdb"]
    finally:
        pod.terminate()


def test_manual_backup_command(
    pod_config: PodConfig, object_storage: dict[str, Any], s3_client: Any, bucket: str
) -> None:
    config = pod_config(object_storage)
    pod = Pod(config).wait_ready()
    try:
        pod.client.set("k", "v")
        result = subprocess.run(
            testing.service_command("redis_sidecar", config.global_path, config.customer_path, "backup"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"backed up to s3://{bucket}/mailer/dump.rdb (sha256 ")
        assert pod.client.set("k2", "v2")  # a manual backup does not pause writes
    finally:
        pod.terminate()
    assert _objects(s3_client, bucket) == ["mailer/dump.rdb"]


def test_local_data_wins_over_the_bucket(pod_config: PodConfig, object_storage: dict[str, Any]) -> None:
    # A restarted container with its volume keeps its (newer) AOF; the bucket is not read.
    config = pod_config(object_storage)
    pod = Pod(config).wait_ready()
    pod.client.set("generation", "1")
    assert pod.terminate()[0] == 0
    pod = Pod(config).wait_ready()
    try:
        assert pod.client.get("generation") == b"1"
    finally:
        _, log = pod.terminate()
    assert "kept the local data" in log


def test_no_backup_yet_starts_empty(pod_config: PodConfig, object_storage: dict[str, Any]) -> None:
    layout = DataLayout(connection.section(pod_config(object_storage)).data_directory)
    assert restore(_store(object_storage), layout).startswith("no local data and no backup at s3://")
    assert not layout.manifest.exists()


def test_corrupt_backup_refuses_to_start_redis(
    pod_config: PodConfig, object_storage: dict[str, Any], s3_client: Any, bucket: str
) -> None:
    # Starting empty would overwrite the (maybe repairable) backup with an empty one later.
    s3_client.put_object(Bucket=bucket, Key="mailer/dump.rdb", Body=b"<html>not a snapshot</html>")
    config = pod_config(object_storage)
    launcher = RedisLauncher(config, Stopper(), _store(object_storage))
    assert launcher.run() == 1
    assert launcher.proc is None
    assert _objects(s3_client, bucket) == ["mailer/dump.rdb"]


def test_checksum_mismatch_is_refused(
    object_storage: dict[str, Any], s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    snapshot = _snapshot(tmp_path)
    s3_client.put_object(
        Bucket=bucket, Key="mailer/dump.rdb", Body=snapshot.read_bytes(), Metadata={"sha256": "0" * 64}
    )
    store = _store(object_storage)
    with pytest.raises(StorageError, match="does not match its recorded sha256"):
        store.download(tmp_path / "x.rdb")
    with pytest.raises(BackupError, match="does not match"):
        restore(store, DataLayout(tmp_path / "data"))
    assert not (tmp_path / "data" / "appendonlydir").exists()


def test_unreachable_store_refuses_to_start(tmp_path: Path) -> None:
    import boto3
    import botocore.config

    from common.config.commonconfig import ObjectStorage
    from devtools.servers import free_port

    settings = ObjectStorage(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}")
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(BackupError, match=r"cannot look up s3://b/dump\.rdb"):
        restore(ObjectStore(settings, client), DataLayout(tmp_path / "data"))


def test_original_style_dump_rdb_object_restores(
    object_storage: dict[str, Any], s3_client: Any, bucket: str, tmp_path: Path, pod_config: PodConfig
) -> None:
    # The original uploaded a bare dump.rdb (no checksum metadata): such a bucket restores.
    s3_client.put_object(Bucket=bucket, Key="mailer/dump.rdb", Body=_snapshot(tmp_path).read_bytes())
    pod = Pod(pod_config(object_storage)).wait_ready()
    try:
        assert pod.client.get("from-the-original") == b"yes"
    finally:
        pod.terminate()


def test_local_rdb_without_aof_is_loaded(pod_config: PodConfig) -> None:
    # A volume of the original (RDB only, no AOF): Redis with appendonly yes would ignore it.
    config = pod_config(None)
    data = Path(connection.section(config).data_directory)
    data.mkdir(parents=True)
    (data / "dump.rdb").write_bytes(_snapshot(data.parent / "snap").read_bytes())
    pod = Pod(config).wait_ready()
    try:
        assert pod.client.get("from-the-original") == b"yes"
    finally:
        pod.terminate()


def _store(object_storage: dict[str, Any]) -> ObjectStore:
    from common.config.commonconfig import ObjectStorage

    return ObjectStore(ObjectStorage.model_validate(object_storage))


def _snapshot(directory: Path) -> Path:
    """An RDB file made by a real redis-server (appendonly no, as the original ran)."""
    from devtools.servers import RedisProcess

    server = RedisProcess(directory, extra={"appendonly": "no"}).start()
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        client.set("from-the-original", "yes")
        client.save()
        client.close()
    finally:
        server.stop()
    return directory / "dump.rdb"
