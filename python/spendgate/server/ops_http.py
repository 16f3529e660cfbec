"""The routes of the HTTP port (`http_listen`): GET /metrics and the operator page (spendgate.server.page).

Access, the same as the gRPC port's (a client certificate under mTLS, else a token), checked in this order:
1. with tls_client_ca_file, every route that needs credentials needs a client certificate that CA signed (the handshake
   refuses any other; one without a certificate gets 403 here);
2. without tokens, the page answers only a loopback Host or one in http_allowed_hosts (421 otherwise: DNS rebinding);
3. with tokens, the page needs an admin token: `Authorization: Bearer <token>` (scripts) or, for a browser, a session
   made by signing in with one (spendgate.server.sessions): a random id in an HttpOnly, SameSite=Strict cookie,
   `Secure` under TLS, ended by sign-out, by http_session_ttl_ms, or when its token is no longer configured.
/metrics holds no customer data and is open to scrapers unless `metrics_require_token` (then steps 1 and 3, with
`Authorization: Bearer` only). POST /login and POST /logout check that they come from this origin. Every response
carries the security headers of spendgate.server.http_guard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from spendgate import _core
from spendgate.display import DEFAULT_DISPLAY_UNIT, DisplayUnit, parse_display_unit
from spendgate.server import page, page_billing, usage_view
from spendgate.server.http_guard import host_allowed, same_origin, security_headers
from spendgate.server.metrics import Metrics
from spendgate.server.security import Role, Tokens, TokenSource
from spendgate.server.sessions import Sessions

if TYPE_CHECKING:
    from spendgate.settle import SettlementService
    from spendgate.settle.scheduled import ScheduledReconcile
    from spendgate.webhooks.invoices import InvoiceGuard

log = logging.getLogger("spendgate.http")

SESSION_COOKIE: Final[str] = "spendgate_session"
MAX_LOGIN_FORM_BYTES: Final[int] = 4096
HTML: Final[str] = "text/html"
NEEDS_CLIENT_CERT: Final[str] = (
    "this page needs a client certificate signed by the sidecar's tls_client_ca_file (mTLS): present one, as for the "
    "gRPC port\n"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpAccess:
    """What the HTTP port requires, from the settings: built once per sidecar."""

    def __init__(
        self,
        tokens: TokenSource,
        sessions: Sessions,
        *,
        client_certs: bool,
        allowed_hosts: frozenset[str],
        secure_cookie: bool,
    ) -> None:
        self._tokens = tokens
        self.sessions = sessions
        self.client_certs = client_certs  # tls_client_ca_file is set: routes with credentials need a certificate
        self.allowed_hosts = allowed_hosts
        self.secure_cookie = secure_cookie

    @property
    def tokens(self) -> Tokens:
        """The tokens in force now (a reload replaces them)."""
        return self._tokens.current

    def certificate_refusal(self, request: web.Request) -> web.Response | None:
        """403 when mTLS is on and this connection presented no certificate (a wrong one never got this far)."""
        if not self.client_certs:
            return None
        transport = request.transport
        if transport is not None and transport.get_extra_info("peercert"):
            return None
        return web.Response(status=403, text=NEEDS_CLIENT_CERT)

    def host_refusal(self, request: web.Request) -> web.Response | None:
        """421 for a foreign Host when no token protects the page."""
        if self.tokens.enabled or host_allowed(request.headers.get("Host"), self.allowed_hosts):
            return None
        log.warning(
            "operator page: refused a request for Host %r (not loopback, not in http_allowed_hosts)",
            request.headers.get("Host", "")[:100],
        )
        return web.Response(
            status=421,
            text=(
                f"this sidecar's operator page answers only loopback Host names and those listed in the setting "
                f"http_allowed_hosts; {request.headers.get('Host', '')[:100]!r} is neither: add it there (or configure "
                "admin_tokens) if this is how you reach the sidecar\n"
            ),
        )

    def is_admin(self, request: web.Request) -> bool:
        if self.tokens.role_of(request.headers.get("Authorization")) is Role.ADMIN:
            return True
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE), self.tokens)

    def has_session(self, request: web.Request) -> bool:
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE), self.tokens)


class OpsRoutes:
    """The HTTP port's handlers over one engine. `settlement` is None for a server built without settlement."""

    def __init__(
        self,
        engine: _core.Engine,
        metrics: Metrics,
        access: HttpAccess,
        *,
        settlement: SettlementService | None = None,
        metrics_require_token: bool = False,
        operator_page: bool = True,
        frame_ancestors: str = "'none'",
        display_unit: DisplayUnit | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._access = access
        self._settlement = settlement
        self._metrics_require_token = metrics_require_token
        self._operator_page = operator_page
        self._headers: Mapping[str, str] = security_headers(frame_ancestors)
        self._unit = display_unit or parse_display_unit(DEFAULT_DISPLAY_UNIT)

    def add_to(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._add_security_headers)
        app.router.add_get("/metrics", self.metrics)
        if not self._operator_page:
            return
        app.router.add_get("/", self._admin_page(self.overview))
        app.router.add_get("/budgets", self._admin_page(self.budgets))
        app.router.add_get("/customers/{customer_id}", self._admin_page(self.customer))
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)

    async def _add_security_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if "Content-Security-Policy" in response.headers:
            return  # a page with a policy of its own (the usage page, framed by other origins) sets all of them
        for name, value in self._headers.items():
            response.headers.setdefault(name, value)

    # -- handlers ------------------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics_require_token:
            refused = self._access.certificate_refusal(request)
            if refused is not None:
                return refused
            tokens = self._access.tokens
            if tokens.enabled and tokens.role_of(request.headers.get("Authorization")) is not Role.ADMIN:
                return web.Response(
                    status=401,
                    text="/metrics needs an admin token: Authorization: Bearer <token>\n",
                    headers={"WWW-Authenticate": 'Bearer realm="spendgate"'},
                )
        body, content_type = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    # Set by the app: the invoice-spike guard and the scheduled reconcile, for the billing sections (None: none).
    invoice_guard: InvoiceGuard | None = None
    reconciler: ScheduledReconcile | None = None

    async def overview(self, request: web.Request) -> web.Response:
        extra = ""
        if self.invoice_guard is not None:
            extra = page_billing.invoice_spikes_section(
                self.invoice_guard.records(page_billing.SPIKES_SHOWN), time.time_ns() // 1_000_000
            )
        return self._page(request, page.overview_page(self._engine, self._snapshot(), extra))

    async def budgets(self, request: web.Request) -> web.Response:
        return self._page(request, page.budgets_page(self._engine, request.query.get("q", "")))

    async def customer(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        try:
            usage = page.usage_for(self._engine, customer_id)
            board = usage_view.dashboard_for(self._engine, customer_id, now_ms=time.time_ns() // 1_000_000)
        except _core.EngineError as error:
            if error.kind not in ("not_found", "invalid_argument"):
                raise
            return self._page(request, page.not_found_page(customer_id), status=404)
        dashboard = usage_view.dashboard_sections(board, self._unit) + usage_view.limit_section(board, self._unit)
        extra = ""
        if self.reconciler is not None and self.reconciler.enabled:
            extra = page_billing.reconcile_section(
                self.reconciler.last_result(usage.stripe_customer_id), time.time_ns() // 1_000_000
            )
        return self._page(request, page.customer_page(usage, dashboard, extra))

    async def login(self, request: web.Request) -> web.Response:
        """The sign-in form's POST: a valid admin token starts a session, and the browser goes back to where it was."""
        refused = self._post_refusal(request)
        if refused is not None:
            return refused
        access = self._access
        form = await request.post() if (request.content_length or 0) <= MAX_LOGIN_FORM_BYTES else {}
        target = _local_path(str(form.get("next", "/")))
        if not access.tokens.enabled:
            return web.Response(status=303, headers={"Location": target})  # nothing to sign in to: the page is open
        token = str(form.get("token", "")).strip()
        if access.tokens.role_of(f"Bearer {token}") is not Role.ADMIN:
            log.warning("operator page: a sign-in with a token that is not an admin token")
            return _html(_sign_in_page(target, "That is not one of the sidecar's admin tokens."), status=401)
        session_id = access.sessions.create(token.encode("ascii"))
        response = web.Response(status=303, headers={"Location": target})
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=-(-access.sessions.ttl_ms // 1000),
            httponly=True,
            samesite="Strict",
            secure=access.secure_cookie,
            path="/",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """Sign-out: ends the session (server-side, so a copied cookie is dead too) and clears the cookie."""
        refused = self._post_refusal(request)
        if refused is not None:
            return refused
        self._access.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = web.Response(status=303, headers={"Location": "/"})
        response.del_cookie(
            SESSION_COOKIE, path="/", secure=self._access.secure_cookie, httponly=True, samesite="Strict"
        )
        return response

    # -- access --------------------------------------------------------------------------------------------------

    def _admin_page(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            access = self._access
            refused = access.certificate_refusal(request) or access.host_refusal(request)
            if refused is not None:
                return refused
            if access.tokens.enabled and not access.is_admin(request):
                return _html(_sign_in_page(request.path_qs), status=401)
            return await handler(request)

        return guarded

    def _post_refusal(self, request: web.Request) -> web.Response | None:
        access = self._access
        refused = access.certificate_refusal(request) or access.host_refusal(request)
        if refused is not None:
            return refused
        if not same_origin(
            origin=request.headers.get("Origin"),
            fetch_site=request.headers.get("Sec-Fetch-Site"),
            scheme=request.scheme,
            host=request.headers.get("Host"),
        ):
            log.warning(
                "operator page: refused a %s from another origin (%r)",
                request.path,
                request.headers.get("Origin", "")[:100],
            )
            return web.Response(
                status=403,
                text=f"{request.path} accepts forms from this sidecar's own pages only "
                "(the Origin header names another site)\n",
            )
        return None

    def _page(self, request: web.Request, document: str, status: int = 200) -> web.Response:
        if self._access.has_session(request):
            document = page.with_sign_out(document)
        return _html(document, status)

    def _snapshot(self) -> dict[str, Any]:
        if self._settlement is not None:
            return self._settlement.snapshot()
        stats = self._engine.outbox_stats()
        return {
            "enabled": False,
            "outbox_depth": stats["depth"],
            "max_outbox_entries": stats["max_entries"],
            "oldest_age_ms": 0,
            "dead_letters": stats["dead_letters"],
        }


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
