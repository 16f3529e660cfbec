"""The HTTP port's request checks as plain decisions over what a request carries (no aiohttp here).

- host_allowed: without tokens, the operator page answers only a loopback Host or one in http_allowed_hosts. A web page
  the operator visits could otherwise rebind its own name to 127.0.0.1 (DNS rebinding) and read the page: the browser
  would send that name as the Host.
- same_origin: a state-changing POST (sign-in, sign-out) comes from this origin, or from no browser at all.
- security_headers: sent with every response of the port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from spendgate.server import usage_view
from spendgate.server.page import STYLE_CSP_SOURCE
from spendgate.server.security import is_loopback

# Sec-Fetch-Site values of a request the page itself made, or one a person typed (RFC: Fetch Metadata).
SAME_SITE_FETCHES: Final[frozenset[str]] = frozenset({"same-origin", "none"})
NO_FRAMING: Final[str] = "'none'"
# The stylesheets of the operator page: its own and the usage dashboard's (each allowed by its hash).
OPERATOR_STYLE_SOURCES: Final[tuple[str, ...]] = (STYLE_CSP_SOURCE, usage_view.STYLE_CSP_SOURCE)


def host_name(host_header: str) -> str:
    """The name or address of a Host header, lower-case, without port, brackets or a trailing dot."""
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end].lower() if end > 0 else ""
    name, separator, port = host.rpartition(":")
    if separator and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".").lower()


def is_loopback_host(name: str) -> bool:
    """127.0.0.0/8, ::1, localhost, and *.localhost (which browsers resolve to loopback themselves, RFC 6761)."""
    return name.endswith(".localhost") or (bool(name) and is_loopback(name))  # is_loopback("") is True for listen


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request with this Host header may see the page (no Host: not a browser, so no rebinding)."""
    if host_header is None:
        return True
    name = host_name(host_header)
    return is_loopback_host(name) or name in allowed


def same_origin(*, origin: str | None, fetch_site: str | None, scheme: str, host: str | None) -> bool:
    """Whether a POST comes from this server's own pages. Browsers send Origin with every POST (and Sec-Fetch-Site);
    a script sends neither and is let through: it holds no cookie of someone else's, so it can forge nothing."""
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE_FETCHES:
        return False
    if origin is None:
        return True
    if host is None:
        return False
    return origin.strip().lower() == f"{scheme}://{host.strip()}".lower()


def security_headers(
    frame_ancestors: str, style_sources: tuple[str, ...] = OPERATOR_STYLE_SOURCES
) -> Mapping[str, str]:
    """The headers every response of the HTTP port carries. The pages need no script, so the policy allows none; the
    inline stylesheets are allowed by their hashes; frame-ancestors comes from http_frame_ancestors (the usage page:
    usage_page_frame_ancestors)."""
    policy = (
        f"default-src 'none'; style-src {' '.join(style_sources)}; img-src 'self'; form-action 'self'; "
        "base-uri 'none'; "
        f"frame-ancestors {frame_ancestors}"
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",  # "no-referrer" makes browsers send `Origin: null` with a form POST
        "Cache-Control": "no-store",  # customers' money: never in a shared or disk cache
    }
    if frame_ancestors.strip() == NO_FRAMING:
        headers["X-Frame-Options"] = "DENY"  # for browsers older than CSP level 2
    return headers
