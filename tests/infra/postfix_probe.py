"""Run by test_postfix_privileges.py under ``setpriv``: start a private Postfix, relay one mail.

Usage: postfix_probe.py DIRECTORY.  Prints ``delivered`` and exits 0 when the mail reached the sink.
"""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

from devtools.servers import free_port, wait_until
from devtools.sink import Sink
from postfixlog.instance import PostfixInstance


def main() -> int:
    with Sink() as sink:
        port = free_port()
        instance = PostfixInstance(Path(sys.argv[1]), smtpd_port=port, nexthop=f"[127.0.0.1]:{sink.port}")
        instance.start()
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.test", timeout=10) as smtp:
                smtp.sendmail("a@example.test", ["ok1@dest.test"], b"Subject: probe\r\n\r\nhi\r\n")
            wait_until(lambda: len(sink.messages) == 1, 30, what="delivery through Postfix")
        finally:
            instance.stop()
    sys.stdout.write("delivered\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
