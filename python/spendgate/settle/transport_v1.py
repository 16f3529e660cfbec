"""Transport v1: `POST /v1/billing/meter_events`, one event per request (Stripe's default, up to 1,000 events/s).

Stripe validates the event name and the timestamp synchronously (a 400), the customer asynchronously. A repeated
identifier is a 400 "An event already exists with identifier ..." (see errors.classify: that counts as delivered).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spendgate.settle.aggregate import MeterEvent

if TYPE_CHECKING:
    import stripe


def meter_event_payload(event: MeterEvent) -> dict[str, str]:
    """The payload Stripe's default meter mapping reads, the customer and the value, as strings; a token event adds its
    dimensions (model, token_type), which a token-billing meter groups by (its dimension_payload_keys)."""
    return {"stripe_customer_id": event.stripe_customer_id, "value": str(event.value), **dict(event.dimensions)}


class V1Transport:
    name = "v1"
    max_events_per_call = 1
    # Stripe refuses an unknown event name on this endpoint itself, so no meter check is needed before sending.
    validates_meter = True

    def __init__(self, client: stripe.StripeClient, event_name: str) -> None:
        """event_name: the units meter's, for status and logs (each event names its own meter)."""
        self._client = client
        self.event_name = event_name
        self.api_calls = 0

    def params(self, event: MeterEvent) -> dict[str, Any]:
        return {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "payload": meter_event_payload(event),
            "timestamp": event.ts_ms // 1000,  # Unix seconds, fixed at commit time
        }

    def send(self, events: Sequence[MeterEvent]) -> None:
        """Blocking; raises the SDK's error. Never passes an idempotency key: the identifier deduplicates."""
        (event,) = events
        self.api_calls += 1
        self._client.v1.billing.meter_events.create(self.params(event))  # type: ignore[arg-type]

    def close(self) -> None:
        pass
