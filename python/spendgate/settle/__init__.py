"""Settlement: the outbox, drained to Stripe Billing Meters exactly once.

- settler.py: the loop (claim durably, then send; acknowledge only what Stripe accepted)
- aggregate.py: outbox entries -> meter events (units, or token-billing events per token type) and their claims
- rules.py: what must not be sent (24-hour resend safety, the 35-day / 5-minute window, value digits)
- preflight.py: checks for what Stripe validates only asynchronously (customer, and meter on v2)
- errors.py: a Stripe error -> delivered / retry / dead letter
- transport_v1.py, transport_v2.py: the two Stripe APIs
- monitor.py: the outbox alarm; pool.py: the threads the blocking SDK runs in
- stripe_client.py: the StripeClient; service.py: settlement as `serve` and `settle` run it
- reconcile.py: `spendgate reconcile`; scheduled.py: the same comparison every reconcile_interval_ms in the sidecar
"""

from spendgate.settle.service import SettlementConfigError, SettlementService
from spendgate.settle.settler import SettlementStatus, SettleOptions, Settler

__all__ = ["SettleOptions", "SettlementConfigError", "SettlementService", "SettlementStatus", "Settler"]
