"""The bounce rules file (common/common/bounce-rules.yaml): every rule, its examples, its loading.

Every example of every rule must be classified by that rule -- so no earlier rule shadows it
and its patterns really match -- and the operator's rules (``mxserver.bounce-rules``) add to
or replace the shipped ones.  A broken rule stops the start with a message naming the file and
the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from common import bouncerules as rules
from common import bounces
from common.bouncerules import Rules
from common.config import Config
from common.config.mxserver import BounceRule
from common.errors import ConfigError

SHIPPED = rules.shipped()
EXAMPLES = [(rule.name, example) for rule in SHIPPED.rules for example in rule.examples]


def test_every_rule_has_an_example_and_a_known_classification() -> None:
    assert len(SHIPPED.rules) >= 20
    for rule in SHIPPED.rules:
        assert rule.examples, rule.name
        assert rule.classification in bounces.CLASSIFICATIONS, rule.name
    for guard in SHIPPED.never_suppress:
        assert guard.examples, guard.name
    assert {r.classification for r in SHIPPED.rules} >= {"sender-rejected", "smtputf8-unsupported", "expired"}


@pytest.mark.parametrize(("name", "example"), EXAMPLES, ids=[f"{n}:{e[:40]}" for n, e in EXAMPLES])
def test_each_example_is_classified_by_its_rule(name: str, example: str) -> None:
    rule = SHIPPED.rule_for(example)
    assert rule is not None and rule.name == name, f"{example!r} is taken by {rule.name if rule else None}"


def test_never_suppress_wins_over_a_dead_address_wording() -> None:
    # A 5.1.1 "User unknown" given in reply to MAIL FROM is about our sender: never suppress.
    for guard in SHIPPED.never_suppress:
        for example in guard.examples:
            reading = SHIPPED.read(example)
            assert not reading.verdict.suppress, example
    reading = SHIPPED.read("host mx.example.org said: 550 5.1.1 <x@example.org>: User unknown (in reply to RCPT TO)")
    assert reading.verdict.suppress


@pytest.mark.parametrize(
    ("reason", "kwargs", "expected"),
    [
        # The Status field decides the class over the quoted reply code, both ways.
        ("421 4.7.0 Too many messages from your host", {"status": "5.0.0"}, ("rate-limited", "hard", False)),
        ("550 5.1.1 user unknown", {"status": "4.0.0", "delayed": True}, ("user-unknown", "soft", False)),
        # A full mailbox without any code is soft; with a 5xx it is hard (and never suppresses).
        ("Mailbox full", {}, ("mailbox-full", "soft", False)),
        ("552 5.2.2 Mailbox full", {}, ("mailbox-full", "hard", False)),
        # No remote reply and the domain does not resolve: unroutable, even with a 5.x.x Status.
        ("Host or domain name not found", {"status": "5.4.4", "remote": False}, ("host-unknown", "unroutable", True)),
        ("550 5.1.2 Host unknown", {"remote": True}, ("host-unknown", "hard", True)),
        # A failed report with a 4.x.x status: the reporting MTA gave up.
        (
            "connect to mx.example.org[192.0.2.1]:25: Connection refused",
            {"status": "4.4.1", "expired": True},
            ("expired", "soft", False),
        ),
        # Sender rejections never suppress the recipient.
        (
            "550 5.1.1 <bounce-x@b.example>: Sender address rejected: User unknown",
            {},
            ("sender-rejected", "hard", False),
        ),
        # The text decides over a generic status.
        ("550 5.7.1 No such user!", {}, ("user-unknown", "hard", True)),
        ("554 5.3.0 mx.example.org_is_blocked", {}, ("blocked", "hard", False)),
        # A generic "Recipient address rejected" is a dead address only when the status does not
        # say the failure is about something else (policy, content, mail system, network).
        ("550 5.1.1 <a@b.example>: Recipient address rejected", {}, ("user-unknown", "hard", True)),
        ("550 <a@b.example>: Recipient address rejected: Not here", {}, ("user-unknown", "hard", True)),
        (
            "550 5.7.26 <a@b.example>: Recipient address rejected: Multiple authentication checks failed",
            {},
            ("auth-failure", "hard", False),
        ),
        ("551 5.7.1 <a@b.example>: Recipient address rejected: Delivery not authorized", {}, ("policy", "hard", False)),
        ("550 5.6.0 <a@b.example>: Recipient address rejected: Media error", {}, ("other", "hard", False)),
        ("554 5.3.0 <a@b.example>: Recipient address rejected: Internal error", {}, ("other", "hard", False)),
        # A generic Status field (X.0.0) says less than the status in the reply itself.
        (
            "550 5.7.26 <a@b.example>: Recipient address rejected: Multiple authentication checks failed",
            {"status": "5.0.0"},
            ("auth-failure", "hard", False),
        ),
        ("550 5.1.1 zzz", {"status": "5.0.0"}, ("user-unknown", "hard", True)),
        # Nothing known: the status, else "other".
        ("550 5.2.1 zzz", {}, ("mailbox-disabled", "hard", True)),
        ("550 5.7.0 zzz", {}, ("policy", "hard", False)),
        ("something odd", {}, ("other", "soft", False)),
    ],
)
def test_reading(reason: str, kwargs: dict[str, object], expected: tuple[str, str, bool]) -> None:
    verdict = SHIPPED.read(reason, **kwargs).verdict  # type: ignore[arg-type]
    assert (verdict.classification, verdict.type, verdict.suppress) == expected


def test_context_is_read_when_the_reason_says_nothing() -> None:
    reading = SHIPPED.read("550 5.0.0 failed", context="The recipient's mailbox is full.")
    assert reading.verdict.classification == "mailbox-full"
    reading = SHIPPED.read("550 user unknown", context="The recipient's mailbox is full.")
    assert reading.verdict.classification == "user-unknown"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{name: Bad Name, classification: other, patterns: [x], examples: [x]}", "rules[0] (Bad Name): name"),
        ("{name: a, classification: dead, patterns: [x], examples: [x]}", "unknown classification 'dead'"),
        ("{name: a, classification: other, patterns: ['('], examples: [x]}", "is not a regular expression"),
        ("{name: a, classification: other, patterns: [x], examples: [y]}", "example 'y' is matched by none"),
        ("{name: a, classification: other, patterns: [x]}", "examples: at least one is required"),
        ("{name: a, classification: other, patterns: [x], examples: [x], colour: red}", "colour: Extra inputs"),
    ],
)
def test_a_bad_rule_names_the_file_and_the_rule(tmp_path: Path, rule: str, message: str) -> None:
    path = write(tmp_path, f"version: 1\nrules:\n  - {rule}\n")
    with pytest.raises(ConfigError) as caught:
        rules.load(path)
    text = "\n".join(caught.value.problems)
    assert text.startswith(f"{path}: rules[0]"), text
    assert message in text, text


def test_other_problems_of_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        rules.load(write(tmp_path, "rules: [}"))
    assert "not valid YAML" in caught.value.problems[0]
    bad = "rules:\n  - {name: a, classification: other, patterns: [x], examples: [x]}\n" + (
        "  - {name: a, classification: other, patterns: [y], examples: [y]}\n"
        "status: {'1.1': nonsense, 'x': other}\nwithout-code: {other: maybe}\nextra: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        rules.load(write(tmp_path, bad))
    text = "\n".join(caught.value.problems)
    for expected in (
        "extra: unknown key",
        "name 'a' is used twice",
        "status.1.1: unknown classification",
        "status.x: expected",
        "without-code.other: expected hard, soft or unroutable",
    ):
        assert expected in text, text
    with pytest.raises(ConfigError, match="cannot read the bounce rules"):
        rules.load(tmp_path / "missing.yaml")


def test_operator_rules_extend_replace_and_remove() -> None:
    extra = [
        BounceRule.model_validate(
            {
                "name": "acme-gateway",
                "classification": "blocked",
                "patterns": ["ACME-GW-REJECT"],
                "examples": ["550 ACME-GW-REJECT user unknown"],
            }
        ),
        BounceRule.model_validate(
            {"name": "moved", "classification": "moved", "patterns": ["gone to"], "examples": ["gone to x@y"]}
        ),
        BounceRule.model_validate({"name": "policy", "enabled": False}),
    ]
    merged: Rules = rules.merge(SHIPPED, extra)
    # A new name is tried first: it wins over the shipped user-unknown wording.
    assert merged.read("550 ACME-GW-REJECT user unknown").verdict.classification == "blocked"
    # Same name replaces in place; enabled: false removes.
    assert merged.rule_for("551 gone to x@y") is not None
    assert merged.rule_for("551 has moved") is None or merged.rule_for("551 has moved").name != "moved"  # type: ignore[union-attr]
    assert "policy" not in [r.name for r in merged.rules]
    assert len(merged.rules) == len(SHIPPED.rules)


def test_operator_rules_come_from_the_customer_file(mx_config: Callable[..., Config]) -> None:
    from mxserver.classifier import settings_from_config

    rule = {"name": "acme", "classification": "blocked", "patterns": ["ACME-1"], "examples": ["ACME-1 no"]}
    settings = settings_from_config(mx_config({"bounce-rules": [rule]}))
    assert settings.rules.rules[0].name == "acme"
    assert settings.own_hosts == frozenset({"mta.example.test"})


def test_operator_rules_in_common_config_come_first_and_the_older_place_still_counts(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    from mxserver.classifier import settings_from_config

    common = {"name": "acme", "classification": "blocked", "patterns": ["ACME-1"], "examples": ["ACME-1 no"]}
    older = {"name": "acme-2", "classification": "blocked", "patterns": ["ACME-2"], "examples": ["ACME-2 no"]}
    config = make_config(
        {
            "common-config": {"bounce-rules": [common]},
            "mxserver": {"eml-directory": str(tmp_path / "eml"), "bounce-rules": [older]},
        },
        service="mxserver",
    )
    names = [r.name for r in settings_from_config(config).rules.rules]
    assert names[:2] == ["acme", "acme-2"]
    assert [r.name for r in rules.configured(config).rules] == names  # PostfixLog reads the same set


def test_a_bad_operator_rule_in_common_config_names_the_key(make_config: Callable[..., Config]) -> None:
    rule = {"name": "acme", "classification": "blocked", "patterns": ["ACME-1"], "examples": ["nothing"]}
    with pytest.raises(ConfigError) as caught:
        make_config({"common-config": {"bounce-rules": [rule]}}, service="postfixlog")
    text = "\n".join(caught.value.problems)
    assert "common-config.bounce-rules[0]: rule 'acme': example 'nothing' is matched by none of its patterns" in text


def test_a_bad_operator_rule_names_the_key(mx_config: Callable[..., Config]) -> None:
    rule = {"name": "acme", "classification": "blocked", "patterns": ["ACME-1"], "examples": ["nothing"]}
    with pytest.raises(ConfigError) as caught:
        mx_config({"bounce-rules": [rule]})
    text = "\n".join(caught.value.problems)
    assert "mxserver.bounce-rules[0]: rule 'acme': example 'nothing' is matched by none of its patterns" in text
