"""Where a webhook may go: only to public (globally reachable) addresses, resolved once per attempt and
connected to exactly as checked (no second DNS lookup a rebinding name could answer differently),
with the Host header, TLS SNI and certificate checked against the URL's own host name."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from requests.certs import where as ca_bundle
from urllib3.util import make_headers

from shared.errors import ValidationFailed

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], list[str]]
"""Host name and port -> the addresses it resolves to (socket.getaddrinfo's, as strings)."""

NAT64 = ipaddress.ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): the last 32 bits are the IPv4 address reached."""

NOT_GLOBAL = tuple(
    ipaddress.ip_network(net)
    for net in (
        "192.0.0.0/24",  # IETF protocol assignments; Python < 3.12.4 calls most of it global
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215); not global by IANA, global to Python 3.11
        "::/96",  # IPv4-compatible (deprecated): the embedded address is reached, often an internal one
        "fec0::/10",  # site-local (deprecated), global to Python 3.11
    )
)
"""Non-global networks `is_global` misses in some Python versions, refused explicitly."""


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, by the system's resolver."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches, for the forms that carry one: IPv4-mapped
    (`::ffff:a.b.c.d`), 6to4 (`2002:AABB:CCDD::/48`) and NAT64 (`64:ff9b::a.b.c.d`)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: Address) -> bool:
    """Whether a webhook may go to `ip`: globally reachable by the IANA special-purpose registries
    (`is_global`), not multicast, and, for an IPv6 address that embeds an IPv4 one, that one too."""
    if not ip.is_global or ip.is_multicast or any(ip in net for net in NOT_GLOBAL):
        return False
    # `is_global` judges 6to4 and NAT64 addresses by their IPv6 prefix, which is global, while the
    # packet ends at the embedded IPv4 address (`2002:a00:1::` and `64:ff9b::a00:1` reach 10.0.0.1).
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    return inner is None or is_public(inner)


@dataclass(frozen=True)
class Target:
    """A webhook URL resolved and checked: the address to connect to and what the request names."""

    scheme: str
    host: str
    """The URL's host name: the Host header's, TLS SNI's and the certificate's."""
    port: int
    address: str
    """The checked address the connection goes to."""
    path: str
    host_header: str
    authorization: str | None = None


def _parts(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("webhook must be an http(s) URL with a host.", details=[{"loc": ["webhook"]}])
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValidationFailed("webhook URL has an invalid port.", details=[{"loc": ["webhook"]}]) from None
    return parts.scheme, parts.hostname, port


def _addresses(host: str, port: int, resolver: Resolver) -> list[Address]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [literal]  # an address in the URL is not looked up
    try:
        found = resolver(host, port)
    except (OSError, UnicodeError):
        found = []
    if not found:
        raise ValidationFailed(f"webhook host `{host}` does not resolve.", details=[{"loc": ["webhook"]}])
    return [ipaddress.ip_address(address.split("%")[0]) for address in found]


def _connectable(ip: Address) -> Address:
    # An IPv4-mapped answer is reached over IPv4: a host without IPv6 could not connect to it.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve_target(url: str, allow_private: bool, resolver: Resolver = system_resolver) -> Target:
    """Resolve `url`'s host once and check every address it gives (unless `allow_private`): the
    Target to connect to, or ValidationFailed (422)."""
    scheme, host, port = _parts(url)
    addresses = _addresses(host, port, resolver)
    if not allow_private and not all(is_public(ip) for ip in addresses):
        raise ValidationFailed(
            f"webhook host `{host}` is a loopback, private, link-local or other internal address; refused.",
            details=[{"loc": ["webhook"], "msg": "internal address"}],
        )
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authorization = None
    if parts.username is not None:
        authorization = make_headers(basic_auth=f"{parts.username}:{parts.password or ''}")["authorization"]
    return Target(
        scheme=scheme,
        host=host,
        port=port,
        address=str(_connectable(addresses[0])),
        path=path,
        host_header=parts.netloc.rpartition("@")[2],
        authorization=authorization,
    )


def check_target(url: str, allow_private: bool, resolver: Resolver = system_resolver) -> None:
    """Refuse (422) a URL that is not http(s), or whose host resolves to any non-public address
    (unless `allow_private`, where the host is not looked up at all)."""
    if allow_private:
        _parts(url)
        return
    resolve_target(url, allow_private, resolver)


def post(
    target: Target, body: bytes, headers: dict[str, str], timeout: float, ca_certs: str | None = None
) -> int:
    """POST `body` to the target's checked address, naming its host in the Host header and (https)
    in SNI and the certificate check (against `ca_certs`, by default requests' CA bundle); the
    answer's status. Redirects are not followed (one could point inside the network) and the
    answer's body is not read."""
    pool: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_certs or ca_bundle(),
            maxsize=1,
        )
    else:
        pool = urllib3.HTTPConnectionPool(target.address, target.port, maxsize=1)
    sent = {**headers, "Host": target.host_header}
    if target.authorization is not None:
        sent["Authorization"] = target.authorization
    try:
        response = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers=sent,
            redirect=False,
            retries=False,
            timeout=urllib3.Timeout(total=timeout),
            preload_content=False,  # a receiver's answer of any size costs nothing
            assert_same_host=False,
        )
        return int(response.status)
    finally:
        pool.close()
