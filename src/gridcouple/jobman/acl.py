"""Who may connect: CIDR rules, first match wins (like xprmsrv's allow/deny lines).

::

    acl = ["deny 10.0.0.13/32", "allow 10.0.0.0/8", "allow 127.0.0.0/8"]

An address no rule matches is denied. IPv4 addresses seen as IPv6 (``::ffff:10.0.0.1``, on a
dual-stack listener) are matched as IPv4.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AclRule:
    """One line: ``allow`` or ``deny`` and a network."""

    allow: bool
    network: Network

    def __str__(self) -> str:
        return f"{'allow' if self.allow else 'deny'} {self.network}"


@dataclass(frozen=True)
class Acl:
    """An ordered list of rules; :meth:`check` applies the first that matches."""

    rules: tuple[AclRule, ...]

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Acl:
        """Rules from lines such as ``"allow 10.0.0.0/8"``; ValueError names the bad line."""
        rules = []
        for number, line in enumerate(lines):
            action, _, cidr = line.strip().partition(" ")
            if action not in ("allow", "deny"):
                raise ValueError(f"rule {number} ({line!r}): start with 'allow' or 'deny'")
            try:
                network = ipaddress.ip_network(cidr.strip(), strict=True)
            except ValueError as exc:
                raise ValueError(f"rule {number} ({line!r}): {exc}") from None
            rules.append(AclRule(action == "allow", network))
        return cls(tuple(rules))

    def check(self, address: str) -> tuple[bool, str]:
        """Whether ``address`` may connect, and the rule that said so (for the log)."""
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False, f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for rule in self.rules:
            if ip.version == rule.network.version and ip in rule.network:
                return rule.allow, f"rule '{rule}'"
        return False, "no rule matches it"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where plain HTTP is allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
