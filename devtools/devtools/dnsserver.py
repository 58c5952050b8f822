"""A tiny authoritative DNS server on a loopback address for tests and benchmarks (UDP, dnspython).

Every name is NXDOMAIN except the ones given as records; nothing is forwarded anywhere.  A
private Postfix uses it through :attr:`postfixlog.instance.PostfixInstance.dns_server` (its own
resolv.conf in a mount namespace), PostfixLog through ``postfixlog.shaping.dns-servers``; the
DNS check of ``transformer-dkim check`` is tested against it on a free port of 127.0.0.1.
Records can be changed while it runs (:meth:`DnsServer.set`).  Names in answers are absolute
(``10 mx.example.test`` means ``mx.example.test.``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """Answers from ``records`` ({(name, type): [rdata text]}), NXDOMAIN for everything else."""

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]] | None = None,
        *,
        ttl: int = 60,
        address: str | None = None,
        port: int = 53,
    ) -> None:
        self.ttl = ttl
        self.records = {(n.rstrip(".").lower(), t.upper()): v for (n, t), v in (records or {}).items()}
        # By default a loopback address of its own: port 53 there is free even if something uses
        # 127.0.0.1:53 (binding port 53 needs root; port 0 picks a free port).
        self.address = address or f"127.53.{os.getpid() % 250 + 1}.{threading.get_ident() % 250 + 1}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, port))
        self.port: int = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(Exception):
                self.sock.sendto(self._answer(data), peer)

    def _answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        values = self.records.get((name, rdtype))
        if values and rdtype == "TXT":
            values = [v if v.startswith('"') else _quoted(v) for v in values]
        if values:
            # Names in answers are absolute ("mx.example.test" means "mx.example.test.").
            rrset = dns.rrset.from_text_list(
                question.name, self.ttl, "IN", rdtype, values, origin=dns.name.root, relativize=False
            )
            reply.answer.append(rrset)
        elif not any(n == name for n, _ in self.records):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()

    def set(self, name: str, rdtype: str, values: list[str] | None) -> None:
        """Publish (or, with None, remove) the records of one name and type while serving."""
        key = (name.rstrip(".").lower(), rdtype.upper())
        if values is None:
            self.records.pop(key, None)
        else:
            self.records[key] = values

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _quoted(value: str) -> str:
    """A TXT value as quoted character-strings of at most 255 octets (RFC 1035)."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


@contextlib.contextmanager
def dns_server(
    records: dict[tuple[str, str], list[str]] | None = None, *, address: str | None = None, port: int = 53
) -> Iterator[DnsServer]:
    """A running :class:`DnsServer`."""
    with DnsServer(records, address=address, port=port) as server:
        yield server
