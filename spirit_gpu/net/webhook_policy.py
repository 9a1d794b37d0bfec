"""Where a webhook may go: the one policy the gateway and the worker both apply.

A webhook URL comes from a client; whoever POSTs to it does so with its own
network position. So, by default:

* never to one of our own listeners: the gateway's own host:port (a webhook to
  ``/agent/<sid>/apis/v1/proxy/register`` once registered a rogue worker), and
  never to an agent path (``/agent/<sid>/apis/...``) on any host; a worker
  refuses its agent's host:port except for the gateway's webhook relay path;
* never to link-local, metadata, multicast or unspecified addresses
  (169.254.0.0/16 with 169.254.169.254, fe80::/10, fd00:ec2::254,
  100.100.100.200, 0.0.0.0/8, 224.0.0.0/4, ff00::/8, ...);
* other loopback ports and private addresses stay allowed (local development).

``allow`` (``--webhook-allow`` / ``SPIRIT_WEBHOOK_ALLOW``, comma-separated host
names, ``*.example.com`` suffixes, IP addresses or CIDR networks) restricts
targets to those; an allow-listed network is the one way to reach a link-local
address. A host name is resolved and every address it gives is checked;
``PolicyResolver`` checks again the addresses a connection is made to, so a
name that resolves to something else on the second look gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REFUSED_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local, cloud metadata (169.254.169.254)
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "0.0.0.0/8",           # "this network": reaches local listeners on Linux
    "224.0.0.0/4",         # multicast
    "255.255.255.255/32",  # broadcast
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS metadata over IPv6
    "ff00::/8",            # IPv6 multicast
    "::/128",              # unspecified
))
# /agent/<sid>/apis/...: the gateway's worker-facing API, whatever host serves it
AGENT_PATH = re.compile(r"^/agent/[^/]*/apis(/|$)")


class WebhookRefused(OSError):
    """The policy refuses this target (raised by ``PolicyResolver``)."""


def _addr(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def is_local(ip: IPAddress) -> bool:
    """An address of this machine: loopback, or one a socket can bind to."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class WebhookPolicy:
    """``own``: (host, port) of our listeners; ``relay_prefix``: the one path allowed on
    them (a worker's agent: the gateway's webhook relay); ``allow``: the allow-list."""

    allow: tuple[str, ...] = ()
    own: tuple[tuple[str, int], ...] = ()
    relay_prefix: str = ""
    _networks: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False)
    _names: tuple[str, ...] = field(default=(), init=False, repr=False)
    # (host, port, relay) -> (until, refusal): each accept and each webhook try asks,
    # and deciding anew parsed addresses and scanned networks every time
    _decided: dict[tuple[str, int, bool], tuple[float, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks: list[IPNetwork] = []
        names: list[str] = []
        for entry in self.allow:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.append(entry.rstrip("."))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_names", tuple(names))

    @classmethod
    def for_gateway(cls, host: str, port: int, allow: list[str] | tuple[str, ...] = ()
                    ) -> WebhookPolicy:
        return cls(allow=tuple(allow), own=((host, port),))

    @classmethod
    def for_worker(cls, agent_url: str, allow: list[str] | tuple[str, ...] = ()
                   ) -> WebhookPolicy:
        try:
            agent = URL(agent_url)
            own = ((agent.host or "", agent.port or 80),) if agent.host else ()
            prefix = agent.path.rstrip("/") + "/apis/v1/webhook/"
        except ValueError:
            own, prefix = (), ""
        return cls(allow=tuple(allow), own=own, relay_prefix=prefix)

    # ---- checks ----------------------------------------------------------------------

    def syntax_refusal(self, url: URL) -> str:
        """What can be said without resolving: scheme, host, agent paths, allow-list names."""
        if url.scheme not in ("http", "https") or not url.host:
            return "webhook must be an http(s) URL with a host"
        if AGENT_PATH.match(url.path) and not self.is_relay(url):
            return "webhook must not point at an agent API path (/agent/<sid>/apis/...)"
        return ""

    def is_relay(self, url: URL) -> bool:
        """The gateway's webhook relay (a worker's agent), which passes calls on."""
        return bool(self.relay_prefix) and url.path.startswith(self.relay_prefix)

    def address_refusal(self, ip: IPAddress, port: int, own_addresses: list[tuple[IPAddress, int]],
                        relay: bool = False) -> str:
        allowed_net = any(ip in net for net in self._networks if net.version == ip.version)
        if not allowed_net and any(ip in net for net in REFUSED_NETWORKS
                                   if net.version == ip.version):
            return (f"webhook address {ip} is link-local, metadata, multicast or unspecified "
                    "(allow it with SPIRIT_WEBHOOK_ALLOW)")
        if not relay:
            for own_ip, own_port in own_addresses:
                if port == own_port and (ip == own_ip or (is_local(own_ip) and is_local(ip))):
                    return f"webhook must not point at this gateway's own listener ({ip}:{port})"
        return ""

    def _name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == n or (n.startswith("*.") and host.endswith(n[1:]))
                   for n in self._names)

    async def own_addresses(self) -> list[tuple[IPAddress, int]]:
        out: list[tuple[IPAddress, int]] = []
        for host, port in self.own:
            out.extend((ip, port) for ip in await resolve(host, port))
        return out

    async def refusal(self, url: URL | str) -> str:
        """"" if a webhook may go to ``url``, else why not (one line for the client)."""
        try:
            url = URL(url) if isinstance(url, str) else url
        except ValueError as exc:
            return f"webhook is not a valid URL: {exc}"
        why = self.syntax_refusal(url)
        if why:
            return why
        host, port = url.host or "", url.port or (443 if url.scheme == "https" else 80)
        if self._name_allowed(host):
            # the operator named it: not resolved here; the connection's resolver
            # (PolicyResolver) still refuses forbidden addresses and own listeners
            return ""
        relay = self.is_relay(url)
        key = (host.lower(), port, relay)
        kept = self._decided.get(key)
        now = time.monotonic()
        if kept is not None and kept[0] > now:
            return kept[1]
        why = await self._address_refusal(host, port, relay)
        if len(self._decided) >= _DECIDED_MAX:
            self._decided.clear()
        # kept as long as the answers it rests on (a new listener makes a new policy)
        self._decided[key] = (now + ANSWER_TTL, why)
        return why

    async def _address_refusal(self, host: str, port: int, relay: bool) -> str:
        addresses = await resolve(host, port)
        own = await self.own_addresses()
        for ip in addresses:
            why = self.address_refusal(ip, port, own, relay)
            if why:
                return why
        if self.allow and not (addresses and all(
                any(ip in net for net in self._networks if net.version == ip.version)
                for ip in addresses)):
            return f"webhook host {host} is not in the allow-list (SPIRIT_WEBHOOK_ALLOW)"
        return ""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` stands for ([] when it does not resolve: the connection
    attempt then fails on its own). Answers are kept ``ANSWER_TTL`` s (``_answers``)."""
    literal = _addr(host.strip("[]"))
    if literal is not None:
        return [literal]
    return await _answers.get(host, port)


async def _lookup(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = _addr(str(sockaddr[0]))
        if ip is not None and ip not in out:
            out.append(ip)
    return out


# as long as aiohttp's connector keeps a DNS answer (ttl_dns_cache): the connection
# checks again what it really resolves (PolicyResolver), so a kept answer decides no
# more than the accept's early "400, why"
ANSWER_TTL = 10.0
_DECIDED_MAX = 1024


class _Answers:
    """Host-name answers for ``ANSWER_TTL`` s, one lookup at a time per name.

    Without it every request naming a webhook host waited for a lookup of its own
    before being accepted (milliseconds, and a thread of the loop's executor, each),
    and so did every webhook try."""

    def __init__(self, ttl: float, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._kept: dict[tuple[str, int], tuple[float, asyncio.Task[list[IPAddress]]]] = {}

    async def get(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        key = (host.lower(), port)
        kept = self._kept.get(key)
        if kept is None or kept[0] <= loop.time() or kept[1].get_loop() is not loop:
            self._kept.pop(key, None)
            if len(self._kept) >= self.size:
                del self._kept[next(iter(self._kept))]
            # a task of its own: a caller that gives up does not end the others' lookup
            kept = (loop.time() + self.ttl, loop.create_task(_lookup(host, port)))
            self._kept[key] = kept
        return list(await asyncio.shield(kept[1]))


_answers = _Answers(ANSWER_TTL)


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, refusing addresses the policy never allows (checked on what
    the connection really uses: a DNS answer that changed since the check is caught).

    ``policy`` is read at each resolution (a gateway learns its listeners as it goes).
    ``own``: refuse our own listeners here too (the gateway: no path is ever allowed
    on them); a worker's relay path is allowed on its agent, so it checks before.
    """

    def __init__(self, policy: Callable[[], WebhookPolicy], own: bool = False) -> None:
        self.policy = policy
        self.own = own
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        policy = self.policy()
        own = await policy.own_addresses() if self.own else []
        for result in results:
            ip = _addr(str(result["host"]))
            if ip is None:
                continue
            why = policy.address_refusal(ip, port, own)
            if why:
                raise WebhookRefused(why)
        return results

    async def close(self) -> None:
        await self._inner.close()

