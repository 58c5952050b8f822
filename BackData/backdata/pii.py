r"""Remove recipients' addresses from bounce reasons before they leave for the bounce manager.

The original replaced only exact, case-sensitive occurrences of the recipient (original §3.4,
§14.3).  Remote servers quote recipients in many forms, so for each recipient this matches,
case-insensitively:

* ``local@domain`` bare, in ``<…>``, after ``rfc822;``, with a quoted local part
  (``"john doe"@example.com``, backslash escapes included);
* the same with any character encoded: URL (``%40``, ``%2B``), quoted-printable (``=40``),
  xtext (``+2B``, RFC 3461 ORCPT), HTML entities (``&#64;``), JSON ``\u0040``; VERP's
  ``local=domain`` form; the domain in Unicode or IDNA (``xn--``) spelling;
* the local part alone between ``<…>`` or quotes (``<john.doe>: Recipient address rejected``).

Each is replaced by ``**PII**@<domain>`` (``**PII**`` for a lone local part).  A last pass
replaces every remaining address-like token (``x@y.tld``: forwarding targets, other recipients)
the same way, so the rules err on the side of removing too much.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

PII: Final = "**PII**"

_AT_FORMS: Final = (
    "@",
    "%40",
    "=40",
    r"\+40",
    "&#64;",
    "&#x40;",
    "&commat;",
    r"\\u0040",
    r"\s*\[at\]\s*",
    r"\s*\(at\)\s*",
    "=",  # VERP: local=domain@list-host
)
_ANY_ADDRESS: Final = re.compile(
    r"""(?:"[^"\r\n]{1,200}"|[^\s<>()\[\]"',;:@/?&=]{1,200})@"""
    r"((?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?:[^\W\d_]{2,}|xn--[\w-]+))",
    re.IGNORECASE,
)


def sanitise(text: str, addresses: Iterable[str]) -> str:
    """``text`` with every form of every address in ``addresses`` (and any other address) removed."""
    for address in addresses:
        if not address or "@" not in address:
            continue
        pattern, bare, domain = _patterns(address.strip())
        text = pattern.sub(f"{PII}@{domain}", text)
        if bare is not None:
            text = bare.sub(PII, text)
    return _ANY_ADDRESS.sub(lambda m: f"{PII}@{m.group(1)}", text)


@lru_cache(maxsize=1024)
def _patterns(address: str) -> tuple[re.Pattern[str], re.Pattern[str] | None, str]:
    local, _, domain = address.rpartition("@")
    local = _unquote(local)
    domain = domain.strip().rstrip(".").lower()
    domains = {domain}
    with contextlib.suppress(UnicodeError):
        domains.add(domain.encode("idna").decode("ascii"))
    with contextlib.suppress(UnicodeError):
        domains.add(domain.encode("ascii").decode("idna"))
    plain = "".join(_char(c) for c in local)
    local_re = f'(?:"{plain}"|{plain})'
    domain_re = "(?:" + "|".join(_encoded(d) for d in sorted(domains, key=len, reverse=True)) + ")"
    full = re.compile(
        local_re + "(?:" + "|".join(_AT_FORMS) + ")" + domain_re + r"(?![\w-])",
        re.IGNORECASE,
    )
    bare = None
    if local:
        bare = re.compile(r"(?<=[<\"'])" + plain + r"(?=[>\"'])", re.IGNORECASE)
    return full, bare, domain


def _unquote(local: str) -> str:
    r"""``"john \"jd\" doe"`` -> ``john "jd" doe`` (RFC 5321 quoted-string)."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _encoded(text: str) -> str:
    return "".join(_char(c) for c in text)


def _char(c: str) -> str:
    """A regex matching ``c`` literally (optionally backslash-escaped) or in an encoded form."""
    forms = [re.escape(c)]
    raw = c.encode("utf-8")
    for prefix in ("%", "=", r"\+"):
        forms.append("".join(f"{prefix}{b:02x}" for b in raw))
    forms.append(f"&#{ord(c)};")
    forms.append(f"&#x0*{ord(c):x};")
    forms.append(rf"\\u{ord(c):04x}")
    return r"(?:\\?(?:" + "|".join(forms) + "))"
