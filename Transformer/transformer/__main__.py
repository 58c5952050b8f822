"""Transformer: sign submitted mail (DKIM, Message-ID, Feedback-ID, List-Unsubscribe) for Postfix.

Consumes the P0 and P1 queues, produces INCOMING-TO-POSTFIX (see transformer.app).
"""

from __future__ import annotations

import sys

from common import cli, logs
from common.errors import ConfigError
from common.lifecycle import Stopper
from transformer import app

SERVICE = "transformer"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``transformer`` console script."""
    args = cli.parser(SERVICE, __doc__).parse_args(argv)
    config = cli.load(args, SERVICE)
    logs.setup(SERVICE, args.log_level)
    stopper = Stopper().install()
    try:
        app.run(config, stopper)
    except ConfigError as exc:
        sys.stderr.write(f"{SERVICE}: invalid configuration:\n")
        for line in exc.problems:
            sys.stderr.write(f"  {line}\n")
        return cli.EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
