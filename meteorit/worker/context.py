"""Request context: what `events.context` adds to each record of a request.

Owns: the `context` object (`ip`, `user_agent`, `referer`, `origin`, as configured), the
client's IP address behind trusted proxies (`server.trusted_proxies` and X-Forwarded-For),
and the caps on each value. Must not touch: sockets (the HTTP layer gives the peer
address), keys, Redis.

The IP: the peer's address, unless the peer is a trusted proxy; then X-Forwarded-For is
read from the right (the hop the proxy itself added) to the left, past every trusted proxy,
and the first address that is not one is the client. Reading from the left would take the
address a client wrote itself, as anyone can send X-Forwarded-For. A hop that is not an
address ends the walk at the last address known; so does MAX_HOPS.

In the record: `context` is the server's. A client's own `context` object is kept, with the
server's values written over its keys of the same name (so a client cannot forge its ip);
a `context` that is not an object is refused (400), as meteorit cannot add to it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..values import UNIX_PEER
from ..errors import EventError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Longest value kept for each field, in characters: a client controls all but the ip.
CAPS = {"ip": 45, "user_agent": 512, "referer": 2048, "origin": 256}
HEADERS = {"user_agent": b"user-agent", "referer": b"referer", "origin": b"origin"}
FORWARDED_FOR = b"x-forwarded-for"
MAX_HOPS = 16  # X-Forwarded-For entries looked at, from the right


class RequestContext:
    """The `events.context` fields of one config; build one object per request."""

    __slots__ = ("fields", "networks", "trust_unix", "headers_needed")

    def __init__(self, fields: list[str], trusted_proxies: list[str]) -> None:
        self.fields = list(fields)
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False)
                                        for n in trusted_proxies if n != UNIX_PEER]
        self.trust_unix = UNIX_PEER in trusted_proxies
        needed = {HEADERS[f] for f in fields if f in HEADERS}
        if "ip" in fields and (self.networks or self.trust_unix):
            needed.add(FORWARDED_FOR)
        self.headers_needed = frozenset(needed)  # what the HTTP layer must keep for us

    def build(self, peer: str | None, headers: dict[bytes, bytes]) -> dict[str, str]:
        """The context of one request: each configured field that has a value, capped."""
        context: dict[str, str] = {}
        for field in self.fields:
            if field == "ip":
                value = self.client_ip(peer, headers.get(FORWARDED_FOR))
            else:
                raw = headers.get(HEADERS[field])
                value = None if raw is None else raw.decode("utf-8", "replace")
            if value:
                context[field] = value[:CAPS[field]]
        return context

    def client_ip(self, peer: str | None, forwarded_for: bytes | None) -> str | None:
        if peer is None:  # a unix socket: the peer is a process of this host
            if not self.trust_unix or forwarded_for is None:
                return None
            known: Address | None = None
        else:
            known = _address(peer)
            if known is None or forwarded_for is None or not self._trusted(known):
                return peer if known is None else str(known)
        for hop in reversed(forwarded_for.split(b",")[-MAX_HOPS:]):
            address = _address(hop.strip().decode("latin-1"))
            if address is None:
                break
            known = address
            if not self._trusted(address):
                break
        return None if known is None else str(known)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def attach(events: list[dict[str, Any]], context: dict[str, str]) -> None:
    """Put `context` into every event of a request (EventError 400 for one whose own
    `context` is not an object)."""
    for index, event in enumerate(events):
        own = event.get("context")
        if own is None:
            event["context"] = context
        elif type(own) is dict:
            event["context"] = {**own, **context}
        else:
            raise EventError(400, "\"context\" must be an object (meteorit adds the request's to it)", index)


def _address(text: str) -> Address | None:
    """An IP address, IPv4-mapped IPv6 ones as IPv4; None when `text` is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
