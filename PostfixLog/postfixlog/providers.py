"""Which mailbox provider a recipient domain belongs to: by its MX hosts, not by its name.

Thousands of Google Workspace domains are Google: what counts is where their mail goes.  A
domain listed in a provider's ``domains`` is that provider without a lookup; otherwise its MX
records are looked up (dnspython) and the first MX host, lowest preference first, that matches a
provider's ``mx`` patterns names the provider (providers in the order of the rules file).  A
domain that matches nothing -- no MX, a null MX, NXDOMAIN, or a lookup that failed -- is a
provider of its own, named after the domain (the default rule).

Answers are cached for their DNS TTL (at least :data:`MIN_TTL_S`, at most :data:`MAX_TTL_S`;
NXDOMAIN/no answer :data:`NEGATIVE_TTL_S`; a failed lookup :data:`FAILURE_TTL_S`), in a cache of
``cache_size`` domains (least recently used out first); dnspython's own LRU cache holds the raw
answers.  Lookups of one batch run in parallel, each bounded by ``timeout_s``.

Without name servers of its own, a sandboxed PostfixLog (the local stack, tests) never asks DNS:
the providers' ``domains`` still apply, every other domain is its own provider.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol

import dns.exception
import dns.resolver

from postfixlog.rules import Rules

log = logging.getLogger(__name__)

MIN_TTL_S: Final = 60.0
MAX_TTL_S: Final = 86400.0
NEGATIVE_TTL_S: Final = 300.0
FAILURE_TTL_S: Final = 60.0
#: Parallel lookups of one batch.
LOOKUP_THREADS: Final = 8


class LookupMetrics(Protocol):
    """Counts lookups by outcome (listed, cached, mx, nxdomain, no-mx, failed, no-dns)."""

    def lookup(self, outcome: str) -> None:
        """One provider lookup."""


class _NoMetrics:
    def lookup(self, outcome: str) -> None:
        """Ignore."""


class ProviderResolver:
    """Recipient domain -> provider name (thread-safe)."""

    def __init__(
        self,
        rules: Rules,
        *,
        nameservers: list[str] | None = None,
        use_dns: bool = True,
        timeout_s: float = 3.0,
        cache_size: int = 10000,
        metrics: LookupMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.use_dns = use_dns
        self.cache_size = cache_size
        self.metrics: LookupMetrics = metrics or _NoMetrics()
        self.clock = clock
        self._listed = {domain: name for name, limits in rules.providers.items() for domain in limits.domains}
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = list(nameservers)
        self.resolver.lifetime = timeout_s
        self.resolver.timeout = timeout_s
        self.resolver.cache = dns.resolver.LRUCache(cache_size)
        self._pool = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="mx-lookup")

    def close(self) -> None:
        """Stop the lookup threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def provider(self, domain: str) -> str:
        """The provider of ``domain`` (looked up at most once per TTL)."""
        return self.providers([domain])[domain.lower()]

    def providers(self, domains: Iterable[str]) -> dict[str, str]:
        """Providers of several domains (keys lower-cased); uncached ones are looked up in parallel."""
        out: dict[str, str] = {}
        todo: list[str] = []
        for domain in {d.strip().lower().rstrip(".") for d in domains}:
            found = self._cached(domain)
            if found is not None:
                out[domain] = found
            else:
                todo.append(domain)
        if len(todo) == 1:
            out[todo[0]] = self._resolve(todo[0])
        elif todo:
            out.update(zip(todo, self._pool.map(self._resolve, todo), strict=True))
        return out

    def _cached(self, domain: str) -> str | None:
        listed = self._listed.get(domain)
        if listed is not None:
            self.metrics.lookup("listed")
            return listed
        if not self.use_dns:
            self.metrics.lookup("no-dns")
            return domain
        with self._lock:
            entry = self._cache.get(domain)
            if entry is None:
                return None
            if entry[1] <= self.clock():
                del self._cache[domain]
                return None
            self._cache.move_to_end(domain)
        self.metrics.lookup("cached")
        return entry[0]

    def _store(self, domain: str, provider: str, ttl_s: float) -> None:
        with self._lock:
            self._cache[domain] = (provider, self.clock() + ttl_s)
            self._cache.move_to_end(domain)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _resolve(self, domain: str) -> str:
        try:
            answer = self.resolver.resolve(domain, "MX", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self.metrics.lookup("nxdomain")
            self._store(domain, domain, NEGATIVE_TTL_S)
            return domain
        except dns.exception.DNSException as exc:
            self.metrics.lookup("failed")
            log.warning("MX lookup of %s failed (%s); shaped as a provider of its own for now", domain, exc)
            self._store(domain, domain, FAILURE_TTL_S)
            return domain
        hosts = [str(record.exchange).rstrip(".").lower() for record in sorted(answer, key=lambda r: r.preference)]
        ttl = min(max(float(answer.rrset.ttl if answer.rrset is not None else MIN_TTL_S), MIN_TTL_S), MAX_TTL_S)
        provider = self.match(hosts) or domain
        self.metrics.lookup("mx" if provider != domain else "no-mx")
        self._store(domain, provider, ttl)
        return provider

    def match(self, hosts: list[str]) -> str | None:
        """The provider whose MX patterns match the first matching host, or None."""
        for host in hosts:
            if not host:  # null MX (RFC 7505): "."
                continue
            for name, limits in self.rules.providers.items():
                if any(fnmatch.fnmatchcase(host, pattern) for pattern in limits.mx):
                    return name
        return None
