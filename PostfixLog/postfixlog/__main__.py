"""PostfixLog: feed the private Postfix from INCOMING-TO-POSTFIX and turn its log into events.

Console script ``postfixlog``; SIGTERM/SIGINT stop consuming, stop Postfix, requeue what it
still holds, and exit 0 (see :mod:`postfixlog.service`).
"""

from __future__ import annotations

from common.service import ServiceSpec, run_service
from postfixlog.service import SERVICE, build

SPEC = ServiceSpec(SERVICE, __doc__, build)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``postfixlog`` console script."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
