"""The backup's home: one object in an S3-compatible bucket (``common-config.object-storage``).

Uploads carry the snapshot's SHA-256 in the object's metadata and downloads verify it, so a
truncated or altered object is refused instead of being loaded.  The object is never deleted:
the original deleted it after restoring, so a crash after a restore lost everything.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from common.config.commonconfig import ObjectStorage

log = logging.getLogger(__name__)

SHA256_KEY = "sha256"


class StorageError(Exception):
    """The object store failed (unreachable, refused, or the object is corrupt)."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore:
    """Upload and download the backup object."""

    def __init__(self, settings: ObjectStorage, client: Any | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.key = settings.object_key
        self.client = client or boto3.client(
            "s3",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
            aws_secret_access_key=(
                settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
            ),
            config=botocore.config.Config(
                retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60
            ),
        )

    @property
    def where(self) -> str:
        """``s3://bucket/key`` for log lines."""
        return f"s3://{self.bucket}/{self.key}"

    def upload(self, path: Path) -> str:
        """Upload ``path`` as the backup object; returns its SHA-256.

        Raises:
            StorageError: the upload failed.
        """
        digest = sha256_of(path)
        extra: dict[str, Any] = {
            "Metadata": {SHA256_KEY: digest, "created": str(int(time.time())), "source": "redis-sidecar"}
        }
        if self.settings.server_side_encryption:
            extra["ServerSideEncryption"] = self.settings.server_side_encryption
        if self.settings.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.settings.sse_kms_key_id
        started = time.monotonic()
        try:
            self.client.upload_file(str(path), self.bucket, self.key, ExtraArgs=extra)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageError(f"upload to {self.where} failed: {exc}") from exc
        log.info(
            "uploaded %s (%d bytes, sha256 %s) in %.1fs",
            self.where,
            path.stat().st_size,
            digest[:12],
            time.monotonic() - started,
        )
        return digest

    def download(self, dest: Path) -> bool:
        """Download the backup to ``dest``; False when there is no backup object.

        Raises:
            StorageError: the store failed or the object does not match its recorded SHA-256.
        """
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                return False
            raise StorageError(f"cannot look up {self.where}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(f"cannot look up {self.where}: {exc}") from exc
        try:
            self.client.download_file(self.bucket, self.key, str(dest))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageError(f"download of {self.where} failed: {exc}") from exc
        expected = (head.get("Metadata") or {}).get(SHA256_KEY)
        if expected is not None and sha256_of(dest) != expected:
            dest.unlink(missing_ok=True)
            raise StorageError(f"{self.where} does not match its recorded sha256 {expected[:12]}…")
        log.info("downloaded %s (%d bytes)", self.where, dest.stat().st_size)
        return True

    def check(self) -> str | None:
        """None when the bucket answers, else what is wrong (for ``redis-sidecar check``)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            return f"bucket {self.bucket} is not reachable: {exc}"
        return None


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    meta = exc.response.get("ResponseMetadata") or {}
    code = meta.get("HTTPStatusCode")
    if code is None and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
        return 404
    return int(code) if code is not None else None
