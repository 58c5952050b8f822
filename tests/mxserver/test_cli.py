"""``mxserver classify FILE… | -``: the MX's answers without Redis, one JSON object per line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.events import public
from devtools import mxcorpus, testing
from mxserver import cli
from mxserver.__main__ import main
from mxserver.classifier import records_of
from tests.mxserver.conftest import CLASSIFIER, CORPUS
from tests.mxserver.test_corpus import problems

NOW = 1_710_000_000


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Both configuration files of the test installation (secret, domains, own MTA name)."""
    directory = tmp_path_factory.mktemp("cli")
    return testing.write_configs(directory / "configs", testing.customer_config(directory, redis_port=1))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def command(configs: tuple[Path, Path], case: mxcorpus.Case, path: Path, *, sent: bool = True) -> list[str]:
    argv = ["classify", "--global-config-file", str(configs[0]), "--customer-config-file", str(configs[1])]
    for rcpt in case.rcpt:
        argv += ["--rcpt", rcpt]
    if sent:
        for uuid, recipients in case.records.items():
            argv += [item for r in sorted(recipients) for item in ("--sent", f"{uuid}:{r}")]
    return [*argv, "--now", str(NOW), str(path)]


def test_the_corpus_through_classify_gives_the_mx_answers(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With the envelope (--rcpt) and the Transformer's records (--sent), every corpus message
    # prints exactly the events the MX emits (as the webhook receives them), and they are the
    # corpus' expected ones; reports that do not verify print their readings, verified: false.
    # (The configuration is read once; test_console_script… runs the whole command.)
    settings, signer = cli._setup(cli.parser().parse_args(command(configs, mxcorpus.cases()[0], tmp_path)[1:]))
    for case in mxcorpus.cases():
        path = tmp_path / "mail.eml"
        path.write_bytes(case.raw)
        args = cli.parser().parse_args(command(configs, case, path)[1:])
        status = cli.classify_files(args.files, args, settings, signer, sys.stdout, sys.stderr)
        out, err = capsys.readouterr()
        lines = [json.loads(line) for line in out.splitlines()]
        assert status == 0, err
        outcome = CLASSIFIER.classify(case.rcpt, case.raw, records=records_of(case.records), now=NOW)
        if outcome.events:
            assert lines == [public(e.to_dict()) for e in outcome.events], case.name
            assert all(line["verified"] is True for line in lines)
            assert not problems(case, outcome), case.name
        else:
            assert all(line["verified"] is False for line in lines), case.name
            assert f"{path}: {case.kind}" in err, (case.name, err)


def test_without_records_every_reading_is_printed(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A redacted ARF cannot be verified without the record: its reading is printed, unverified.
    case = mxcorpus.load(CORPUS / "arf/comcast-full-arf-redacted-to.eml")
    path = tmp_path / "arf.eml"
    path.write_bytes(case.raw)
    status, lines, err = run(capsys, *command(configs, case, path, sent=False))
    assert status == 0
    assert [(line["event"], line["verified"], line["feedback_type"]) for line in lines] == [
        ("spam-report", False, "abuse")
    ]
    assert lines[0]["uuid"] == next(iter(case.records))
    assert "unverified (bad-tag)" in err
    # A bounce that names the bound recipient verifies through the report's own names.
    case = mxcorpus.load(CORPUS / "dsn/postfix-user-unknown.eml")
    path.write_bytes(case.raw)
    status, lines, _ = run(capsys, *command(configs, case, path, sent=False))
    assert [(line["recipient"], line["verified"], line["classification"]) for line in lines] == [
        ("jane.doe@example.org", True, "user-unknown")
    ]


def test_any_bounce_from_anywhere_can_be_read_without_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No configuration, no secret, no envelope: every recipient's classification, unverified.
    monkeypatch.setenv("INBOXBOOSTER_CONFIG_DIR", str(tmp_path / "none"))
    case = mxcorpus.load(CORPUS / "dsn-multi-recipient/exim-dsn-blocks-without-blank-lines.eml")
    path = tmp_path / "dsn.eml"
    path.write_bytes(case.raw)
    status, lines, _ = run(capsys, "classify", str(path))
    assert status == 0
    assert [(line["recipient"], line["classification"], line["verified"]) for line in lines] == [
        ("jan.dvorak@example.cz", "user-unknown", False),
        ("eva.svoboda@example.cz", "user-unknown", False),
        ("petra.novak@example.cz", "user-unknown", False),
    ]
    status, lines, err = run(capsys, "classify", str(tmp_path / "missing.eml"))
    assert status == 1 and "cannot read" in err


@pytest.mark.slow
def test_console_script_reads_stdin_and_refuses_a_bad_configuration(
    configs: tuple[Path, Path], tmp_path: Path, make_config: Callable[..., Any]
) -> None:
    case = mxcorpus.load(CORPUS / "dsn/gmail-no-such-user.eml")
    global_path, customer_path = configs
    argv = testing.service_command("mxserver", global_path, customer_path, "classify", "--rcpt", case.rcpt[0], "-")
    done = subprocess.run(argv, input=case.raw, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert (line["event"], line["recipient"], line["type"], line["verified"]) == (
        "bounce",
        "john.smith.4711@gmail.com",
        "hard",
        True,
    )
    bad = tmp_path / "bad-customer.yaml"
    bad.write_text(customer_path.read_text() + "\nunknown-section: 1\n")
    done = subprocess.run(
        testing.service_command("mxserver", global_path, bad, "classify", "-"),
        input=b"",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"unknown-section: unknown key" in done.stderr
