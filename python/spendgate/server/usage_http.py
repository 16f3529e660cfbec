"""The usage page's routes on http_listen (spendgate.server.usage_page renders, spendgate.service.usage_links decides).

Access is the signed link alone: no admin token, no session, no Host check and no client certificate, because the
people who open it are the app's customers (often through a proxy, in an iframe of the app). A link opens exactly
one customer's page until it expires; a wrong, changed or expired one gets 403 and no figure. The stop-at form posts
the link's signed fields back, so it is as powerful as the link and no more; a request a browser marks cross-site
(Sec-Fetch-Site) is refused too, so a page elsewhere cannot replay a leaked link through a visitor's browser.

Every response carries its own security headers: the CSP with usage_page_frame_ancestors (the app's origins may
frame it; X-Frame-Options only when no one may), no-store, nosniff, and noindex.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from aiohttp import web

from spendgate import _core
from spendgate.display import DisplayUnit
from spendgate.server import usage_page, usage_view
from spendgate.server.http_guard import security_headers
from spendgate.service.usage_links import (
    LinkGrant,
    LinkRefused,
    UsageLinkSigner,
    set_stop_at,
)

log = logging.getLogger("spendgate.http")

MAX_FORM_BYTES: Final[int] = 4096
CROSS_SITE: Final[str] = "cross-site"
NO_USAGE: Final[str] = "There is no usage to show for this account yet. Ask the app's support if this persists."
VIEW_ONLY: Final[str] = "This link shows usage only; it does not allow changing the limit."
STYLE_SOURCES: Final[tuple[str, ...]] = (usage_page.STYLE_CSP_SOURCE, usage_view.STYLE_CSP_SOURCE)


class UsageRoutes:
    def __init__(
        self,
        engine: _core.Engine,
        wait_durable: Callable[[int], Awaitable[None]],
        signer: UsageLinkSigner,
        unit: DisplayUnit,
        *,
        frame_ancestors: str,
    ) -> None:
        self._engine = engine
        self._wait = wait_durable
        self._signer = signer
        self._unit = unit
        headers = dict(security_headers(frame_ancestors, STYLE_SOURCES))
        headers["X-Robots-Tag"] = "noindex, nofollow"
        self._headers: Mapping[str, str] = headers

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/usage/{customer_id}", self.show)
        app.router.add_post("/usage/{customer_id}/stop-at", self.stop_at)

    async def show(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        try:
            grant = self._signer.verify(customer_id, request.query, now_s=time.time())
        except LinkRefused as refused:
            return self._refused(request, refused)
        return self._dashboard(grant)

    async def stop_at(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        if (request.headers.get("Sec-Fetch-Site") or "").strip().lower() == CROSS_SITE:
            return self._refused(
                request,
                LinkRefused(
                    "This form works only from the usage page itself.", "a cross-site POST to the stop-at form"
                ),
            )
        if (request.content_length or 0) > MAX_FORM_BYTES:
            return self._refused(
                request, LinkRefused("That form was too large.", "an oversized stop-at form", status=413)
            )
        form = {name: str(value) for name, value in (await request.post()).items()}
        try:
            grant = self._signer.verify(customer_id, form, now_s=time.time())
        except LinkRefused as refused:
            return self._refused(request, refused)
        if not grant.allows_limit:
            return self._refused(
                request,
                LinkRefused(VIEW_ONLY, f"a view-only usage link of {customer_id!r} tried to change the stop-at"),
            )
        if form.get("action") == "remove":
            return await self._change(grant, None, "Your stop-at is removed: usage stops at the provider's limit.")
        try:
            amount = self._unit.parse(form.get("stop_at", ""))
        except ValueError as error:
            return self._dashboard(grant, problem=f"Not saved: {error}.", status=400)
        if not 0 < amount <= grant.ceiling:
            problem = (
                f"Not saved: {self._unit.format(amount)} is more than {self._unit.format(grant.ceiling)}, the "
                "most this page can set."
                if amount > grant.ceiling
                else "Not saved: a stop-at must be more than zero (use Remove to have none)."
            )
            return self._dashboard(grant, problem=problem, status=400)
        return await self._change(grant, amount, f"Saved: your usage stops at {self._unit.format(amount)}.")

    async def _change(self, grant: LinkGrant, amount: int | None, done: str) -> web.Response:
        try:
            await set_stop_at(self._engine, self._wait, grant, amount)
        except LinkRefused as refused:
            return self._dashboard(grant, problem=refused.public, status=refused.status)
        except _core.EngineError as error:
            if error.kind not in ("not_found", "invalid_argument"):
                raise
            log.warning("usage page: the stop-at of %r was not changed: %s", grant.customer_id, error.message)
            return self._html(usage_page.refused_page(NO_USAGE), 404)
        return self._dashboard(grant, notice=done)

    def _dashboard(self, grant: LinkGrant, *, notice: str = "", problem: str = "", status: int = 200) -> web.Response:
        try:
            board = usage_view.dashboard_for(self._engine, grant.customer_id, now_ms=time.time_ns() // 1_000_000)
        except _core.EngineError as error:
            if error.kind not in ("not_found", "invalid_argument"):
                raise
            return self._html(usage_page.refused_page(NO_USAGE), 404)
        document = usage_page.usage_page(board, self._unit, grant, self._signer, notice=notice, problem=problem)
        return self._html(document, status)

    def _refused(self, request: web.Request, refused: LinkRefused) -> web.Response:
        log.warning("usage page: refused %s %s: %s", request.method, request.path[:200], refused)
        return self._html(usage_page.refused_page(refused.public), refused.status)

    def _html(self, text: str, status: int) -> web.Response:
        response = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
        response.headers.update(self._headers)
        return response
