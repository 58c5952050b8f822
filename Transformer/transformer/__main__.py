"""Transformer: sign submitted mail (DKIM, Message-ID, Feedback-ID, List-Unsubscribe) for Postfix.

Consumes the P0 and P1 queues, produces INCOMING-TO-POSTFIX (see transformer.app).
"""

from __future__ import annotations

from common.service import ServiceSpec, run_service
from transformer.app import build
from transformer.handler import SERVICE

SPEC = ServiceSpec(SERVICE, __doc__, build)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``transformer`` console script."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
