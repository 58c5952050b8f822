"""The MX corpus (``tests/data/mx``) with its placeholders expanded, for tests and benchmarks.

The corpus files hold placeholders instead of tagged values (``tests/data/mx/README.md``):
``{{return-path:UUID:RCPT}}``, ``{{unsub-address:…}}``, ``{{unsub-token:…}}``,
``{{message-id:…}}`` and their ``forged-`` variants.  :func:`expand` turns them into what the
Transformer would have written with the test secret (``forged-`` ones get the same shape with a
tag made with another secret); :func:`sent` lists the (uuid, recipient) copies the genuine
placeholders stand for, i.e. the Transformer's ``IB:sent:<uuid>`` records for that message.

Message-ID suffixes are derived from (uuid, recipient), so an expanded file is the same bytes
on every run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from common.addressing import AddressSigner
from devtools import testing
from devtools.testing import RETURN_PATH_DOMAIN, SENDER_DOMAIN

REPO: Final = Path(__file__).resolve().parents[2]
CORPUS: Final = REPO / "tests/data/mx"
SECRET: Final = testing.ADDRESS_SECRET.encode()
SIGNER: Final = AddressSigner(SECRET)
FORGER: Final = AddressSigner(b"not-the-secret")
#: Our outbound Postfix in the corpus (``postfixlog.string-replacer.main-cf.myhostname``).
OWN_MTA: Final = "mta.example.test"
FBL_ADDRESS: Final = f"fbl@{RETURN_PATH_DOMAIN}"

_PLACEHOLDER: Final = re.compile(rb"\{\{((?:forged-)?[a-z-]+):([a-z0-9]{1,46}):([^{}\r\n]+?)\}\}")


def _suffix(uuid: str, recipient: str) -> str:
    digest = hashlib.sha256(f"{uuid}\x00{recipient}".encode()).digest()
    return base64.b32encode(digest).decode().lower()[:13]


def value(kind: str, uuid: str, recipient: str) -> str:
    """What one placeholder stands for (``kind`` as in the corpus, e.g. ``return-path``)."""
    signer = SIGNER
    if kind.startswith("forged-"):
        signer, kind = FORGER, kind.removeprefix("forged-")
    if kind == "return-path":
        return signer.return_path(uuid, recipient, RETURN_PATH_DOMAIN)
    if kind == "unsub-address":
        return signer.unsubscribe_address(uuid, recipient, RETURN_PATH_DOMAIN)
    if kind == "unsub-token":
        return signer.unsubscribe_token(uuid, recipient)
    if kind == "message-id":
        return f"{uuid}.{signer.tag('msgid', uuid, recipient)}.{_suffix(uuid, recipient)}@{RETURN_PATH_DOMAIN}"
    raise ValueError(f"unknown placeholder kind {kind!r}")


def expand(data: bytes) -> bytes:
    """``data`` with every placeholder replaced by its value."""

    def replace(match: re.Match[bytes]) -> bytes:
        kind, uuid, rcpt = (g.decode("utf-8") for g in match.groups())
        return value(kind, uuid, rcpt).encode()

    return _PLACEHOLDER.sub(replace, data)


def sent(*texts: bytes) -> dict[str, set[str]]:
    """Map uuid -> recipients of the genuine (not forged) placeholders in ``texts``."""
    out: dict[str, set[str]] = {}
    for text in texts:
        for match in _PLACEHOLDER.finditer(text):
            kind, uuid, rcpt = (g.decode("utf-8") for g in match.groups())
            if not kind.startswith("forged-"):
                out.setdefault(uuid, set()).add(rcpt)
    return out


@dataclass(frozen=True)
class Case:
    """One corpus message, expanded."""

    path: Path
    raw: bytes
    rcpt: list[str]
    expected: dict[str, Any]
    #: uuid -> recipients: what the Transformer recorded for the messages this one is about.
    records: dict[str, set[str]]

    @property
    def name(self) -> str:
        """Path relative to the corpus directory."""
        return str(self.path.relative_to(CORPUS))

    @property
    def kind(self) -> str:
        """Expected kind (``bounce``, ``unverified``, …)."""
        return str(self.expected["kind"])

    def with_crlf(self) -> bytes:
        """The message with CRLF line endings (as it arrives over SMTP)."""
        return self.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def paths() -> list[Path]:
    """Every corpus message, sorted."""
    return sorted(CORPUS.rglob("*.eml"))


def _expand_json(value: Any) -> Any:
    """Placeholders expanded in every string of a decoded JSON value."""
    if isinstance(value, str):
        return expand(value.encode()).decode()
    if isinstance(value, list):
        return [_expand_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_json(v) for k, v in value.items()}
    return value


def load(path: Path) -> Case:
    """One case: the message and its expectation, placeholders expanded."""
    raw = path.read_bytes()
    sidecar = json.loads(path.with_name(path.stem + ".expected.json").read_bytes())
    rcpts = "\n".join(sidecar["rcpt"]).encode()
    expected = _expand_json(sidecar)
    return Case(path, expand(raw), list(expected["rcpt"]), expected, sent(raw, rcpts))


@functools.cache
def cases() -> tuple[Case, ...]:
    """Every corpus case (loaded once per process)."""
    return tuple(load(p) for p in paths())


def iter_cases(group: str | None = None) -> Iterator[Case]:
    """Cases, optionally of one group."""
    for case in cases():
        if group is None or case.expected.get("group") == group:
            yield case


__all__ = ["CORPUS", "FBL_ADDRESS", "OWN_MTA", "SENDER_DOMAIN", "SIGNER", "Case", "cases", "expand", "load", "sent"]
