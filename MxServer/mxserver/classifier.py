"""What a mail received by the MX means: both classification phases behind one object.

:class:`Classifier` holds an installation's settings (return-path domains, own MTA names, FBL
mailboxes, bounce rules) and its address signer.  The MX runs the two phases apart --
:meth:`Classifier.analyse` in a worker process (:mod:`mxserver.pool`), then
:func:`mxserver.verification.verify` in the event loop with the records fetched from Redis --
while tests and ``mxserver classify`` run both in one call, :meth:`Classifier.classify`, with
the records given (or none: then a tag verifies only against an address the report names).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common import bouncerules as rules
from common.addressing import AddressSigner
from common.binding import Sent
from common.config import Config
from mxserver.analysis import Analysis, Settings, analyse
from mxserver.verification import Outcome, verify


def settings_from_config(config: Config) -> Settings:
    """The analysis settings of a loaded configuration (reads the bounce rules: may raise ConfigError)."""
    section = config.customer.mxserver
    own: set[str] = set()
    abuse: frozenset[str] = frozenset()
    if section is not None:
        own.update(h.lower().rstrip(".") for h in section.own_hostnames)
        abuse = section.abuse.all()
    postfixlog = config.customer.postfixlog
    if postfixlog is not None:
        name = postfixlog.string_replacer.main_cf.get("myhostname")
        if isinstance(name, str) and name:
            own.add(name.lower().rstrip("."))
    transformer = config.customer.transformer
    domains = transformer.return_path_domains if transformer is not None else frozenset()
    senders = frozenset(s.domain.lower() for s in transformer.domain_settings) if transformer else frozenset()
    return Settings(
        domains=frozenset(d.lower() for d in domains),
        rules=rules.configured(config),
        own_hosts=frozenset(own),
        abuse_addresses=abuse,
        from_domains=senders,
    )


def records_of(sent: Mapping[str, Iterable[str]]) -> dict[str, list[Sent]]:
    """Records as :func:`common.binding.decode_record` gives them, from uuid -> recipients."""
    return {uuid: [Sent(r, None, None) for r in recipients] for uuid, recipients in sent.items()}


@dataclass(frozen=True)
class Classifier:
    """Classifies received mail for one installation."""

    settings: Settings
    signer: AddressSigner

    @classmethod
    def from_config(cls, config: Config, signer: AddressSigner) -> Classifier:
        """The classifier of a loaded configuration."""
        return cls(settings_from_config(config), signer)

    def analyse(self, recipients: Sequence[str], raw: bytes) -> Analysis:
        """Phase 1 (pure)."""
        return analyse(self.settings, recipients, raw)

    def classify(
        self,
        recipients: Sequence[str],
        raw: bytes,
        *,
        records: Mapping[str, Sequence[Sent]] | None = None,
        now: int | None = None,
    ) -> Outcome:
        """Both phases; ``records`` are the Transformer's records by uuid (none: offline)."""
        analysis = self.analyse(recipients, raw)
        return verify(analysis, records or {}, self.signer, now=int(time.time()) if now is None else now)
