"""The one place a `stripe.StripeClient` is made from spendgate's settings (the settler; reconcile may share it).

- No SDK retries (`max_network_retries=0`): the settler retries itself, with a fresh request each time. An SDK retry
  reuses its Idempotency-Key, and a 500 saved under a key is replayed for 24 hours.
- STRIPE_API_BASE, when set, replaces every base address the SDK knows (api, meter_events, files, connect), so one
  stripe-mock-like server (for example `FakeStripe(same_host=True)`) can play all of Stripe.
- A request timeout, so that a dead network cannot hold a worker thread for the SDK's default 80 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import stripe

BASE_ADDRESS_NAMES: Final[tuple[str, ...]] = ("api", "meter_events", "files", "connect")
# Stripe's API base address (the SDK's default), for the proxy rules when STRIPE_API_BASE is not set.
STRIPE_API_URL: Final[str] = "https://api.stripe.com"
# Keep-alive connections per host: requests' default pool size (the settler asks for its concurrency when larger).
DEFAULT_POOL_CONNECTIONS: Final[int] = 10


def base_addresses(api_base: str) -> dict[str, str] | None:
    """The SDK's base_addresses for STRIPE_API_BASE, or None for Stripe's own."""
    if not api_base:
        return None
    base = api_base.rstrip("/")
    return {name: base for name in BASE_ADDRESS_NAMES}


# Secret keys (sk_live_, sk_test_) and restricted keys (rk_live_, rk_test_) work; publishable keys (pk_) cannot write.
_KEY_PREFIXES: Final[tuple[str, ...]] = ("sk_", "rk_")


def api_key_problem(api_key: str) -> str | None:
    """Why this STRIPE_API_KEY cannot work, or None (the message never shows the key)."""
    if not api_key.startswith(_KEY_PREFIXES):
        kind = api_key.split("_", 1)[0] + "_..." if "_" in api_key else "no recognisable prefix"
        return f"expected a secret key (sk_...) or a restricted key (rk_...), got a key with {kind}"
    return None


def key_kind(api_key: str) -> str:
    """What kind of key, for logs, without any of its secret part: "a restricted test key (rk_test_...)"."""
    parts = api_key.split("_")
    kind = "restricted" if parts[0] == "rk" else "secret"
    mode = parts[1] if len(parts) > 2 and parts[1] in ("test", "live") else ""
    return f"a {kind} {mode + ' ' if mode else ''}key ({'_'.join(parts[: 2 if mode else 1])}_...)"


def make_client(
    api_key: str, api_base: str = "", *, timeout_s: float, pool_connections: int = DEFAULT_POOL_CONNECTIONS
) -> stripe.StripeClient:
    """pool_connections: keep-alive connections kept per host (at least the threads that call at once)."""
    import stripe  # noqa: PLC0415 - only the settler and reconcile need the SDK

    if not api_key:
        raise ValueError("no STRIPE_API_KEY: settlement to Stripe is off")
    return stripe.StripeClient(
        api_key,
        base_addresses=base_addresses(api_base),  # type: ignore[arg-type]
        max_network_retries=0,
        http_client=_http_client(api_base or STRIPE_API_URL, timeout_s, pool_connections),
    )


def _http_client(url: str, timeout_s: float, pool_connections: int) -> stripe.HTTPClient:
    """The SDK's requests-based client on one session that does not look at the environment per request.

    With `trust_env` (requests' default) every request re-reads the proxy variables from os.environ and looks for
    ~/.netrc on disk: about a quarter of the settler's CPU per v1 meter event (py-spy, bench/RESULTS.md section 4).
    The proxy variables are read once here instead (HTTPS_PROXY, NO_PROXY, ...: the same rules, for Stripe's base
    address), and netrc is not wanted: the SDK sends the key in its own Authorization header."""
    import stripe  # noqa: PLC0415

    try:
        import requests  # noqa: PLC0415
        import requests.adapters  # noqa: PLC0415
        import requests.utils  # noqa: PLC0415
    except ImportError:  # the SDK falls back to another HTTP library, which reads no environment per request
        return stripe.new_default_http_client(timeout=timeout_s)
    proxies = requests.utils.get_environ_proxies(url)
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_connections, pool_maxsize=pool_connections)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    proxy = {k: v for k, v in proxies.items() if k in ("http", "https")} or None
    return stripe.RequestsClient(timeout=timeout_s, session=session, proxy=proxy)  # type: ignore[arg-type]
