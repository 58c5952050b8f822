"""``transformer-dkim``: make DKIM keys and print the DNS records a sending domain needs.

``transformer-dkim generate example.com --return-path-domain bounces.example.com`` writes
``dkim-example.com.pem`` (RSA, 2048 bits by default; ``--ed25519-selector`` adds an Ed25519
key) and prints, ready for a zone file:

* the DKIM TXT record ``<selector>._domainkey.<domain>``;
* the MX record of the return-path domain, pointing at the MxServer host (bounces,
  unsubscribe mails and spam reports arrive there);
* an SPF record for the return-path domain (the envelope sender SPF checks);
* a DMARC record to start with (``p=none`` plus reports), and an alignment check;
* the ``transformer.domain-settings`` entry for the customer file.

``transformer-dkim records`` prints the same records for every domain of an existing
configuration, from its key files.

``transformer-dkim check`` looks the records up and compares them with the configuration (DKIM
keys, SPF, DMARC and its alignment, MX, the HELO name's A and PTR): one line per check, OK, WARN
or FAIL with the record to publish; exit status 1 when a check failed (:mod:`transformer.dnscheck`).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import TextIO

from common import cli
from common.cli import EXIT_CONFIG
from common.dkimkeys import (
    PrivateKey,
    generate_ed25519_seed,
    generate_rsa_pem,
    load_domain_keys,
    load_private_key,
    public_key_record,
)
from common.version import __version__
from transformer import dnscheck

TTL = 3600
_TXT_CHUNK = 255


def txt_strings(value: str) -> str:
    """A TXT value as quoted strings of at most 255 characters (RFC 1035 character-strings)."""
    chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)] or [""]
    return " ".join(f'"{c}"' for c in chunks)


def dns_records(
    *,
    domain: str,
    return_path_domain: str,
    selector: str,
    key: PrivateKey,
    mx_host: str,
    sending_ips: list[str],
    ed25519: tuple[str, PrivateKey] | None = None,
) -> str:
    """The zone-file lines (with explanatory comments) for one sending domain."""
    out = [f"; ---- {domain} (return path {return_path_domain}) ----"]
    dkim = [(selector, key), *([ed25519] if ed25519 else [])]
    for sel, k in dkim:
        record = public_key_record(k)
        out.append(f"; DKIM public key ({_describe(k)}): receivers check the d={domain} s={sel} signature")
        out.append(f"{sel}._domainkey.{domain}. {TTL} IN TXT {txt_strings(record)}")
    out.append("; MX of the return-path domain: asynchronous bounces, unsubscribe mails and spam reports")
    out.append(f"; go to MxServer ({mx_host} needs an A/AAAA record with MxServer's public address)")
    out.append(f"{return_path_domain}. {TTL} IN MX 10 {mx_host.rstrip('.')}.")
    mechanisms = [_ip_mechanism(ip) for ip in sending_ips] or ["ip4:YOUR.POSTFIX.EGRESS.IP"]
    out.append("; SPF of the envelope sender (the return-path domain): list the addresses Postfix sends from")
    out.append(f'{return_path_domain}. {TTL} IN TXT "v=spf1 {" ".join(mechanisms)} -all"')
    out.append("; DMARC: start with p=none and read the aggregate reports, then move to quarantine/reject")
    out.append(f'_dmarc.{domain}. {TTL} IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}; adkim=r; aspf=r"')
    if return_path_domain != domain and not return_path_domain.endswith("." + domain):
        out.append(
            f"; WARNING: {return_path_domain} is not {domain} or a subdomain of it: SPF will not align for "
            "DMARC and spam filters may score the mismatch; prefer e.g. bounces." + domain
        )
    return "\n".join(out) + "\n"


def _describe(key: PrivateKey) -> str:
    size = getattr(key, "key_size", None)
    return f"RSA {size} bits" if size else "Ed25519, RFC 8463"


def _ip_mechanism(ip: str) -> str:
    network = ipaddress.ip_network(ip, strict=False)
    kind = "ip4" if network.version == 4 else "ip6"
    return f"{kind}:{ip}"


def _generate(args: argparse.Namespace, out: TextIO) -> int:
    domain = args.domain.strip().lower().rstrip(".")
    rp = (args.return_path_domain or f"bounces.{domain}").strip().lower().rstrip(".")
    directory: Path = args.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    rsa_path = directory / f"dkim-{domain}.pem"
    ed_path = directory / f"dkim-{domain}.ed25519"
    targets = [rsa_path] + ([ed_path] if args.ed25519_selector else [])
    existing = [p for p in targets if p.exists()]
    if existing and not args.force:
        sys.stderr.write(f"transformer-dkim: {existing[0]} exists; use --force to replace it\n")
        return 1
    _write_secret(rsa_path, generate_rsa_pem(args.bits))
    key = load_private_key(rsa_path, "rsa")
    ed: tuple[str, PrivateKey] | None = None
    if args.ed25519_selector:
        _write_secret(ed_path, generate_ed25519_seed())
        ed = (args.ed25519_selector, load_private_key(ed_path, "ed25519"))
    mx_host = args.mx_host or f"mxserver.{domain}"
    out.write(f"; wrote {', '.join(str(p) for p in targets)} (keep private; mount as a Secret)\n")
    out.write(
        dns_records(
            domain=domain,
            return_path_domain=rp,
            selector=args.selector,
            key=key,
            mx_host=mx_host,
            sending_ips=args.sending_ip,
            ed25519=ed,
        )
    )
    out.write("\n# transformer.domain-settings entry for inboxbooster-mailer-customer.yaml:\n")
    out.write(f"- domain: {domain}\n  dkim-private-key-file: {rsa_path.name}\n")
    out.write(f"  selector: {args.selector}\n  return-path-domain: {rp}\n")
    if ed is not None:
        out.write(f"  ed25519-private-key-file: {ed_path.name}\n  ed25519-selector: {ed[0]}\n")
    return 0


def _write_secret(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)


def _records(args: argparse.Namespace, out: TextIO) -> int:
    config = cli.load(args, "transformer", check_only=False, announce=True)
    keys, problems = load_domain_keys(config.transformer, config.customer_path)
    if problems:  # pragma: no cover - load_config already checked the keys
        cli.report_problems("transformer-dkim", problems)
        return EXIT_CONFIG
    by_domain = {k.domain: k for k in keys}
    for ds in config.transformer.domain_settings:
        key = by_domain[ds.domain].rsa
        ed = by_domain[ds.domain].ed25519
        out.write(
            dns_records(
                domain=ds.domain,
                return_path_domain=ds.return_path_domain,
                selector=ds.selector,
                key=key,
                mx_host=args.mx_host or f"mxserver.{ds.domain}",
                sending_ips=args.sending_ip,
                ed25519=ed,
            )
        )
        out.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``transformer-dkim`` argument parser."""
    p = argparse.ArgumentParser(prog="transformer-dkim", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--mx-host", help="host name of MxServer (default mxserver.<domain>; check: mxserver.hostname)")
    common.add_argument(
        "--sending-ip",
        action="append",
        default=[],
        type=_checked_ip,
        help="address or CIDR Postfix sends from, for SPF (repeatable)",
    )
    gen = sub.add_parser("generate", parents=[common], help="make a key pair and print the DNS records")
    gen.add_argument("domain", help="the From domain")
    gen.add_argument("--return-path-domain", help="envelope-sender domain (default bounces.<domain>)")
    gen.add_argument("--selector", default="mailer", help="DKIM selector (default mailer)")
    gen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096), help="RSA key size")
    gen.add_argument("--ed25519-selector", help="also make an Ed25519 key with this selector (RFC 8463)")
    gen.add_argument("--output-dir", type=Path, default=Path("."), help="where to write the key files")
    gen.add_argument("--force", action="store_true", help="replace existing key files")
    rec = sub.add_parser("records", parents=[common], help="print the DNS records of a configuration")
    check = sub.add_parser(
        "check", parents=[common], help="look the records up and compare them with the configuration"
    )
    check.add_argument(
        "--helo-name", help="Postfix' HELO name (default: common-config.dns-check, then main-cf myhostname)"
    )
    check.add_argument("--nameserver", help="ask this DNS server (IP or IP:PORT) instead of the system's resolver")
    check.add_argument("--dns-timeout", type=float, default=3.0, help="seconds to wait for each answer (default 3)")
    for parser in (rec, check):
        parser.add_argument("--global-config-file", type=Path, default=None, help="default: as for every service")
        parser.add_argument("--customer-config-file", type=Path, default=None, help="default: as for every service")
    return p


def _checked_ip(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address or network") from None
    return value


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``transformer-dkim`` console script."""
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    if args.command == "generate":
        return _generate(args, stream)
    if args.command == "check":
        return _check(args, stream)
    return _records(args, stream)


def _check(args: argparse.Namespace, out: TextIO) -> int:
    config = cli.load(args, "transformer", check_only=False, announce=True)
    targets = dnscheck.Targets.of(config, sending_ips=args.sending_ip, mx_host=args.mx_host, helo_name=args.helo_name)
    checks = dnscheck.check_all(config, dnscheck.Dns(args.nameserver, timeout_s=args.dns_timeout), targets)
    for check in checks:
        out.write(check.line() + "\n")
    failed = sum(1 for c in checks if c.level == "FAIL")
    warned = sum(1 for c in checks if c.level == "WARN")
    out.write(f"{len(checks)} checks: {failed} failed, {warned} warnings\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
