"""The bounce rules: what the reason of a failed delivery means (classification, type, suppress).

One rule set for both places that read failures: MxServer's pure classification phase
(:mod:`mxserver.analysis`, asynchronous bounces) and PostfixLog (:func:`classify`: Postfix' status
lines and the replies to its injection).  A reason text, the report's Status and reply code go
in, a :class:`common.bounces.Verdict` comes out.  The rules are data --
``common/bounce-rules.yaml`` (format and order of evaluation in its header) -- loaded and
validated once by :func:`load`; a rule the operator adds or replaces in the customer file
(``common-config.bounce-rules``, and the older ``mxserver.bounce-rules``; model
:class:`common.config.mxserver.BounceRule`) is merged in by :func:`merge`, for both readers
(:func:`configured`).  A broken file is a :class:`common.errors.ConfigError` naming the file
and the rule.

The taxonomy itself (the classifications, which of them are a dead address) is
:mod:`common.bounces`.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import yaml
from pydantic import ValidationError

from common import bounces
from common.bounces import BounceType, Verdict
from common.config import Config
from common.config.mxserver import BounceRule
from common.errors import ConfigError

#: The rules shipped with the platform (next to this module).
RULES_FILE: Final = "bounce-rules.yaml"
_TYPES: Final = frozenset(("hard", "soft", "unroutable"))
_STATUS_KEY: Final = re.compile(r"^\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Rule:
    """One rule: any pattern found in a reason classifies it."""

    name: str
    classification: str
    patterns: tuple[re.Pattern[str], ...]
    examples: tuple[str, ...] = ()
    unroutable: bool = False
    without_code: BounceType | None = None
    suppress: bool = True
    yields_to_status: bool = False

    def matches(self, text: str) -> bool:
        """True when one of the patterns is found in ``text``."""
        return any(p.search(text) for p in self.patterns)

    @classmethod
    def from_model(cls, model: BounceRule) -> Rule:
        """A rule of a validated :class:`BounceRule`."""
        assert model.classification is not None  # the model requires it for enabled rules
        return cls(
            name=model.name,
            classification=model.classification,
            patterns=tuple(re.compile(p, re.IGNORECASE) for p in model.patterns),
            examples=tuple(model.examples),
            unroutable=model.unroutable,
            without_code=model.without_code,
            suppress=model.suppress,
            yields_to_status=model.yields_to_status,
        )


@dataclass(frozen=True)
class Guard:
    """A ``never-suppress`` entry: a reason it matches never suppresses the recipient."""

    name: str
    patterns: tuple[re.Pattern[str], ...]
    examples: tuple[str, ...] = ()

    def matches(self, text: str) -> bool:
        """True when one of the patterns is found in ``text``."""
        return any(p.search(text) for p in self.patterns)


@dataclass(frozen=True)
class Reading:
    """How one reason was read: the rule that hit (None: status or nothing) and the verdict."""

    verdict: Verdict
    rule: str | None


@dataclass(frozen=True)
class Rules:
    """The rule set of one process (picklable: it travels to the classifier workers)."""

    rules: tuple[Rule, ...]
    status: Mapping[str, str] = field(default_factory=dict)
    without_code: Mapping[str, BounceType] = field(default_factory=dict)
    never_suppress: tuple[Guard, ...] = ()
    source: str = RULES_FILE

    def rule_for(self, *texts: str) -> Rule | None:
        """The first rule matching the first of ``texts`` that any rule matches."""
        for text in texts:
            if not text:
                continue
            for rule in self.rules:
                if rule.matches(text):
                    return rule
        return None

    def by_status(self, status: str | None) -> str | None:
        """The classification of an enhanced status code (``5.1.1`` -> ``user-unknown``)."""
        if not status:
            return None
        _, subject, detail = status.split(".")
        return self.status.get(f"{subject}.{detail}")

    def read(
        self,
        reason: str,
        *,
        context: str = "",
        status: str | None = None,
        code: int | None = None,
        delayed: bool = False,
        expired: bool = False,
        remote: bool = True,
        permanent: bool | None = None,
    ) -> Reading:
        """Classify one failure.

        Args:
            reason: the reply / Diagnostic-Code (or the report's sentence about the recipient).
            context: the report's own text about this recipient (read when ``reason`` says nothing).
            status: the Status field (decides the class of the failure over ``code``).
            code: the SMTP reply code, when the reason carries one.
            delayed: a delay notice (``Action: delayed``): soft.
            expired: the reporting MTA gave up (failed with a 4.x.x status): soft, ``expired``.
            remote: a remote server answered (decides ``unroutable`` for rules that allow it).
            permanent: the report's own verdict when there is no status nor code (SES bounceType).
        """
        found_code, found_status = bounces.parse_reply(reason)
        code = code if code is not None else found_code
        status = status or found_status
        # A generic Status (X.0.0: OpenSMTPD, Exim) says less than the status in the reply itself.
        telling = status
        if status is None or status.split(".")[1] == "0":
            telling = found_status or bounces.parse_reply(context)[1] or status
        rule = self.rule_for(reason, context)
        if rule is not None and rule.yields_to_status and _beyond_the_address(telling):
            rule = None
        classification = rule.classification if rule else (self.by_status(telling) or _by_subject(telling))
        if expired and classification != "sender-rejected":
            classification = "expired"
        bounce_type = self._type(rule, classification, status, code, delayed, expired, remote, permanent)
        text = f"{reason}\n{context}"
        suppress = (
            bounce_type in ("hard", "unroutable")
            and classification in bounces.DEAD_ADDRESS
            and (rule is None or rule.suppress)
            and not any(guard.matches(text) for guard in self.never_suppress)
        )
        return Reading(Verdict(classification, suppress, bounce_type, status, code), rule.name if rule else None)

    def _type(
        self,
        rule: Rule | None,
        classification: str,
        status: str | None,
        code: int | None,
        delayed: bool,
        expired: bool,
        remote: bool,
        permanent: bool | None,
    ) -> BounceType:
        if delayed or expired or classification == "expired":
            return "soft"
        if rule is not None and rule.unroutable and not remote:
            return "unroutable"
        klass = status[0] if status else (str(code)[0] if code is not None else None)
        if klass == "5":
            return "hard"
        if klass == "4":
            return "soft"
        if permanent is not None:
            return "hard" if permanent else "soft"
        if rule is not None and rule.without_code is not None:
            return rule.without_code
        return self.without_code.get(classification) or self.without_code.get("default") or "hard"


#: What Postfix writes itself when no server could be reached: connection failures, DNS
#: failures, null MX.  A text with an SMTP reply code came from a remote server.
_NO_ROUTE: Final = re.compile(
    r"connect to |connection refused|connection timed out|no route to host|network is unreachable"
    r"|host or domain name not found|name service error|does not accept mail|null ?MX",
    re.IGNORECASE,
)


def classify(
    text: str,
    *,
    code: int | None = None,
    status: str | None = None,
    expired: bool = False,
    rules: Rules | None = None,
) -> Verdict:
    """Classify one failure Postfix reports (a status line's text or a reply) with ``rules`` (default: shipped).

    ``expired`` marks a message that ran out of queue lifetime (Postfix' ``status=expired``).  A
    4xx failure is soft (Postfix retries it); the type is ``unroutable`` when no remote server
    answered and the rule says the destination could not be found or reached.
    """
    found_code, found_status = bounces.parse_reply(text)
    klass = (status or found_status or str(code or found_code or ""))[:1]
    reading = (rules or shipped()).read(
        text,
        status=status or found_status,
        code=code if code is not None else found_code,
        expired=expired,
        delayed=klass == "4",
        remote=found_code is not None or not _NO_ROUTE.search(text),
    )
    return reading.verdict


#: Status subjects (RFC 3463) that say a failure is not about the address or the mailbox:
#: mail system (3), network and routing (4), content (6), security or policy (7).  Not protocol
#: (5): Microsoft answers a missing mailbox with 5.5.0 "Requested action not taken: mailbox
#: unavailable".
_NOT_THE_ADDRESS: Final = frozenset("3467")


def _beyond_the_address(status: str | None) -> bool:
    """True for an enhanced status about something other than the address or the mailbox.

    A generic wording ("Recipient address rejected: …") then tells nothing about the
    recipient: 5.7.26 "Recipient address rejected: Multiple authentication checks failed" is an
    authentication failure, not a dead address.
    """
    return status is not None and status.split(".")[1] in _NOT_THE_ADDRESS


def _by_subject(status: str | None) -> str:
    """The classification of a status no entry names: security or policy (X.7.Y), else other."""
    return "policy" if status is not None and status.split(".")[1] == "7" else "other"


# -- loading ------------------------------------------------------------------------------------


def load(path: Path | None = None, *, extra: Sequence[BounceRule] = ()) -> Rules:
    """The shipped rules (or those of ``path``) with the operator's ``extra`` rules merged in.

    Raises:
        ConfigError: the file is unreadable or a rule is invalid (one line per problem, naming
            the file and the rule).
    """
    if path is None:
        resource = importlib.resources.files("common").joinpath(RULES_FILE)
        text, where = resource.read_text(encoding="utf-8"), str(resource)
    else:
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read the bounce rules: {exc.strerror or exc}"]) from None
    return merge(parse(text, where), extra)


def configured(config: Config) -> Rules:
    """The shipped rules with the customer file's: ``common-config.bounce-rules``, then ``mxserver.bounce-rules``.

    Raises:
        ConfigError: the shipped file is broken.
    """
    customer = config.customer
    extra = [*customer.common_config.bounce_rules, *(customer.mxserver.bounce_rules if customer.mxserver else [])]
    return load(extra=extra) if extra else shipped()


@functools.cache
def shipped() -> Rules:
    """The shipped rules alone (loaded once per process)."""
    return load()


def parse(text: str, where: str) -> Rules:
    """Rules of one YAML document (``where`` names it in error messages).

    Raises:
        ConfigError: one line per problem.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{where}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: expected a mapping with 'rules'"])
    problems: list[str] = []
    unknown = set(data) - {"version", "rules", "status", "without-code", "never-suppress"}
    problems += [f"{where}: {key}: unknown key" for key in sorted(unknown)]
    rules = _rules(data.get("rules"), where, problems)
    guards = _guards(data.get("never-suppress") or [], where, problems)
    status = _status(data.get("status") or {}, where, problems)
    without_code = _without_code(data.get("without-code") or {}, where, problems)
    if problems:
        raise ConfigError(problems)
    return Rules(rules, status, without_code, guards, where)


def merge(base: Rules, extra: Iterable[BounceRule]) -> Rules:
    """``base`` with operator rules: same name replaces (or removes), a new name goes first."""
    rules = list(base.rules)
    first: list[Rule] = []
    for model in extra:
        names = [r.name for r in rules]
        if model.name in names:
            at = names.index(model.name)
            if model.enabled:
                rules[at] = Rule.from_model(model)
            else:
                del rules[at]
        elif model.enabled:
            first.append(Rule.from_model(model))
    return Rules(tuple(first + rules), base.status, base.without_code, base.never_suppress, base.source)


def _rules(raw: Any, where: str, problems: list[str]) -> tuple[Rule, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: rules: a non-empty list is required")
        return ()
    out: list[Rule] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        label = f"{where}: rules[{index}]" + (f" ({item.get('name')})" if isinstance(item, dict) else "")
        try:
            model = BounceRule.model_validate(item)
        except ValidationError as exc:
            problems.extend(f"{label}: {_message(err)}" for err in exc.errors(include_url=False))
            continue
        if model.name in seen:
            problems.append(f"{label}: name {model.name!r} is used twice")
        seen.add(model.name)
        if model.enabled:
            out.append(Rule.from_model(model))
    return tuple(out)


def _guards(raw: Any, where: str, problems: list[str]) -> tuple[Guard, ...]:
    out: list[Guard] = []
    for index, item in enumerate(raw if isinstance(raw, list) else [raw]):
        label = f"{where}: never-suppress[{index}]"
        if not isinstance(item, dict) or set(item) - {"name", "patterns", "examples"}:
            problems.append(f"{label}: expected name, patterns and examples")
            continue
        try:
            patterns = tuple(re.compile(str(p), re.IGNORECASE) for p in item.get("patterns") or [])
        except re.error as exc:
            problems.append(f"{label}: a pattern is not a regular expression: {exc}")
            continue
        examples = tuple(str(e) for e in item.get("examples") or [])
        guard = Guard(str(item.get("name", "")), patterns, examples)
        if not patterns or not examples:
            problems.append(f"{label}: patterns and examples are required")
        elif not all(guard.matches(e) for e in examples):
            problems.append(f"{label}: an example is matched by none of its patterns")
        out.append(guard)
    return tuple(out)


def _status(raw: Any, where: str, problems: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: status: expected a mapping of 'subject.detail' to a classification")
        return out
    for key, value in raw.items():
        if not _STATUS_KEY.match(str(key)):
            problems.append(f"{where}: status.{key}: expected 'subject.detail' such as '1.1'")
        elif value not in bounces.CLASSIFICATIONS:
            problems.append(f"{where}: status.{key}: unknown classification {value!r}")
        else:
            out[str(key)] = str(value)
    return out


def _without_code(raw: Any, where: str, problems: list[str]) -> dict[str, BounceType]:
    out: dict[str, BounceType] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: without-code: expected a mapping of classification to a type")
        return out
    for key, value in raw.items():
        if key != "default" and key not in bounces.CLASSIFICATIONS:
            problems.append(f"{where}: without-code.{key}: unknown classification")
        elif value not in _TYPES:
            problems.append(f"{where}: without-code.{key}: expected hard, soft or unroutable (got {value!r})")
        else:
            out[str(key)] = cast(BounceType, value)
    return out


def _message(err: Any) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function"))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
