"""BackData: posts events from the event queue to the customer's webhook.

``backdata replay`` is an alias of ``mailer-queue replay EVENT_QUEUE`` (see backdata.commands).
"""

from __future__ import annotations

from backdata import SERVICE
from backdata.commands import add_arguments, replay
from backdata.service import build
from common.service import ServiceSpec, run_service

SPEC = ServiceSpec(SERVICE, __doc__, build, arguments=add_arguments, early=replay)


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT (exit 0), or the ``replay`` alias."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
