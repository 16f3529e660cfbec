"""The operator page's billing sections in a real browser (headless Chromium through selenium): a draft invoice the
invoice-spike guard held, and a customer's last scheduled reconciliation after a divergence was injected into the fake
Stripe. A real sidecar settles to the fake Stripe (a real HTTP server) and reconciles every 200 ms.

Needs the Debian packages chromium and chromium-driver (bench/setup.sh installs them)."""

from __future__ import annotations

import time
from pathlib import Path

from selenium.webdriver.remote.webdriver import WebDriver

from spendgate.client import Client
from spendgate.testing.fake_stripe import FakeStripe
from tests.conftest import SidecarFactory
from tests.python.e2e.test_operator_page_browser import arrive, browser  # noqa: F401 - the browser fixture
from tests.python.settle._sidecar import wait_drained
from tests.python.settle._support import sidecar_env
from tests.python.webhooks.test_webhooks import SECRET, webhook_url

GUARD_S = 60.0  # a hang guard, not a timing assertion


def test_an_operator_sees_the_held_invoice_and_the_divergence(
    browser: WebDriver,  # noqa: F811
    sidecar_factory: SidecarFactory,
    tmp_path: Path,
) -> None:
    with FakeStripe(same_host=True, customers=["cus_Initech"]) as fake:
        env = sidecar_env(fake, reconcile_interval_ms=200, invoice_spike_action="hold")
        env["STRIPE_WEBHOOK_SECRET"] = SECRET
        sidecar = sidecar_factory("billing", http=True, env=env, extra_args=["--webhook-listen", "127.0.0.1:0"])
        with Client(sidecar.target) as client:
            client.set_budget("initech", 10_000_000, "cus_Initech")
            with client.reserve("initech", 250_000) as hold:
                hold.commit(250_000)
        wait_drained(sidecar.target)
        fake.inject_meter_event("spendgate_usage", "cus_Initech", 40_000)  # usage spendgate never sent
        fake.add_invoice("cus_Initech", 19_900, created=int(time.time()) - 30 * 86_400)
        draft = fake.create_draft_invoice("cus_Initech", 64_000)["id"]
        assert fake.send_invoice_created(webhook_url(sidecar), draft, SECRET).status == 200

        browser.get(f"{sidecar.http_url}/")
        overview = arrive(browser, "Overview")
        browser.save_screenshot(str(tmp_path / "overview.png"))
        assert "Invoice spikes" in overview
        assert f"{draft} cus_Initech 64,000 usd 19,900 in_" in overview and "HELD (auto_advance false)" in overview

        deadline = time.monotonic() + GUARD_S
        while True:
            browser.get(f"{sidecar.http_url}/customers/initech")
            customer = arrive(browser, "Customer initech")
            if "Verdict OVER" in customer:
                break
            assert time.monotonic() < deadline, customer
            time.sleep(0.2)
        browser.save_screenshot(str(tmp_path / "customer.png"))
        assert "Reconciled with Stripe" in customer
        assert "Stripe's meter total 290,000 Ledger, settled 250,000" in customer
        assert [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]] == []
