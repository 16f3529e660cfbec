"""The invoice-spike guard through a real sidecar process: the fake Stripe (a real HTTP server) holds the customers'
invoices and delivers signed `invoice.created` events to the sidecar's webhook port; the sidecar lists the invoices
and holds drafts with the real `stripe` SDK. Alerts are read back over WatchAlerts, from a real alert webhook receiver
and from the operator page; releases go through the CLI (Admin.ReleaseInvoice)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from spendgate.testing import Sidecar
from spendgate.testing.fake_stripe import DEFAULT_API_KEY, FakeStripe, WebhookDelivery
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.webhooks.invoices import compare
from tests.python.server._alerting import WEBHOOK_SECRET, Alerting, AlertReceiver, Watch
from tests.python.settle._support import spendgate_cli
from tests.python.webhooks.test_webhooks import SECRET, sidecar_env, webhook_url

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

DAY_S = 86_400
MARKER = "cus_marker_budget"  # toggled to mark "every alert raised so far has been read"


# -- the comparison ----------------------------------------------------------------------------------------------------


def invoice(total: int, currency: str = "usd") -> dict[str, Any]:
    return {"id": "in_prev", "total": total, "currency": currency, "status": "paid"}


@pytest.mark.parametrize(
    ("draft", "previous", "spike", "increase"),
    [
        (3_001, invoice(2_000), True, 50),  # 50.05 %: more than 50
        (3_000, invoice(2_000), False, 50),  # exactly 50 %: not more
        (1_000, invoice(2_000), False, -50),
        (1, invoice(0), True, None),  # any draft above a previous 0
        (0, invoice(0), False, None),
        (9_999, invoice(1_000, "eur"), False, None),  # another currency: not comparable
        (9_999, None, False, None),  # a first invoice
    ],
)
def test_compare(draft: int, previous: dict[str, Any] | None, spike: bool, increase: int | None) -> None:
    verdict = compare(draft, "usd", previous, 50)
    assert (verdict.spike, verdict.increase_percent) == (spike, increase), verdict


# -- through a sidecar ------------------------------------------------------------------------------------------------


@dataclass
class Guarded:
    sidecar: Sidecar
    fake: FakeStripe
    receiver: AlertReceiver
    conn: Alerting
    env: dict[str, str]
    markers: int = 0

    @property
    def url(self) -> str:
        return webhook_url(self.sidecar)

    def created(self, invoice_id: str) -> WebhookDelivery:
        delivery = self.fake.send_invoice_created(self.url, invoice_id, SECRET)
        assert delivery.status == 200, delivery.body
        return delivery

    def action(self, delivery: WebhookDelivery) -> str:
        return str(json.loads(delivery.body)["action"])

    def spikes(self) -> list[pb.Alert]:
        """Every invoice_spike alert raised so far (read from the start up to a marker alert raised now)."""
        self.conn.toggle(MARKER)
        self.markers += 1
        watch = Watch(self.sidecar.target, from_start=True)
        try:
            watch_alerts = wait_for_markers(watch, self.markers)
        finally:
            watch.close()
        return [a for a in watch_alerts if a.kind == pb.ALERT_KIND_INVOICE_SPIKE]

    def release(self, invoice_id: str) -> Any:
        return spendgate_cli("invoices", "release", invoice_id, "--target", self.sidecar.target, env=self.env)

    def page(self) -> str:
        with urllib.request.urlopen(self.sidecar.http_url + "/", timeout=30) as response:  # loopback
            return str(response.read().decode())

    def updates(self, invoice_id: str) -> int:
        return self.fake.count_requests(f"/v1/invoices/{invoice_id}", method="POST", status=200)


def wait_for_markers(watch: Watch, markers: int) -> list[pb.Alert]:
    """The watch's alerts once it has the `markers`-th marker alert (every alert raised before it is in)."""

    def marked(alerts: list[pb.Alert]) -> bool:
        return sum(a.customer_id == MARKER for a in alerts) >= markers

    seen: list[pb.Alert] = []
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing assertion
    while not marked(seen):
        assert time.monotonic() < deadline, f"not {markers} marker alerts among {len(seen)} alerts"
        assert watch.error is None, watch.error
        time.sleep(0.05)
        seen = watch.alerts
    return seen


@pytest.fixture
def guarded(sidecar_factory: SidecarFactory) -> Iterator[Callable[..., Guarded]]:
    opened: list[tuple[FakeStripe, AlertReceiver, Alerting]] = []

    def start(*flags: str, name: str = "guard") -> Guarded:
        fake = FakeStripe(same_host=True)
        receiver = AlertReceiver().__enter__()
        env = sidecar_env(
            STRIPE_API_KEY=DEFAULT_API_KEY, STRIPE_API_BASE=fake.url, SPENDGATE_ALERT_WEBHOOK_SECRET=WEBHOOK_SECRET
        )
        args = ["--webhook-listen", "127.0.0.1:0", "--alert-webhook-url", receiver.url, *flags]
        sidecar = sidecar_factory(name, extra_args=args, env=env, http=True)
        conn = Alerting(sidecar.target)
        opened.append((fake, receiver, conn))
        conn.set_budget(MARKER, 1)
        return Guarded(sidecar, fake, receiver, conn, env)

    yield start
    for fake, receiver, conn in opened:
        conn.close()
        receiver.__exit__(None, None, None)
        fake.stop()


def history(fake: FakeStripe, customer: str, *totals: int, status: str = "paid") -> None:
    """Finalized invoices of `customer`, a month apart, the last one 30 days ago."""
    now = int(time.time())
    for age_months, total in enumerate(reversed(totals), start=1):
        fake.add_invoice(customer, total, status=status, created=now - age_months * 30 * DAY_S)


def test_a_spike_raises_one_alert_on_watch_webhook_and_page_and_stripe_finalizes_it(
    guarded: Callable[..., Guarded],
) -> None:
    g = guarded()
    g.conn.admin.SetBudget(
        pb.SetBudgetRequest(customer_id="acct-spike", limit=1_000_000, stripe_customer_id="cus_spike"), timeout=30
    )
    history(g.fake, "cus_spike", 1_000, 2_000)
    history(g.fake, "cus_calm", 2_000)
    spike = g.fake.create_draft_invoice("cus_spike", 3_100)["id"]
    calm = g.fake.create_draft_invoice("cus_calm", 3_000)["id"]  # exactly 50 % more: not a spike

    first = g.created(spike)
    assert "invoice_spike" in g.action(first) and "alert only" in g.action(first)
    assert "no alert" in g.action(g.created(calm))
    # Replays: the same event, and another event about the same draft.
    assert "already processed" in g.action(g.fake.send_event(g.url, first.event, SECRET))
    assert "invoice_spike" in g.action(g.created(spike))

    spikes = g.spikes()
    assert len(spikes) == 1, spikes
    alert = spikes[0]
    assert alert.customer_id == "acct-spike"  # the budget billed to the Stripe customer
    assert dict(alert.values) == {
        "draft_total": 3_100,
        "previous_total": 2_000,
        "increase_percent": 55,
        "spike_percent": 50,
        "held": 0,
    }
    assert spike in alert.message and "cus_spike" in alert.message
    delivered = [
        r.alert
        for r in g.receiver.wait_for_received(
            lambda got: any(r.alert["kind"] == "invoice_spike" for r in got), "the invoice_spike alert webhook"
        )
    ]
    assert [a["values"]["draft_total"] for a in delivered if a["kind"] == "invoice_spike"] == [3_100]
    page = g.page()
    assert spike in page and "alert only" in page and calm not in page
    # Not held: Stripe finalizes both drafts on its own schedule.
    assert g.updates(spike) == 0
    assert set(g.fake.finalize_due_drafts()) == {spike, calm}


def test_hold_keeps_stripe_from_finalizing_until_released_once_even_across_replays_and_a_restart(
    guarded: Callable[..., Guarded],
) -> None:
    g = guarded("--invoice-spike-action", "hold", "--invoice-spike-percent", "20")
    history(g.fake, "cus_held", 10_000)
    draft = g.fake.create_draft_invoice("cus_held", 12_001)["id"]

    first = g.created(draft)
    assert "held" in g.action(first)
    assert g.fake.invoice(draft)["auto_advance"] is False and g.updates(draft) == 1
    assert g.fake.finalize_due_drafts() == []  # held: Stripe does not finalize it
    assert "already processed" in g.action(g.fake.send_event(g.url, first.event, SECRET))
    assert "already held" in g.action(g.created(draft))
    g.sidecar.restart()  # the guard's records are durable
    assert "already held" in g.action(g.created(draft))
    assert g.updates(draft) == 1

    released = g.release(draft)
    assert released.returncode == 0, released.stderr
    assert f"released {draft} of cus_held: 12001 usd, status draft, auto_advance true" in released.stdout
    assert g.fake.invoice(draft)["auto_advance"] is True
    assert "released" in g.page()
    # A late resend after the release never holds it again; Stripe finalizes it.
    assert "not held again" in g.action(g.created(draft))
    assert g.updates(draft) == 2
    assert g.fake.finalize_due_drafts() == [draft]
    assert len(g.spikes()) == 1

    finalized = g.release(draft)
    assert finalized.returncode == 1 and "FAILED_PRECONDITION" in finalized.stderr
    assert "not a draft" in finalized.stderr
    missing = g.release("in_no_such_invoice")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_a_first_invoice_is_never_a_spike_and_a_zero_previous_makes_any_bill_one(
    guarded: Callable[..., Guarded],
) -> None:
    g = guarded("--invoice-spike-action", "hold")
    first = g.fake.create_draft_invoice("cus_first", 1_000_000)["id"]
    history(g.fake, "cus_free", 0)
    free = g.fake.create_draft_invoice("cus_free", 500)["id"]
    history(g.fake, "cus_nil", 0)
    nil = g.fake.create_draft_invoice("cus_nil", 0)["id"]
    # Void invoices and other drafts are not a previous invoice: 1,200 is compared with the paid 1,000.
    history(g.fake, "cus_void", 1_000)
    g.fake.add_invoice("cus_void", 100, status="void", created=int(time.time()) - DAY_S)
    g.fake.create_draft_invoice("cus_void", 50, created=int(time.time()) - 60)
    void = g.fake.create_draft_invoice("cus_void", 1_200)["id"]

    assert "no previous invoice" in g.action(g.created(first))
    assert "held" in g.action(g.created(free))
    assert "no alert" in g.action(g.created(nil))
    assert "1200 against 1000" in g.action(g.created(void))

    spikes = g.spikes()
    assert [(a.customer_id, dict(a.values)) for a in spikes] == [
        ("cus_free", {"draft_total": 500, "previous_total": 0, "spike_percent": 50, "held": 1})
    ]
    assert "above the 0 of" in spikes[0].message
    assert g.fake.invoice(free)["auto_advance"] is False
    for other in (first, nil, void):
        assert g.fake.invoice(other)["auto_advance"] is True and g.updates(other) == 0


def test_without_a_stripe_key_drafts_are_not_compared_and_release_says_why(sidecar_factory: SidecarFactory) -> None:
    with FakeStripe(same_host=True) as fake:
        env = sidecar_env()
        sidecar = sidecar_factory("nokey", extra_args=["--webhook-listen", "127.0.0.1:0"], env=env)
        draft = fake.create_draft_invoice("cus_nokey", 100)["id"]
        delivery = fake.send_invoice_created(webhook_url(sidecar), draft, SECRET)
        assert delivery.status == 200 and b"not compared (no STRIPE_API_KEY)" in delivery.body
        released = spendgate_cli("invoices", "release", draft, "--target", sidecar.target, env=env)
        assert released.returncode == 1 and "FAILED_PRECONDITION" in released.stderr
        assert "STRIPE_API_KEY" in released.stderr
