"""Transport v2: the high-throughput meter event stream (up to 100 events per request).

- `POST /v2/billing/meter_event_session` (api base address, the API key) gives an authentication token that lasts 15
  minutes; it is refreshed at 80 % of its life, and at once when the stream says it expired
  (`TemporarySessionExpiredError`) or does not know it (401).
- `POST /v2/billing/meter_event_stream` (meter_events base address, the session token as the bearer) takes the events.
  Stripe validates them asynchronously: a duplicate identifier is dropped silently, a bad event is reported later
  (v1.billing.meter.error_report_triggered). So the settler checks what it can before sending (meter, customer,
  timestamp, value); see preflight.py and rules.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from spendgate.settle.aggregate import MeterEvent
from spendgate.settle.transport_v1 import meter_event_payload

if TYPE_CHECKING:
    import stripe

# "Supports up to 100 events per request." (stripe/params/v2/billing/_meter_event_stream_create_params.py)
MAX_STREAM_EVENTS: Final[int] = 100
DEFAULT_SESSION_LIFETIME_S: Final[float] = 15 * 60
REFRESH_AT_FRACTION: Final[float] = 0.8


def rfc3339(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def _parse_rfc3339(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class V2Transport:
    name = "v2"
    validates_meter = False

    def __init__(
        self,
        client: stripe.StripeClient,
        event_name: str,
        batch_size: int = MAX_STREAM_EVENTS,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """event_name: the units meter's, for status and logs (each event names its own meter)."""
        if not 1 <= batch_size <= MAX_STREAM_EVENTS:
            raise ValueError(f"the v2 stream takes 1..={MAX_STREAM_EVENTS} events per request, not {batch_size}")
        self._client = client
        self.event_name = event_name
        self.max_events_per_call = batch_size
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self.api_calls = 0
        self.sessions_created = 0

    def event(self, event: MeterEvent) -> dict[str, Any]:
        return {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "payload": meter_event_payload(event),
            "timestamp": rfc3339(event.ts_ms),  # fixed at commit time
        }

    def send(self, events: Sequence[MeterEvent]) -> None:
        """Blocking; raises the SDK's error. One resend with a fresh session if the token expired or is unknown."""
        import stripe  # noqa: PLC0415

        assert 1 <= len(events) <= self.max_events_per_call, len(events)
        body = {"events": [self.event(e) for e in events]}
        for attempt in (1, 2):
            token = self._session_token()
            try:
                self.api_calls += 1
                self._client.v2.billing.meter_event_stream.create(body, options={"api_key": token})  # type: ignore[arg-type]
                return
            except (stripe.TemporarySessionExpiredError, stripe.AuthenticationError):
                self._forget(token)
                if attempt == 2:
                    raise

    def _session_token(self) -> str:
        with self._lock:
            if self._token is not None and self._monotonic() < self._refresh_at:
                return self._token
            started = self._monotonic()
            self.api_calls += 1
            session = self._client.v2.billing.meter_event_session.create()
            self.sessions_created += 1
            created = _parse_rfc3339(getattr(session, "created", None))
            expires = _parse_rfc3339(getattr(session, "expires_at", None))
            lifetime = (
                expires - created
                if created is not None and expires is not None and expires > created
                else DEFAULT_SESSION_LIFETIME_S
            )
            self._token = str(session.authentication_token)
            self._refresh_at = started + REFRESH_AT_FRACTION * lifetime
            return self._token

    def _forget(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def close(self) -> None:
        with self._lock:
            self._token = None
