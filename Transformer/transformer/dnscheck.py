"""``transformer-dkim check``: is the DNS ready for the first send?  One line per check.

For every sending domain of ``transformer.domain-settings`` it looks up, with dnspython:

* **dkim** / **dkim-ed25519** -- the TXT record ``<selector>._domainkey.<domain>`` carries the
  public half of the configured key (RSA, and the ed25519 selector when configured);
* **spf** -- the return-path domain (the envelope sender receivers check) has exactly one SPF
  record, and it authorises every sending address (``--sending-ip`` or
  ``common-config.dns-check.sending-ips``; ``include``, ``a``, ``mx``, ``redirect`` followed,
  at most 10 DNS lookups as RFC 7208 says);
* **dmarc** -- ``_dmarc.<domain>`` (or the parent domain's) exists, and the alignment DMARC
  will see: DKIM d= is the From domain, SPF aligns when the return-path domain is the From
  domain or (relaxed ``aspf``) a subdomain of it;
* **mx** -- the return-path domain's MX points at MxServer (``--mx-host``,
  ``common-config.dns-check.mx-host`` or ``mxserver.hostname``) and that host resolves;

and once for the installation:

* **helo** -- Postfix' HELO name (``--helo-name``, ``common-config.dns-check.helo-name`` or
  ``postfixlog.string-replacer.main-cf.myhostname``) resolves to the sending addresses, and
  each address' PTR names it back (forward-confirmed reverse DNS).

Each check prints ``OK``, ``WARN`` or ``FAIL``; a FAIL line ends with the record to publish.
The exit status is 1 when any check failed, else 0.  ``--nameserver IP[:PORT]`` asks that
server (e.g. your authoritative one, before the zone has propagated) instead of the system's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import dns.exception
import dns.resolver
import dns.reversename

from common.config import Config
from common.dkimkeys import PrivateKey, load_domain_keys, public_key_record

Level = Literal["OK", "WARN", "FAIL"]
TTL: Final = 3600
#: RFC 7208 4.6.4: at most 10 mechanisms and modifiers that cause DNS lookups.
SPF_LOOKUP_LIMIT: Final = 10


@dataclass(frozen=True)
class Check:
    """The result of one check."""

    level: Level
    domain: str
    name: str
    message: str
    publish: str | None = None

    def line(self) -> str:
        """The line ``transformer-dkim check`` prints."""
        text = f"{self.level:<4s}  {self.domain}  {self.name}: {self.message}"
        return text + (f"; publish: {self.publish}" if self.publish else "")


class LookupFailed(Exception):
    """The DNS did not answer (timeout, SERVFAIL): not the same as "no such record"."""


class Dns:
    """The few lookups the checks need; None/[] means the name or record does not exist."""

    def __init__(self, nameserver: str | None = None, *, timeout_s: float = 3.0) -> None:
        if nameserver:
            host, _, port = nameserver.rpartition(":") if nameserver.count(":") == 1 else (nameserver, "", "")
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [host]
            self.resolver.port = int(port or 53)
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.lifetime = timeout_s
        self.resolver.timeout = timeout_s

    def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        try:
            return list(self.resolver.resolve(name, rdtype))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise LookupFailed(f"{rdtype} {name}: {type(exc).__name__}") from None

    def txt(self, name: str) -> list[str]:
        """TXT records (each one's strings joined)."""
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self._query(name, "TXT")]  # type: ignore[attr-defined]

    def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, host) pairs, best first."""
        pairs = [(int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in self._query(name, "MX")]  # type: ignore[attr-defined]
        return sorted(pairs)

    def addresses(self, name: str) -> set[str]:
        """A and AAAA records."""
        return {r.to_text() for kind in ("A", "AAAA") for r in self._query(name, kind)}

    def ptr(self, ip: str) -> list[str]:
        """PTR names of an address."""
        reverse = dns.reversename.from_address(ip).to_text()
        return [r.to_text().rstrip(".").lower() for r in self._query(reverse, "PTR")]


# -- SPF (RFC 7208), as far as a sending-address check needs it --------------------------------


class SpfError(Exception):
    """The record cannot be evaluated (permerror)."""


def spf_record(records: Iterable[str]) -> str | None:
    """The one SPF record among TXT records.

    Raises:
        SpfError: there are several (RFC 7208 4.5: permerror).
    """
    found = [r for r in records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
    if len(found) > 1:
        raise SpfError(f"{len(found)} SPF records (receivers treat that as an error): merge them")
    return found[0] if found else None


def spf_allows(dns_: Dns, domain: str, ip: str) -> str:
    """The SPF result for ``ip`` sending as ``domain``: pass, fail, softfail, neutral or none.

    Raises:
        SpfError: a permerror (too many lookups, several records, a broken include).
    """
    budget = [SPF_LOOKUP_LIMIT]
    return _evaluate(dns_, domain, ipaddress.ip_address(ip), budget)


def _spend(budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpfError(f"more than {SPF_LOOKUP_LIMIT} DNS lookups (RFC 7208 4.6.4)")


def _evaluate(dns_: Dns, domain: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, budget: list[int]) -> str:
    record = spf_record(dns_.txt(domain))
    if record is None:
        return "none"
    redirect: str | None = None
    results = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
    for term in record.split()[1:]:
        if term.lower().startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        if "=" in term.split(":", 1)[0]:
            continue  # another modifier (exp=…)
        qualifier = term[0] if term[0] in results else "+"
        mechanism = term[1:] if term[0] in results else term
        if _matches(dns_, domain, mechanism, ip, budget):
            return results[qualifier]
    if redirect:
        _spend(budget)
        return _evaluate(dns_, redirect, ip, budget)
    return "neutral"


def _matches(
    dns_: Dns, domain: str, mechanism: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, budget: list[int]
) -> bool:
    name, _, arg = mechanism.partition(":")
    name = name.lower()
    target, _, cidr = (arg or domain).partition("/")
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        try:
            return ip in ipaddress.ip_network(arg, strict=False)
        except ValueError:
            raise SpfError(f"{mechanism!r} is not an address or network") from None
    if name == "include":
        _spend(budget)
        result = _evaluate(dns_, arg, ip, budget)
        if result == "none":
            raise SpfError(f"include:{arg} has no SPF record")
        return result == "pass"
    if name in ("a", "mx"):
        _spend(budget)
        hosts = [target] if name == "a" else [host for _, host in dns_.mx(target)]
        prefix = int(cidr) if cidr.isdigit() else (32 if ip.version == 4 else 128)
        for host in hosts:
            for address in dns_.addresses(host):
                network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
                if network.version == ip.version and ip in network:
                    return True
        return False
    if name in ("exists", "ptr"):
        _spend(budget)  # not evaluated: a sending-address check should not rely on them
        return False
    raise SpfError(f"unknown mechanism {mechanism!r}")


# -- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What the DNS is compared with."""

    sending_ips: tuple[str, ...]
    mx_host: str | None
    helo_name: str | None

    @classmethod
    def of(cls, config: Config, *, sending_ips: list[str], mx_host: str | None, helo_name: str | None) -> Targets:
        """Command line first, then ``common-config.dns-check``, then the services' own settings."""
        section = config.customer.common_config.dns_check
        mxserver = config.customer.mxserver
        postfixlog = config.customer.postfixlog
        myhostname = postfixlog.string_replacer.main_cf.get("myhostname") if postfixlog is not None else None
        return cls(
            tuple(sending_ips or section.sending_ips),
            _host(mx_host or section.mx_host or (mxserver.hostname if mxserver is not None else None)),
            _host(helo_name or section.helo_name or (str(myhostname) if myhostname else None)),
        )


def _host(name: str | None) -> str | None:
    return name.strip().rstrip(".").lower() if name else None


def check_all(config: Config, dns_: Dns, targets: Targets) -> list[Check]:
    """Every check, in the order they are printed."""
    keys, _ = load_domain_keys(config.transformer, config.customer_path)
    by_domain = {k.domain: k for k in keys}
    out: list[Check] = []
    for ds in config.transformer.domain_settings:
        domain, rp = ds.domain, ds.return_path_domain
        key = by_domain[ds.domain]
        out.append(_guard(domain, "dkim", check_dkim, dns_, domain, ds.selector, key.rsa, "dkim"))
        if key.ed25519 is not None:
            ed_selector, ed_key = key.ed25519
            out.append(_guard(domain, "dkim-ed25519", check_dkim, dns_, domain, ed_selector, ed_key, "dkim-ed25519"))
        out.append(_guard(domain, "spf", check_spf, dns_, domain, rp, targets.sending_ips))
        out.append(_guard(domain, "dmarc", check_dmarc, dns_, domain, rp))
        out.append(_guard(domain, "mx", check_mx, dns_, domain, rp, targets.mx_host))
    out.extend(check_helo(dns_, targets))
    return out


def _guard(domain: str, name: str, check: Callable[..., Check], *args: Any) -> Check:
    """``check(*args)``, or a FAIL line when the DNS did not answer."""
    try:
        return check(*args)
    except LookupFailed as exc:
        return Check("FAIL", domain, name, f"the DNS did not answer ({exc})")


def _tags(record: str) -> dict[str, str]:
    out = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip().lower()] = "".join(value.split())
    return out


def check_dkim(dns_: Dns, domain: str, selector: str, key: PrivateKey, name: str) -> Check:
    """The DKIM key record of one selector."""
    where = f"{selector}._domainkey.{domain}"
    expected = public_key_record(key)
    publish = f'{where}. {TTL} IN TXT "{expected}"'
    records = [r for r in dns_.txt(where) if "p=" in r]
    if not records:
        return Check("FAIL", domain, name, f"no DKIM record at {where}", publish)
    want = _tags(expected)
    for record in records:
        tags = _tags(record)
        if tags.get("p") == want["p"] and tags.get("k", "rsa") == want.get("k", "rsa"):
            return Check("OK", domain, name, f"{where} publishes the configured key")
    if any(_tags(r).get("p") == "" for r in records):
        return Check("FAIL", domain, name, f"{where} publishes a revoked key (empty p=)", publish)
    return Check("FAIL", domain, name, f"{where} publishes another key than the configured one", publish)


def check_spf(dns_: Dns, domain: str, rp: str, ips: tuple[str, ...]) -> Check:
    """SPF of the return-path domain against the sending addresses."""
    mechanisms = " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips) or "ip4:YOUR.SENDING.IP"
    try:
        record = spf_record(dns_.txt(rp))
    except SpfError as exc:
        return Check("FAIL", domain, "spf", f"{rp}: {exc}")
    if record is None:
        return Check("FAIL", domain, "spf", f"{rp} has no SPF record", f'{rp}. {TTL} IN TXT "v=spf1 {mechanisms} -all"')
    if not ips:
        return Check(
            "WARN",
            domain,
            "spf",
            f"{rp} publishes {record!r}; give the sending address (--sending-ip or "
            "common-config.dns-check.sending-ips) to check it",
        )
    refused = []
    for ip in ips:
        try:
            result = spf_allows(dns_, rp, ip)
        except SpfError as exc:
            return Check("FAIL", domain, "spf", f"{rp}: {record!r}: {exc}")
        if result != "pass":
            refused.append(f"{ip} ({result})")
    if refused:
        terms = record.split()
        missing = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips if f"{ip} (" in " ".join(refused)]
        fixed = " ".join([terms[0], *missing, *terms[1:]])
        return Check(
            "FAIL", domain, "spf", f"{rp} does not authorise {', '.join(refused)}", f'{rp}. {TTL} IN TXT "{fixed}"'
        )
    return Check("OK", domain, "spf", f"{rp} authorises {', '.join(ips)}")


def _aligned(rp: str, domain: str, strict: bool) -> bool:
    return rp == domain or (not strict and rp.endswith("." + domain))


def check_dmarc(dns_: Dns, domain: str, rp: str) -> Check:
    """The DMARC record, and the alignment it will see."""
    publish = f'_dmarc.{domain}. {TTL} IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"'
    labels = domain.split(".")
    record = None
    where = ""
    for i in range(len(labels) - 1):  # the domain, then its parents (the organisational domain)
        name = "_dmarc." + ".".join(labels[i:])
        found = [r for r in dns_.txt(name) if r.replace(" ", "").lower().startswith("v=dmarc1")]
        if found:
            record, where = found[0], name
            break
    if record is None:
        return Check("FAIL", domain, "dmarc", f"no DMARC record at _dmarc.{domain} or its parents", publish)
    tags = _tags(record)
    policy = tags.get("p", "?")
    strict_spf = tags.get("aspf", "r") == "s"
    spf = _aligned(rp, domain, strict_spf)
    seen = f"{where} p={policy}: DKIM aligned (d={domain}), SPF {'aligned' if spf else 'not aligned'} ({rp})"
    if not spf:
        hint = "aspf=s: use the From domain itself" if strict_spf and rp.endswith("." + domain) else "use a subdomain"
        return Check("WARN", domain, "dmarc", f"{seen}; DMARC passes on DKIM alone ({hint} as return path)")
    return Check("OK", domain, "dmarc", seen)


def check_mx(dns_: Dns, domain: str, rp: str, mx_host: str | None) -> Check:
    """The return-path domain's MX, where bounces, complaints and unsubscribe mails arrive."""
    publish = f"{rp}. {TTL} IN MX 10 {mx_host or 'mxserver.' + domain}."
    hosts = [host for _, host in dns_.mx(rp)]
    if not hosts:
        return Check("FAIL", domain, "mx", f"{rp} has no MX record (bounces would not reach MxServer)", publish)
    if mx_host is None:
        return Check(
            "WARN",
            domain,
            "mx",
            f"{rp} MX {', '.join(hosts)}; give MxServer's host (--mx-host, mxserver.hostname) to check it",
        )
    if mx_host not in hosts:
        return Check("FAIL", domain, "mx", f"{rp} MX points at {', '.join(hosts)}, not at {mx_host}", publish)
    if not dns_.addresses(mx_host):
        return Check(
            "FAIL",
            domain,
            "mx",
            f"{mx_host} has no A/AAAA record",
            f"{mx_host}. {TTL} IN A <MxServer's public address>",
        )
    return Check("OK", domain, "mx", f"{rp} MX {mx_host} ({', '.join(sorted(dns_.addresses(mx_host)))})")


def check_helo(dns_: Dns, targets: Targets) -> list[Check]:
    """Postfix' HELO name against the sending addresses (A and PTR)."""
    helo = targets.helo_name
    if helo is None:
        return [Check("WARN", "-", "helo", "no HELO name (postfixlog.string-replacer.main-cf.myhostname) to check")]
    if not targets.sending_ips:
        return [Check("WARN", helo, "helo", "give the sending address (--sending-ip) to check A and PTR")]
    out = []
    try:
        forward = dns_.addresses(helo)
    except LookupFailed as exc:
        return [Check("FAIL", helo, "helo", f"the DNS did not answer ({exc})")]
    for ip in targets.sending_ips:
        if ip not in forward:
            kind = "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
            shown = ", ".join(sorted(forward)) or "nothing"
            out.append(
                Check("FAIL", helo, "helo-a", f"{helo} resolves to {shown}, not {ip}", f"{helo}. {TTL} IN {kind} {ip}")
            )
        else:
            out.append(Check("OK", helo, "helo-a", f"{helo} resolves to {ip}"))
        try:
            names = dns_.ptr(ip)
        except LookupFailed as exc:
            out.append(Check("FAIL", helo, "helo-ptr", f"the DNS did not answer ({exc})"))
            continue
        reverse = dns.reversename.from_address(ip).to_text()
        if helo in names:
            out.append(Check("OK", helo, "helo-ptr", f"PTR of {ip} is {helo}"))
        else:
            shown = ", ".join(names) or "missing"
            out.append(
                Check(
                    "FAIL",
                    helo,
                    "helo-ptr",
                    f"PTR of {ip} is {shown}, not {helo} (ask your hosting provider)",
                    f"{reverse} {TTL} IN PTR {helo}.",
                )
            )
    return out
