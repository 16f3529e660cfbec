"""POST /stripe/webhook: verify the Stripe-Signature header with the stripe SDK, then hand the event to the handlers.

Answers (Stripe resends anything but a 2xx, for up to three days):
- 400: no or bad signature (or one older than the SDK's 300 s tolerance), a body that is not a Stripe event. Nothing
  changes.
- 200: handled, ignored (a type spendgate does not act on), or a replay; the body says which, as JSON.
- 503: not now (the engine is unavailable or shutting down, Stripe could not be asked for an event's details); Stripe
  resends later.

Snapshot events (`object: "event"`) are verified and built by `stripe.Webhook.construct_event`. Thin event
notifications (`object: "v2.core.event"`, such as the meter error reports, delivered by an event destination) carry the
same signature scheme and are verified by `stripe.WebhookSignature.verify_header`, which the SDK's own
`StripeClient.parse_event_notification` calls. Each endpoint or destination has its own signing secret: the setting
takes several, comma-separated, and an event needs to verify under one of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Final

import stripe
from aiohttp import web

from spendgate.webhooks.handlers import TransientError, WebhookHandlers

log = logging.getLogger("spendgate.webhooks")

WEBHOOK_PATH: Final[str] = "/stripe/webhook"
SIGNATURE_HEADER: Final[str] = "Stripe-Signature"
# Signatures older than this are refused (the SDK's default; replays of a captured request are refused after it).
SIGNATURE_TOLERANCE_S: Final[int] = stripe.Webhook.DEFAULT_TOLERANCE


def parse_secrets(setting: str) -> list[str]:
    """The signing secrets of the webhook_secret setting: comma-separated, blanks ignored."""
    return [secret.strip() for secret in setting.split(",") if secret.strip()]


class WebhookReceiver:
    """The request handler. One per server; holds no state of its own besides counters in `handlers.stats`."""

    def __init__(self, handlers: WebhookHandlers, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a webhook receiver needs at least one signing secret")
        self.handlers = handlers
        self._secrets = list(secrets)

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.read()
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return self._refuse(request, f"no {SIGNATURE_HEADER} header")
        try:
            body = json.loads(payload)
        except ValueError:
            return self._refuse(request, "the body is not JSON")
        kind = body.get("object") if isinstance(body, dict) else None
        if kind not in ("event", "v2.core.event"):
            return self._refuse(request, "the body is not a Stripe event")
        if not self._verified(payload, signature, thin=kind == "v2.core.event"):
            return self._refuse(request, "the signature does not match (wrong secret, altered body, or too old)")
        try:
            if kind == "event":
                outcome = await self.handlers.handle_event(body)
            else:
                outcome = await self.handlers.handle_thin(body)
        except TransientError as error:
            self.handlers.stats.count("retry_later")
            log.warning("webhook %s (%s): not now, Stripe will resend it: %s", body.get("id"), body.get("type"), error)
            return web.json_response({"error": str(error)}, status=503)
        except Exception:
            self.handlers.stats.count("errors")
            log.exception("webhook %s (%s) failed", body.get("id"), body.get("type"))
            return web.json_response({"error": "internal error; the sidecar's log has the details"}, status=500)
        payload_out: dict[str, Any] = {"received": outcome.status == 200, "action": outcome.action}
        return web.json_response(payload_out, status=outcome.status)

    def _verified(self, payload: bytes, signature: str, *, thin: bool) -> bool:
        for secret in self._secrets:
            try:
                if thin:
                    stripe.WebhookSignature.verify_header(
                        payload.decode("utf-8"), signature, secret, SIGNATURE_TOLERANCE_S
                    )
                else:
                    stripe.Webhook.construct_event(payload, signature, secret, SIGNATURE_TOLERANCE_S)
                return True
            except (stripe.SignatureVerificationError, ValueError, UnicodeDecodeError):
                continue
        return False

    def _refuse(self, request: web.Request, why: str) -> web.Response:
        self.handlers.stats.count("rejected")
        log.warning("webhook from %s refused (400): %s", request.remote, why)
        return web.json_response({"error": why}, status=400)


def add_webhook_routes(app: web.Application, receiver: WebhookReceiver) -> None:
    app.router.add_post(WEBHOOK_PATH, receiver.handle)
