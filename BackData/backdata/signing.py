"""Request signatures: Standard Webhooks for the customer, an HMAC query hash for the bounce manager.

Standard Webhooks (https://www.standardwebhooks.com/): ``webhook-id`` (stable per batch, so the
customer can de-duplicate a retried POST), ``webhook-timestamp`` (Unix seconds of this attempt)
and ``webhook-signature`` = ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``.  During a
secret rotation the request carries one signature per secret, separated by a space, so the
receiver accepts it with either the old or the new secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from common.config.backdata import webhook_key
from common.events import make_event_id


def batch_id(event_ids: Sequence[str]) -> str:
    """``webhook-id`` of a batch: the same events give the same id on every retry."""
    return "msg_" + make_event_id("backdata-batch", *event_ids)


class Signer:
    """Signs request bodies with one or more Standard Webhooks secrets (current first)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a signer needs at least one secret")
        self._keys = [webhook_key(secret) for secret in secrets]

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """Value of the ``webhook-signature`` header."""
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in self._keys
        )


def query_hash(secret: str, cid: str, timestamp: int, body: bytes) -> str:
    """Bounce-manager ``hash``: hex HMAC-SHA256 keyed with the secret over ``cid.ts.body``.

    The original sent a bare SHA-224 of ``secret_cid_ts`` (replayable for any body); binding
    the body and keying the hash fixes both.
    """
    signed = f"{cid}.{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
