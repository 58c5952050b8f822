"""The READMEs say what the code does: first mail, reply codes, HTTP answers, DNS, ports, links.

Each check compares a README with the code or tool output it describes, so the two cannot drift
apart unnoticed (a first run found all of these wrong once).
"""

from __future__ import annotations

import re
from pathlib import Path

from common import smtpreplies
from devtools import stack
from tests.infra.repo import MODULES, ROOT

README = (ROOT / "README.md").read_text()
READMES = [ROOT / "README.md", *(m.path / "README.md" for m in MODULES), ROOT / "tests" / "infra" / "README.md"]


def _commands(text: str) -> list[str]:
    """Shell commands of a text: continuation lines joined, white space folded."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip().startswith(("swaks ", "curl "))]


def test_the_first_mail_is_what_mailer_up_prints() -> None:
    start = README.index("Send a first mail")
    block = README[README.index("```sh", start) : README.index("```\n", README.index("```sh", start) + 5)]
    banner = stack._banner(stack.Stack(Path("run"), ports=dict(stack.DEFAULT_PORTS)))
    assert _commands(block) == _commands(banner)
    assert len(_commands(block)) == 2


def test_the_mx_record_has_the_preference_the_dkim_tool_prints() -> None:
    tool = (ROOT / "Transformer" / "transformer" / "dkimtool.py").read_text()
    (preference,) = set(re.findall(r"IN MX (\d+)", tool))
    assert set(re.findall(r"IN MX\s+(\d+)", README)) == {preference} == {"10"}


def _full_queue_replies() -> list[str]:
    """The SMTP replies Receiver and MxServer give when a queue is over its limit."""
    receiver = (ROOT / "Receiver" / "receiver" / "handler.py").read_text()
    mxserver = (ROOT / "MxServer" / "mxserver" / "handler.py").read_text()
    constants = {name: value[:9] for name, value in vars(smtpreplies).items() if isinstance(value, str)}
    named = [constants[n] for n in re.findall(r"except QueueFullError.*?return replies\.([A-Z_]+)", receiver, re.S)[:1]]
    return [
        *named,
        *re.findall(r'except QueueFullError.*?return "(\d{3} \d\.\d\.\d)', receiver, re.S)[:1],
        *re.findall(r'cause == "queue-full":\s*return f"(\d{3} \d\.\d\.\d)', mxserver),
        *[constants[n] for n in re.findall(r"queue-full.*?replies\.([A-Z_]+)", mxserver, re.S)[:1]],
    ]


def test_every_document_gives_the_full_queue_reply_the_code_gives() -> None:
    assert _full_queue_replies() == ["452 4.3.1", "452 4.3.1"]  # Receiver, MxServer
    documents = [
        *READMES,
        ROOT / "configs" / "inboxbooster-mailer-global.yaml",
        ROOT / "Grafana" / "prometheusRule.yaml",
    ]
    mentions = 0
    for path in documents:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "max-queue-length" in line:
                window = " ".join(lines[max(i - 1, 0) : i + 2])
                if re.search(r"\b4\d\d(?: \d\.\d\.\d|/)", window):  # an SMTP reply is named
                    mentions += 1
                    assert "452 4.3.1" in window and "451/" not in window, f"{path.relative_to(ROOT)}:{i + 1}"
    assert mentions >= 4


def test_the_readme_lists_every_http_answer() -> None:
    intake = (ROOT / "HttpReceiver" / "httpreceiver" / "intake.py").read_text()
    codes = set(re.findall(r"^(\d{3})\s{2,}", intake, re.M))
    assert {"401", "413", "415", "429", "503"} <= codes
    section = README[README.index("## Submitting mail") : README.index("## Events")]
    listed = set(re.findall(r"^\| `(\d{3})` \|", section, re.M))
    assert codes - listed == set()


def test_no_readme_cites_a_file_that_is_not_in_the_repository() -> None:
    for path in READMES:
        text = path.read_text()
        assert "DESIGN" not in text, path.relative_to(ROOT)  # the design notes live outside the repository
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"


def test_the_readme_says_how_to_run_on_other_ports() -> None:
    assert f"{stack.PORT_OFFSET_VARIABLE}=1000 ./mailer up" in README
    assert "--run-dir" in README


def test_the_readme_says_why_the_demo_unsubscribe_is_not_one_click() -> None:
    assert "https" in README[README.index("That unsubscribe URL is plain http") :][:600]
    assert "transformer.unsubscribe-url" in README
