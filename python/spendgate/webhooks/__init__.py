"""Stripe webhooks, served by `spendgate serve` on its own HTTP port (setting `webhook_listen`).

- server.py: the HTTP endpoint (POST /stripe/webhook): signature verification, status codes.
- handlers.py: what each event does to the budgets, idempotently.
- invoices.py: the invoice-spike guard (invoice.created; Admin.ReleaseInvoice).

    receiver = build_receiver(settings, engine, waiter.wait)
    add_webhook_routes(app, receiver)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from spendgate import _core
from spendgate.config import ConfigError, Settings
from spendgate.webhooks.handlers import STATE_FILE_NAME, WebhookHandlers
from spendgate.webhooks.invoices import InvoiceGuard
from spendgate.webhooks.server import WEBHOOK_PATH, WebhookReceiver, add_webhook_routes, parse_secrets

__all__ = ["WEBHOOK_PATH", "WebhookReceiver", "add_webhook_routes", "build_receiver"]

# Timeout of the one Stripe call the handlers make (fetching a thin event's details).
FETCH_TIMEOUT_S: Final[float] = 10.0


def build_receiver(
    settings: Settings,
    engine: _core.Engine,
    wait_durable: Callable[[int], Awaitable[None]],
    invoice_guard: InvoiceGuard | None = None,
) -> WebhookReceiver:
    """The webhook endpoint for these settings. Raises ConfigError when webhook_listen is set without a secret.
    invoice_guard: what invoice.created does (the sidecar's one guard, which Admin.ReleaseInvoice shares)."""
    secrets = parse_secrets(settings.webhook_secret)
    if not secrets:
        raise ConfigError(
            "setting 'webhook_listen' is set but 'webhook_secret' is empty: set STRIPE_WEBHOOK_SECRET to the "
            "endpoint's signing secret (whsec_...), or leave webhook_listen empty to serve no webhooks"
        )
    handlers = WebhookHandlers(
        engine,
        wait_durable,
        plan_limits=dict(settings.webhook_plan_limits),
        payment_failed_action=settings.webhook_payment_failed_action,
        legacy_state_path=Path(settings.data_dir) / STATE_FILE_NAME,
        fetch_event=_event_fetcher(settings),
        invoice_guard=invoice_guard,
    )
    return WebhookReceiver(handlers, secrets)


def _event_fetcher(settings: Settings) -> Callable[[str], Mapping[str, Any]] | None:
    """fetch(id): a v2 event's full body (GET /v2/core/events/{id}), or None without STRIPE_API_KEY."""
    if not settings.stripe_api_key:
        return None
    from spendgate.settle.stripe_client import make_client  # noqa: PLC0415 - the SDK client only when needed

    client = make_client(settings.stripe_api_key, settings.stripe_api_base, timeout_s=FETCH_TIMEOUT_S)

    def fetch(event_id: str) -> Mapping[str, Any]:
        event = client.v2.core.events.retrieve(event_id)
        body: Mapping[str, Any] = event.to_dict()
        return body

    return fetch
