"""Signed links to a customer's usage page, and the customer's own stop-at that a link may allow it to set.

    signer = UsageLinkSigner(load_or_create_secret(path))
    grant = LinkGrant("cus_1", scope=SCOPE_LIMIT, ceiling=50_000_000, expires_at_s=now_s + 3600)
    url = base_url + link_target(grant, signer)          # /usage/cus_1?scope=limit&ceiling=...&exp=...&sig=...
    grant = signer.verify("cus_1", request.query, now_s=...)   # LinkRefused (why) for a bad, expired or foreign link
    await set_stop_at(engine, wait, grant, 20_000_000)          # LinkRefused past the ceiling or for a view link

The link is the credential: an HMAC-SHA256, under a key only the sidecar holds, of the customer id, the scope, the
ceiling and the expiry, compared in constant time. Changing any of them (another customer's id in the path, a later
expiry, a higher ceiling, scope=limit) breaks the signature. The key comes from `usage_link_secret_file`; without it
the sidecar makes one (32 random bytes as hex, mode 0600) in its data dir the first time, `usage-link.key`. Replacing
the key (and restarting) ends every link made with the old one.

The stop-at is the customer's: kept as the budget's `stop_at` in the engine, it lowers what Reserve admits to itself,
in either enforcement mode, and can never raise enforcement above the operator's limit (the engine admits at most
min(limit, stop_at)). A link allows setting it only with scope `limit`, and only up to the ceiling the operator signed
into that link.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote, urlencode

from spendgate import _core

log = logging.getLogger("spendgate.usage_links")

SCOPE_VIEW: Final[str] = "view"
SCOPE_LIMIT: Final[str] = "limit"  # view, and set the customer's own stop-at up to the ceiling
SCOPES: Final[tuple[str, ...]] = (SCOPE_VIEW, SCOPE_LIMIT)
DEFAULT_LINK_TTL_MS: Final[int] = 3_600_000
MIN_LINK_TTL_MS: Final[int] = 60_000
# A link is a bearer credential: long-lived ones end up in bookmarks and chat logs. Hand out fresh ones instead.
MAX_LINK_TTL_MS: Final[int] = 31 * 86_400_000
SECRET_FILE_NAME: Final[str] = "usage-link.key"
SECRET_BYTES: Final[int] = 32
MIN_SECRET_BYTES: Final[int] = 32
MAX_SECRET_FILE_BYTES: Final[int] = 4096
SIGNATURE_VERSION: Final[str] = "spendgate-usage-link-v1"
# The query parameters a link carries (and the usage page's form posts back).
LINK_PARAMS: Final[tuple[str, ...]] = ("scope", "ceiling", "exp", "sig")
MAX_PARAM_CHARS: Final[int] = 64
USAGE_PATH_PREFIX: Final[str] = "/usage/"


class LinkRefused(Exception):
    """A link that does not open the page, or a change it does not allow. `public` is what the customer is told
    (never which part of a signature was wrong); str() is the detail for the log."""

    def __init__(self, public: str, detail: str = "", *, status: int = 403) -> None:
        super().__init__(detail or public)
        self.public = public
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True)
class LinkGrant:
    """What a verified link allows: one customer's page until expires_at_s, and with SCOPE_LIMIT setting its stop-at
    up to `ceiling` units."""

    customer_id: str
    scope: str
    ceiling: int  # 0 for SCOPE_VIEW
    expires_at_s: int

    def __post_init__(self) -> None:
        assert self.scope in SCOPES, self.scope
        assert (self.ceiling > 0) == (self.scope == SCOPE_LIMIT), (self.scope, self.ceiling)

    @property
    def allows_limit(self) -> bool:
        return self.scope == SCOPE_LIMIT


class UsageLinkSigner:
    def __init__(self, secret: bytes) -> None:
        assert len(secret) >= MIN_SECRET_BYTES, "a usage-link key has at least 32 bytes"
        self._secret = secret

    def signature(self, grant: LinkGrant) -> str:
        # JSON of a list: unambiguous whatever the customer id holds (no separator can be smuggled in).
        message = json.dumps(
            [SIGNATURE_VERSION, grant.customer_id, grant.scope, grant.ceiling, grant.expires_at_s],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        digest = hmac.new(self._secret, message.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def params(self, grant: LinkGrant) -> dict[str, str]:
        """The query parameters of a link to `grant` (also the usage page form's hidden fields)."""
        return {
            "scope": grant.scope,
            "ceiling": str(grant.ceiling),
            "exp": str(grant.expires_at_s),
            "sig": self.signature(grant),
        }

    def verify(self, customer_id: str, params: Mapping[str, str], *, now_s: float) -> LinkGrant:
        """The grant of a link to `customer_id`'s page with these parameters. Raises LinkRefused: a malformed or
        tampered link, another customer's, or an expired one."""
        try:
            scope = _param(params, "scope")
            ceiling = int(_param(params, "ceiling"), 10)
            expires_at_s = int(_param(params, "exp"), 10)
            presented = _param(params, "sig")
        except ValueError as error:
            raise LinkRefused(NOT_A_LINK, f"malformed usage link: {error}") from None
        if scope not in SCOPES or (ceiling > 0) != (scope == SCOPE_LIMIT) or ceiling < 0:
            raise LinkRefused(NOT_A_LINK, f"usage link with scope {scope!r} and ceiling {ceiling}")
        if not customer_id or len(customer_id.encode("utf-8", "replace")) > _core.MAX_ID_BYTES:
            raise LinkRefused(NOT_A_LINK, "usage link without a usable customer id")
        grant = LinkGrant(customer_id, scope, ceiling, expires_at_s)
        if not hmac.compare_digest(presented.encode("ascii", "replace"), self.signature(grant).encode("ascii")):
            raise LinkRefused(
                NOT_A_LINK,
                f"usage link for {customer_id!r} with a wrong signature (tampered, another "
                "customer's, or made with another key)",
            )
        if now_s >= expires_at_s:
            raise LinkRefused(EXPIRED, f"usage link for {customer_id!r} expired at {expires_at_s}")
        return grant


NOT_A_LINK: Final[str] = (
    "This link does not open a usage page: it is incomplete or was changed. Open the usage page again from the app "
    "to get a fresh link."
)
EXPIRED: Final[str] = "This link has expired. Open the usage page again from the app to get a fresh link."


def _param(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise ValueError(f"no {name!r}")
    if len(value) > MAX_PARAM_CHARS:
        raise ValueError(f"{name!r} is over {MAX_PARAM_CHARS} characters")
    return value


def new_grant(customer_id: str, *, ttl_ms: int, allow_limit: bool, ceiling: int, now_ms: int) -> LinkGrant:
    """The grant of a new link, checked. Raises EngineError("invalid_argument") saying what to change."""
    ttl_ms = ttl_ms or DEFAULT_LINK_TTL_MS
    if not MIN_LINK_TTL_MS <= ttl_ms <= MAX_LINK_TTL_MS:
        raise _core.EngineError(
            "invalid_argument",
            f"ttl_ms {ttl_ms} is outside {MIN_LINK_TTL_MS}..{MAX_LINK_TTL_MS}"
            " (one minute to 31 days): a link is a credential, hand out fresh ones",
        )
    if allow_limit and not 0 < ceiling <= _core.MAX_AMOUNT_UNITS:
        raise _core.EngineError(
            "invalid_argument",
            f"a link that allows setting the stop-at needs a ceiling in "
            f"1..{_core.MAX_AMOUNT_UNITS} units, got {ceiling}: pass --ceiling AMOUNT",
        )
    if not allow_limit and ceiling:
        raise _core.EngineError(
            "invalid_argument",
            "a ceiling only applies to a link that allows setting the stop-at (allow_limit); pass both or neither",
        )
    expires_at_s = -(-(now_ms + ttl_ms) // 1000)  # whole seconds, never shorter than asked
    return LinkGrant(
        customer_id, SCOPE_LIMIT if allow_limit else SCOPE_VIEW, ceiling if allow_limit else 0, expires_at_s
    )


def link_target(grant: LinkGrant, signer: UsageLinkSigner) -> str:
    """The path and query of the link: /usage/<customer, quoted>?scope=...&ceiling=...&exp=...&sig=..."""
    return usage_path(grant.customer_id) + "?" + urlencode(signer.params(grant))


def usage_path(customer_id: str) -> str:
    return USAGE_PATH_PREFIX + quote(customer_id, safe="")


# -- the key -----------------------------------------------------------------------------------------------------------


def secret_path(secret_file: str, data_dir: str) -> Path:
    """usage_link_secret_file, or the sidecar's own key in its data dir."""
    return Path(secret_file) if secret_file else Path(data_dir) / SECRET_FILE_NAME


def load_or_create_secret(path: Path, *, create: bool) -> bytes:
    """The key in `path` (its text, stripped). With `create`, a missing file is made first: 32 random bytes as hex,
    mode 0600, exclusively (two sidecars racing both read the one that won). Raises ValueError saying what is wrong."""
    if create and not path.exists():
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            log.info("made a new usage-link key in %s (mode 0600)", path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as error:
        raise ValueError(f"cannot read the usage-link key {path}: {error.strerror or error}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_SECRET_FILE_BYTES} bytes: it should hold one key (openssl rand -hex 32)")
    secret = raw.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{path} holds a key of {len(secret)} bytes; use at least {MIN_SECRET_BYTES} (openssl rand -hex 32 > FILE)"
        )
    return secret


# -- the customer's stop-at --------------------------------------------------------------------------------------------


class StopAtEngine(Protocol):
    def update_budget(self, customer_id: str, *, stop_at: int | None = None) -> _core.SetBudgetOutcome: ...


async def set_stop_at(
    engine: StopAtEngine, wait_durable: Callable[[int], Awaitable[None]], grant: LinkGrant, stop_at: int | None
) -> _core.BalanceView:
    """Set (or, with None, remove) the customer's own stop-at, as the link allows. Raises LinkRefused for a link
    without the scope, or an amount of 0 or past the link's ceiling; returns the balance once the change is durable."""
    if not grant.allows_limit:
        raise LinkRefused(
            "This link shows usage only; it does not allow changing the limit.",
            f"a view-only usage link of {grant.customer_id!r} tried to set the stop-at",
        )
    if stop_at is not None and not 0 < stop_at <= grant.ceiling:
        raise LinkRefused(
            f"past the ceiling of {grant.ceiling}",
            f"{grant.customer_id!r}: stop-at {stop_at} is outside 1..{grant.ceiling}",
            status=400,
        )
    outcome = engine.update_budget(grant.customer_id, stop_at=0 if stop_at is None else stop_at)
    await wait_durable(outcome.ticket)
    log.info(
        "customer %r %s its stop-at through a usage link",
        grant.customer_id,
        "removed" if stop_at is None else f"set to {stop_at} units",
    )
    return outcome.balance


class BalanceReader(Protocol):
    def balance(self, customer_id: str) -> _core.BalanceView: ...


@dataclasses.dataclass(frozen=True, slots=True)
class UsageLinks:
    """Makes links: the signer, and where customers reach the usage page (no trailing slash)."""

    signer: UsageLinkSigner
    base_url: str

    def create(
        self, engine: BalanceReader, customer_id: str, *, ttl_ms: int, allow_limit: bool, ceiling: int, now_ms: int
    ) -> tuple[str, str, LinkGrant]:
        """(url, path, grant) of a new link. EngineError: not_found for a customer without a budget,
        invalid_argument for a ttl or ceiling out of range."""
        engine.balance(customer_id)  # a link to a page that cannot open helps no one
        grant = new_grant(customer_id, ttl_ms=ttl_ms, allow_limit=allow_limit, ceiling=ceiling, now_ms=now_ms)
        path = link_target(grant, self.signer)
        return self.base_url + path, path, grant
