"""Phase 2 of classifying a received mail: which recipient it is about, proven, and its events.

Runs in the event loop after :mod:`mxserver.analysis` (phase 1, in a worker process) has
recognised the report and collected its tagged values.  The caller fetches the Transformer's
records (``IB:sent:<uuid>``, :mod:`common.binding`) for :func:`uuids` in one pipelined Redis
round trip; :func:`verify` then checks the HMAC of every tag against them and decides:

* **no tag verifies** (none found, forged, of another installation, record gone and no name in
  the report matches) -> ``unverified``;
* **tags disagree** (another uuid, or another recipient of the same uuid) -> ``unverified``;
* an unsubscribe mail: one event per verified envelope address;
* otherwise the bound recipient ``R`` must be named by the report, when the report names
  anyone: the report's block (DSN recipient, ARF ``Original-Rcpt-To``, SES recipient, text
  bounce address) naming ``R`` gives the event -- the first failed one, else the first
  delayed one; if every block names somebody else -> ``unverified``; redacted or missing names
  are no mismatch.

Exactly one event per bound recipient.  Its ``recipient`` is always ``R``; what the report
itself says goes into ``final_recipient`` / ``reported_recipient``.  Event ids are stable per
(report, bound recipient), so a report delivered twice yields the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from common.addressing import AddressSigner
from common.binding import Binding, Sent, resolve
from common.events import Event, make_event_id
from mxserver import mime
from mxserver.analysis import Analysis, Finding
from mxserver.tags import Found

SERVICE: Final = "mxserver"

Outcome_Kind = Literal[
    "unsubscribe", "spam-report", "bounce", "deferred", "autoreply", "own-report", "unclassified", "unverified"
]
#: Why a report did not verify (label of ``mailer_mxserver_unverified_total``).
Reason = Literal["no-tag", "bad-tag", "conflicting-tags", "recipient-mismatch", "timeout", ""]
REASONS: Final[tuple[str, ...]] = ("no-tag", "bad-tag", "conflicting-tags", "recipient-mismatch", "timeout")


@dataclass(frozen=True)
class Outcome:
    """What one received mail produced."""

    kind: Outcome_Kind
    events: tuple[Event, ...] = ()
    report: str = ""
    #: Why it did not verify (``kind == "unverified"``).
    reason: Reason = ""
    note: str = ""

    @property
    def uuids(self) -> list[str]:
        """The uuids of the events (for logs)."""
        return sorted({e.uuid for e in self.events if e.uuid})

    @property
    def kept(self) -> bool:
        """True when the mail goes to the eml store (no event, and not our own report)."""
        return not self.events and self.kind != "own-report"


def uuids(analysis: Analysis) -> list[str]:
    """The uuids whose records verification needs."""
    return sorted({f.tagged.uuid for f in analysis.tags})


def verify(
    analysis: Analysis,
    records: Mapping[str, Sequence[Sent]],
    signer: AddressSigner,
    *,
    now: int,
) -> Outcome:
    """Phase 2 for one mail (see the module docstring)."""
    if analysis.kind in ("unclassified", "own-report"):
        return Outcome(analysis.kind, report=analysis.report, note=analysis.note)
    bound: list[tuple[Found, Binding]] = []
    for found in analysis.tags:
        binding = resolve(signer, found.tagged, records.get(found.tagged.uuid, ()), analysis.candidates)
        if binding is not None:
            bound.append((found, binding))
    if analysis.kind == "unsubscribe":
        return _unsubscribe(analysis, bound, now)
    verified = {id(found) for found, _ in bound}
    if any(f.source == "envelope" and id(f) not in verified for f in analysis.tags):
        # A genuine MTA sends its report to the exact return path: a forged envelope tag makes
        # the whole report suspect, whatever genuine values it quotes.
        return _unverified(analysis, "bad-tag", "the address the report was sent to has a tag that does not verify")
    if not bound:
        reason: Reason = "bad-tag" if analysis.tags else "no-tag"
        return _unverified(analysis, reason, "no tag of ours verifies" if analysis.tags else "no tag of ours")
    distinct = {(b.uuid, _norm(b.recipient)) for _, b in bound}
    if len(distinct) > 1:
        return _unverified(analysis, "conflicting-tags", f"tags of {len(distinct)} different copies")
    found, binding = bound[0]
    if not analysis.complaint:
        return Outcome("unclassified", report=analysis.report, note=analysis.note)
    chosen = _choose(analysis.findings, binding.recipient)
    if chosen is None:
        return _unverified(analysis, "recipient-mismatch", "the report names other recipients than the bound one")
    event = make_event(analysis, chosen, found, binding, now)
    kind: Outcome_Kind = "deferred" if event.event == "deferred" else analysis.kind
    return Outcome(kind, (event,), report=analysis.report)


def _unsubscribe(analysis: Analysis, bound: list[tuple[Found, Binding]], now: int) -> Outcome:
    events: list[Event] = []
    seen: set[tuple[str, str]] = set()
    finding = analysis.findings[0] if analysis.findings else Finding("unsubscribe")
    for found, binding in bound:
        key = (binding.uuid, _norm(binding.recipient))
        if found.source != "envelope" or key in seen:
            continue
        seen.add(key)
        events.append(make_event(analysis, finding, found, binding, now))
    if not events:
        return _unverified(analysis, "bad-tag", "unsubscribe address whose tag does not verify")
    return Outcome("unsubscribe", tuple(events), report=analysis.report)


def _choose(findings: Sequence[Finding], recipient: str) -> Finding | None:
    """The finding about ``recipient``; None when the report names only others."""
    if not findings:
        return None
    wanted = _norm(recipient)
    matching = [f for f in findings if any(_norm(n) == wanted for n in f.names)]
    if not matching:
        if any(f.names for f in findings):
            return None
        matching = list(findings)
    return next((f for f in matching if f.event != "deferred"), matching[0])


def make_event(analysis: Analysis, finding: Finding, found: Found, binding: Binding, now: int) -> Event:
    """The event for ``finding`` about the bound recipient."""
    fields = dict(finding.fields)
    report = fields.pop("report", analysis.report)
    rule = fields.pop("rule", None)
    reported = fields.pop("reported_recipient", None)
    extra: dict[str, Any] = {"verified": True, "report": report, "attribution": found.source}
    if finding.event in ("bounce", "deferred") and finding.final_recipient:
        extra["final_recipient"] = finding.final_recipient
    if finding.event == "spam-report" and finding.final_recipient:
        reported = reported or finding.final_recipient
    if reported:
        extra["reported_recipient"] = reported
    if rule:
        extra["rule"] = rule
    for name in ("feedback_type", "user_agent", "source"):
        if name in fields:
            extra[name] = fields.pop(name)
    bounce_type = fields.get("type")
    kind_key = f"{finding.event}:autoreply" if bounce_type == "autoreply" else finding.event
    return Event(
        event=finding.event,
        uuid=binding.uuid,
        event_id=make_event_id(SERVICE, kind_key, binding.uuid, _norm(binding.recipient), analysis.report_key),
        timestamp=now,
        recipient=binding.recipient,
        stream_id=binding.stream_id,
        ip=fields.get("ip"),
        type=bounce_type,
        reason=fields.get("reason"),
        status=fields.get("status"),
        classification=fields.get("classification"),
        suppress=fields.get("suppress"),
        email=binding.recipient if finding.event == "spam-report" else None,
        fd=binding.from_domain or analysis.from_domain,
        extra=extra,
    )


def readings(analysis: Analysis, *, now: int) -> list[dict[str, Any]]:
    """What the report says about each recipient, unverified (``mxserver classify``)."""
    uuid = analysis.tags[0].tagged.uuid if analysis.tags else None
    out = []
    for finding in analysis.findings:
        fields = {k: v for k, v in finding.fields.items() if v is not None}
        record: dict[str, Any] = {"event": finding.event, "uuid": uuid, "timestamp": now}
        if finding.final_recipient:
            record["recipient"] = finding.final_recipient
            if finding.event in ("bounce", "deferred"):
                record["final_recipient"] = finding.final_recipient
            else:
                record["reported_recipient"] = finding.final_recipient
        record.update(fields)
        record.setdefault("report", analysis.report)
        record["verified"] = False
        out.append(record)
    return out


def _unverified(analysis: Analysis, reason: Reason, note: str) -> Outcome:
    return Outcome("unverified", report=analysis.report, reason=reason, note=note)


def _norm(address: str) -> str:
    """An address for comparison: decoded, without brackets and quotes, lower case."""
    return mime.decode_words(address).strip().strip("<>").replace('"', "").lower()
