"""What an entry of a webhook allow-list may be (``--webhook-allow``,
``SPIRIT_WEBHOOK_ALLOW``): a host name, a ``*.suffix``, an IP address or a CIDR
network. Checked when the setting is read, so a typo is refused at start
instead of being kept as a host name that matches nothing. No aiohttp here:
handler processes read the setting too."""

from __future__ import annotations

import ipaddress
import re

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$", re.IGNORECASE)


def check_allow_entries(entries: list[str]) -> None:
    """Raises ValueError (the rest of a sentence after the value) for the first bad entry."""
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
            continue
        except ValueError:
            pass
        if not _HOST.match(entry) or entry.replace(".", "").isdigit():
            raise ValueError(f"has {entry!r}, which is not a host name, *.suffix, IP address or "
                             "CIDR network")
