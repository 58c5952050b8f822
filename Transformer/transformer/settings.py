"""What the Transformer needs from the configuration, resolved once at start.

Every DKIM key is loaded here (a missing or bad key stops the start with the file and key
path), and each From domain gets a :class:`DomainProfile` with its signer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common.config import Config
from common.config.transformer import FeedbackId
from common.dkimkeys import load_domain_keys
from common.errors import ConfigError
from transformer.signer import DkimSigner, Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainProfile:
    """One From domain: where its return path lives and how its mail is signed."""

    domain: str
    return_path_domain: str
    signer: DkimSigner
    beacon_url: str | None
    unsubscribe_url: str | None


@dataclass(frozen=True)
class Settings:
    """Everything :class:`~transformer.transform.MessageTransformer` reads."""

    profiles: Mapping[str, DomainProfile]
    x_mailer: str | None
    feedback: FeedbackId
    inject: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float]) -> Settings:
        """Resolve the transformer section and load every key.

        Raises:
            ConfigError: a key file is missing or unusable (one line per problem).
        """
        section = config.transformer
        keys, problems = load_domain_keys(section, config.customer_path)
        if problems:
            raise ConfigError(problems)
        by_domain = {k.domain: k for k in keys}
        profiles: dict[str, DomainProfile] = {}
        for ds in section.domain_settings:
            loaded = by_domain[ds.domain]
            signatures = [Signature(ds.domain, loaded.selector, loaded.rsa)]
            if loaded.ed25519 is not None:
                signatures.append(Signature(ds.domain, *loaded.ed25519))
            profiles[ds.domain] = DomainProfile(
                domain=ds.domain,
                return_path_domain=ds.return_path_domain,
                signer=DkimSigner(signatures, clock=clock),
                beacon_url=ds.beacon_url,
                unsubscribe_url=ds.unsubscribe_url or section.unsubscribe_url,
            )
        inject: list[tuple[str, str]] = []
        warnings: list[str] = []
        for name, template in section.email_headers.inject.items():
            if name.lower() == "list-unsubscribe":
                warnings.append(
                    "transformer.email-headers.inject.List-Unsubscribe is ignored: the Transformer writes "
                    "a signed List-Unsubscribe (tagged mailto plus the https one-click URL when "
                    "unsubscribe-url is set); remove the entry to silence this warning"
                )
                continue
            inject.append((name, template))
        for warning in warnings:
            log.warning("%s", warning)
        return cls(
            profiles=profiles,
            x_mailer=config.global_.transformer.x_mailer,
            feedback=section.feedback_id,
            inject=tuple(inject),
            warnings=tuple(warnings),
        )
