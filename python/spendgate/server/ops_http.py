"""The routes of the HTTP port (`http_listen`): GET /metrics and the operator page (spendgate.server.page).

Access, when tokens are configured (admin_tokens / app_tokens):
- the operator page shows customers' money: it needs an admin token, as `Authorization: Bearer <token>` (scripts)
  or, for a browser, the token entered once in the sign-in form, kept in an HttpOnly, SameSite=Strict cookie;
- /metrics holds no customer data and is open to scrapers, unless `metrics_require_token` (then an admin token, as
  `Authorization: Bearer`, which Prometheus sends with `authorization: {credentials: ...}`).
Without tokens everything is open (the default: loopback only). Every route is GET except POST /login.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from spendgate import _core
from spendgate.server import page
from spendgate.server.metrics import Metrics
from spendgate.server.security import Role, Tokens

if TYPE_CHECKING:
    from spendgate.settle import SettlementService

log = logging.getLogger("spendgate.http")

TOKEN_COOKIE: Final[str] = "spendgate_token"
# A sign-in lasts a working day; the token itself stays valid until the operator removes it from the settings.
COOKIE_MAX_AGE_S: Final[int] = 12 * 3600
MAX_LOGIN_FORM_BYTES: Final[int] = 4096
HTML: Final[str] = "text/html"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpsRoutes:
    """The HTTP port's handlers over one engine. `settlement` is None for a server built without settlement."""

    def __init__(self, engine: _core.Engine, metrics: Metrics, tokens: Tokens, *,
                 settlement: SettlementService | None = None, metrics_require_token: bool = False,
                 secure_cookie: bool = False) -> None:
        self._engine = engine
        self._metrics = metrics
        self._tokens = tokens
        self._settlement = settlement
        self._metrics_require_token = metrics_require_token
        self._secure_cookie = secure_cookie

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/", self._admin_page(self.overview))
        app.router.add_get("/budgets", self._admin_page(self.budgets))
        app.router.add_get("/customers/{customer_id}", self._admin_page(self.customer))
        app.router.add_post("/login", self.login)

    # -- handlers ------------------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics_require_token and self._tokens.enabled:
            if self._tokens.role_of(request.headers.get("Authorization")) is not Role.ADMIN:
                return web.Response(status=401, text="/metrics needs an admin token: Authorization: Bearer <token>\n",
                                    headers={"WWW-Authenticate": 'Bearer realm="spendgate"'})
        body, content_type = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def overview(self, request: web.Request) -> web.Response:
        return _html(page.overview_page(self._engine, self._snapshot()))

    async def budgets(self, request: web.Request) -> web.Response:
        return _html(page.budgets_page(self._engine, request.query.get("q", "")))

    async def customer(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        try:
            usage = page.usage_for(self._engine, customer_id)
        except _core.EngineError as error:
            if error.kind not in ("not_found", "invalid_argument"):
                raise
            return _html(page.not_found_page(customer_id), status=404)
        return _html(page.customer_page(usage))

    async def login(self, request: web.Request) -> web.Response:
        """The sign-in form's POST: a valid admin token is set as a cookie and the browser goes back to where it was."""
        form = await request.post() if (request.content_length or 0) <= MAX_LOGIN_FORM_BYTES else {}
        token = str(form.get("token", "")).strip()
        target = _local_path(str(form.get("next", "/")))
        if self._tokens.role_of(f"Bearer {token}") is not Role.ADMIN:
            log.warning("operator page: a sign-in with a token that is not an admin token")
            return _html(_sign_in_page(target, "That is not one of the sidecar's admin tokens."), status=401)
        response = web.Response(status=303, headers={"Location": target})
        response.set_cookie(TOKEN_COOKIE, token, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="Strict",
                            secure=self._secure_cookie, path="/")
        return response

    # -- access --------------------------------------------------------------------------------------------------

    def _admin_page(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self._tokens.enabled and not self._is_admin(request):
                return _html(_sign_in_page(request.path_qs), status=401)
            return await handler(request)

        return guarded

    def _is_admin(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        cookie = request.cookies.get(TOKEN_COOKIE)
        return self._tokens.role_of(header) is Role.ADMIN or (
            cookie is not None and self._tokens.role_of(f"Bearer {cookie}") is Role.ADMIN
        )

    def _snapshot(self) -> dict[str, Any]:
        if self._settlement is not None:
            return self._settlement.snapshot()
        stats = self._engine.outbox_stats()
        return {"enabled": False, "outbox_depth": stats["depth"], "max_outbox_entries": stats["max_entries"],
                "oldest_age_ms": 0, "dead_letters": stats["dead_letters"]}


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type=HTML, charset="utf-8")


def _local_path(target: str) -> str:
    """Only a path on this server may follow a sign-in (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _sign_in_page(target: str, problem: str = "") -> str:
    error = f'<p class="bad">{page.esc(problem)}</p>' if problem else ""
    body = (
        "<p>This page shows customers' budgets and spend: it needs one of the sidecar's admin tokens.</p>"
        f'{error}<form method="post" action="/login"><input type="hidden" name="next" value="{page.esc(target)}">'
        '<label>Admin token <input type="password" name="token" autocomplete="current-password"></label> '
        '<button type="submit">Sign in</button></form>'
    )
    return page.layout("Sign in", body)
