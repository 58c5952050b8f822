"""One HTTP POST of a batch, and what its answer means for the events in it.

Only a 2xx answer delivers.  Everything else is classified:

* *transient* (the whole batch waits and is retried): no connection, timeout, 3xx (the URL
  should name the final endpoint; redirects are never followed, a POST must not become a GET),
  5xx, 408 and 429.  ``Retry-After`` (seconds or an HTTP date) is honoured, up to
  :data:`MAX_RETRY_AFTER_S`;
* *rejected* (any other 4xx): the endpoint refuses this body, possibly because of one event in
  it; the caller isolates the culprit by splitting the batch.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import requests

from backdata.signing import Signer

log = logging.getLogger(__name__)

USER_AGENT: Final = "Inboxbooster-Mailer-BackData/2.0"
#: A Retry-After longer than this is shortened to it (the event's age limit still applies).
MAX_RETRY_AFTER_S: Final = 3600.0
_TRANSIENT_4XX: Final = frozenset((408, 429))


@dataclass(frozen=True)
class PostResult:
    """Outcome of one POST."""

    ok: bool
    transient: bool
    reason: str
    status: int | None = None
    retry_after: float | None = None
    seconds: float = 0.0


class Poster:
    """POSTs JSON bodies to one URL over a kept-alive connection (one instance per thread)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        signer: Signer | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.signer = signer
        self.params = dict(params or {})
        self.session = requests.Session()
        # Proxy settings (HTTPS_PROXY, NO_PROXY…) are read once here, not on every request.
        self.session.proxies = requests.utils.get_environ_proxies(url)
        self.session.trust_env = False
        self.session.headers.update({"User-Agent": USER_AGENT, "Content-Type": "application/json; charset=utf-8"})

    def post(
        self,
        body: bytes,
        msg_id: str,
        *,
        params: Mapping[str, str] | None = None,
    ) -> PostResult:
        """Send ``body``; never raises for network or HTTP failures."""
        now = int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(now)}
        if self.signer is not None:
            headers["webhook-signature"] = self.signer.signature(msg_id, now, body)
        started = time.perf_counter()
        try:
            response = self.session.post(
                self.url,
                data=body,
                headers=headers,
                params={**self.params, **(params or {})} or None,
                timeout=(self.timeout_s, self.timeout_s),
                allow_redirects=False,
            )
        except requests.Timeout:
            return PostResult(False, True, f"timed out after {self.timeout_s:g}s", seconds=_since(started))
        except requests.ConnectionError as exc:
            return PostResult(False, True, f"connection failed: {_short(exc)}", seconds=_since(started))
        except requests.RequestException as exc:
            return PostResult(False, True, f"request failed: {_short(exc)}", seconds=_since(started))
        return classify(response.status_code, response.headers, response.text, _since(started))


def classify(status: int, headers: Mapping[str, str], text: str, seconds: float = 0.0) -> PostResult:
    """Meaning of an HTTP answer (see the module docstring)."""
    if 200 <= status < 300:
        return PostResult(True, False, f"HTTP {status}", status, seconds=seconds)
    snippet = " ".join(text[:200].split())
    reason = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    retry_after = parse_retry_after(headers.get("Retry-After"))
    transient = status < 400 or status >= 500 or status in _TRANSIENT_4XX
    if 300 <= status < 400:
        reason += f" (redirect to {headers.get('Location', '?')}; configure the final URL)"
    return PostResult(False, transient, reason, status, retry_after, seconds)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _since(started: float) -> float:
    return time.perf_counter() - started


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."
