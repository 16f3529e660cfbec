"""The operator page in a real browser: Debian's headless Chromium, driven through chromedriver by selenium, against a
real sidecar process with tokens on. It signs in, reads the overview, searches, opens a customer: what a person sees.

Needs the Debian packages chromium and chromium-driver (bench/setup.sh installs them; .ci/run calls it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from spendgate.client import Client
from spendgate.testing import Sidecar
from tests.conftest import SidecarFactory
from tests.python.e2e._browser import PAGE_LOAD_GUARD_S, headless_chromium

ADMIN_TOKEN = "admin-0123456789abcdef0123456789"
WINDOW = "1280,1000"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with headless_chromium(WINDOW) as driver:
        yield driver


@pytest.fixture
def operator_sidecar(sidecar_factory: SidecarFactory) -> Sidecar:
    sidecar = sidecar_factory("page", http=True, extra_args=["--admin-tokens", ADMIN_TOKEN])
    with Client(sidecar.target, token=ADMIN_TOKEN) as client:
        client.set_budget("acme-eu", 5_000_000, "cus_AcmeEU", included=2_000_000)
        client.set_budget("acme-us", 2_000_000, "cus_AcmeUS")
        client.set_budget("globex", 1_000_000, "cus_Globex")
        with client.reserve("acme-eu", 1_500_000) as hold:
            hold.commit(1_234_567)
        client.reserve("acme-eu", 100_000, ttl_ms=600_000)  # stays open
    return sidecar


def visible_text(driver: WebDriver) -> str:
    return " ".join(driver.find_element(By.TAG_NAME, "body").text.split())


def arrive(driver: WebDriver, title: str) -> str:
    """Wait until the page titled `title` has loaded (a click or a submit returns before the next page is there);
    returns its visible text."""
    WebDriverWait(driver, PAGE_LOAD_GUARD_S).until(expected_conditions.title_is(f"{title} - spendgate"))
    return visible_text(driver)


def test_a_person_signs_in_searches_and_opens_a_customer(
    browser: WebDriver, operator_sidecar: Sidecar, tmp_path: Path
) -> None:
    browser.get(f"{operator_sidecar.http_url}/")
    assert "needs one of the sidecar's admin tokens" in arrive(browser, "Sign in")
    browser.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "main form button").click()

    overview = arrive(browser, "Overview")
    browser.save_screenshot(str(tmp_path / "overview.png"))
    assert "Budgets 3" in overview and "Open holds 1" in overview
    assert "Settlement to Stripe OFF (no STRIPE_API_KEY)" in overview and "Outbox depth 1 of 10,000,000" in overview
    assert "acme-eu cus_AcmeEU 5,000,000 1,234,567 100,000 3,665,433" in overview

    search = browser.find_element(By.NAME, "q")
    search.send_keys("acme")
    search.submit()
    results = arrive(browser, "Budgets")
    assert "2 budgets matching “acme”" in results
    assert "acme-eu" in results and "acme-us" in results and "globex" not in results

    browser.find_element(By.LINK_TEXT, "acme-eu").click()
    customer = arrive(browser, "Customer acme-eu")
    browser.save_screenshot(str(tmp_path / "customer.png"))
    assert browser.current_url.endswith("/customers/acme-eu")
    assert "Customer acme-eu" in customer and "Stripe customer: cus_AcmeEU" in customer
    assert "Spent 1,234,567" in customer and "Remaining 3,665,433" in customer and "Limit 5,000,000" in customer
    assert "Reserved (open holds) 100,000 in 1 hold" in customer
    assert "26.7 % (1,334,567 of 5,000,000 units spent or held)" in customer
    assert "Included quota 2,000,000" in customer and "Projected spend this period" in customer
    assert "not available" not in customer

    # The Content-Security-Policy allows the page's stylesheet (by its hash) and blocks nothing it uses.
    header = browser.find_element(By.TAG_NAME, "header")
    assert header.value_of_css_property("background-color") == "rgba(29, 35, 48, 1)"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.bar rect"), "the usage bars are drawn"
    violations = [
        entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]
    ]
    assert violations == []

    browser.find_element(By.CSS_SELECTOR, "header form.sign-out button").click()
    arrive(browser, "Sign in")
    browser.get(f"{operator_sidecar.http_url}/customers/acme-eu")  # the session is over on the server
    assert "1,234,567" not in arrive(browser, "Sign in")


def test_the_page_refuses_a_wrong_token_in_the_browser_too(browser: WebDriver, operator_sidecar: Sidecar) -> None:
    browser.delete_all_cookies()
    browser.get(f"{operator_sidecar.http_url}/customers/acme-eu")
    arrive(browser, "Sign in")
    browser.find_element(By.NAME, "token").send_keys("not-the-admin-token-0123456789")
    browser.find_element(By.CSS_SELECTOR, "main form button").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "main"), "That is not one of")
    )
    text = visible_text(browser)
    assert "That is not one of the sidecar's admin tokens." in text and "1,234,567" not in text
