"""The customer's usage page in a real browser: Debian's headless Chromium through chromedriver (selenium), against a
real sidecar process with admin tokens on (the page needs none: the signed link is its credential) and amounts shown
in dollars. A valid link, an expired one, a tampered one, another customer's id; the stop-at control within and past
the ceiling, and the stop-at then making Reserve deny; the page framed by the app's origin.

Screenshots go to /tmp/usagepage-*.png (looked at by a person when the page changes) and to the test's tmp dir.
Needs the Debian packages chromium and chromium-driver (bench/setup.sh installs them).
"""

from __future__ import annotations

import http.server
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from spendgate.client import BudgetExceeded, Client
from spendgate.service.usage_links import (
    SECRET_FILE_NAME,
    LinkGrant,
    UsageLinkSigner,
    link_target,
)
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.e2e._browser import PAGE_LOAD_GUARD_S, headless_chromium

ADMIN_TOKEN = "admin-0123456789abcdef0123456789"
WINDOW = "1100,1700"
SCREENSHOTS = Path("/tmp")
DOLLAR = 1_000_000  # display_unit usd_micros: a unit is a millionth of a dollar
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with headless_chromium(WINDOW) as driver:
        yield driver


class AppOrigin:
    """The app's own web server on another origin: one page that frames a usage link (as an app's settings page
    would)."""

    def __init__(self) -> None:
        self.frame_src = ""
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    f"<!doctype html><title>App settings</title><h1>Your plan</h1>"
                    f'<iframe id="usage" src="{origin.frame_src}" width="900" height="1200"></iframe>'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def app_origin() -> Iterator[AppOrigin]:
    origin = AppOrigin()
    try:
        yield origin
    finally:
        origin.close()


@pytest.fixture
def usage_sidecar(sidecar_factory: SidecarFactory, app_origin: AppOrigin) -> Sidecar:
    sidecar = sidecar_factory(
        "usage",
        http=True,
        extra_args=[
            "--admin-tokens",
            ADMIN_TOKEN,
            "--display-unit",
            "usd_micros",
            "--usage-page-frame-ancestors",
            app_origin.url,
        ],
    )
    # A fixed 30-day period that started two days ago: no month boundary can fall inside a test run.
    now_ms = time.time_ns() // 1_000_000
    period = pb.Period(kind=pb.PERIOD_KIND_FIXED, start_ms=now_ms - 2 * DAY_MS, end_ms=now_ms + 28 * DAY_MS)
    with Client(sidecar.target, token=ADMIN_TOKEN) as client:
        client.set_budget("org-acme", 50 * DOLLAR, "cus_AcmeSecret", included=20 * DOLLAR, period=period)
        for member in ("alice", "bob"):
            client.set_budget(member, 50 * DOLLAR, parent_id="org-acme")
        client.set_budget("globex", 9 * DOLLAR, "cus_Globex")
        for member, action, amount in (
            ("alice", "generate report", 3_400_000),
            ("bob", "chat", 1_200_000),
            ("alice", "chat", 700_000),
            ("bob", "summarize", 2_500_000),
        ):
            with client.reserve(member, amount, dimensions={"action": action}) as hold:
                hold.commit(amount)
        with client.reserve("globex", 4 * DOLLAR) as hold:
            hold.commit(4 * DOLLAR)
    return sidecar


def link(sidecar: Sidecar, customer_id: str, **kwargs: object) -> str:
    with Client(sidecar.target, token=ADMIN_TOKEN) as client:
        return client.usage_link(customer_id, **kwargs).url  # type: ignore[arg-type]


def visible_text(driver: WebDriver) -> str:
    return " ".join(driver.find_element(By.TAG_NAME, "body").text.split())


def open_page(driver: WebDriver, url: str, title: str) -> str:
    driver.get(url)
    WebDriverWait(driver, PAGE_LOAD_GUARD_S).until(expected_conditions.title_is(title))
    return visible_text(driver)


def screenshot(driver: WebDriver, name: str, tmp_path: Path) -> None:
    for directory in (SCREENSHOTS, tmp_path):
        driver.save_screenshot(str(directory / f"usagepage-{name}.png"))


def csp_violations(driver: WebDriver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


def with_params(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


def test_a_valid_link_shows_the_customer_its_numbers_first(
    browser: WebDriver, usage_sidecar: Sidecar, tmp_path: Path
) -> None:
    url = link(usage_sidecar, "org-acme", ttl_s=600)
    assert url.startswith(f"{usage_sidecar.http_url}/usage/org-acme?")
    text = open_page(browser, url, "Usage - org-acme")
    screenshot(browser, "valid", tmp_path)
    # The big number: $7.80 used of $20.00 included, and its bar.
    assert browser.find_element(By.ID, "used").text == "$7.80"
    assert browser.find_element(By.ID, "of-included").text == "of $20.00 included · 39.0 %"
    fill = browser.find_element(By.CSS_SELECTOR, "svg.progress rect.fill")
    assert abs(float(fill.get_attribute("width") or 0) - 600 * 0.39) < 0.1
    assert "On track for $" in text and "this period" in text
    # The chart: 30 days, today's bar carrying the whole $7.80, and the included quota's line.
    days = browser.find_elements(By.CSS_SELECTOR, "svg.daily g.day")
    titles = [day.find_element(By.TAG_NAME, "title").get_attribute("textContent") or "" for day in days]
    spent_on = [title for title in titles if not title.endswith(": $0.00")]
    # All of it on the day of the commits: today, or yesterday if midnight passed since.
    commit_days = {time.strftime("%Y-%m-%d", time.gmtime(time.time() - back_s)) for back_s in (0, 86_400)}
    assert len(days) == 30 and len(spent_on) == 1 and spent_on[0].endswith(": $7.80")
    assert spent_on[0].split(":")[0] in commit_days and titles.index(spent_on[0]) >= 28
    assert browser.find_elements(By.CSS_SELECTOR, "svg.daily line.quota")
    # What drives it: actions and members, largest first, with shares of the total.
    actions = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#by-action tbody tr")]
    assert actions[0].startswith("generate report $3.40") and "43.6 %" in actions[0]
    assert [row.split(" $")[0] for row in actions] == ["generate report", "summarize", "chat"]
    members = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#by-member tbody tr")]
    assert members == ["alice $4.10 52.6 %", "bob $3.70 47.4 %"]
    assert "Limit set by your provider $50.00" in text and "Your own stop-at none" in text
    # A view link has no control, and the page shows nothing of the operator's or of other customers'.
    assert not browser.find_elements(By.TAG_NAME, "form")
    assert "cus_AcmeSecret" not in browser.page_source and "globex" not in browser.page_source
    assert csp_violations(browser) == []


def test_expired_tampered_and_foreign_links_open_nothing(
    browser: WebDriver, usage_sidecar: Sidecar, tmp_path: Path
) -> None:
    valid = link(usage_sidecar, "org-acme", ttl_s=600, allow_limit=True, ceiling=40 * DOLLAR)
    # Expired: a link signed with the sidecar's own key, whose expiry has passed.
    key = (Path(usage_sidecar.data_dir) / SECRET_FILE_NAME).read_bytes().strip()
    past = LinkGrant("org-acme", "view", 0, int(time.time()) - 5)
    expired = usage_sidecar.http_url + link_target(past, UsageLinkSigner(key))
    cases = {
        "expired": (expired, "This link has expired."),
        "tampered": (with_params(valid, ceiling=str(900 * DOLLAR)), "This link does not open a usage page"),
        "later": (with_params(valid, exp=str(int(time.time()) + 86_400 * 30)), "This link does not open"),
        "foreign": (valid.replace("/usage/org-acme?", "/usage/globex?"), "This link does not open a usage page"),
        "unsigned": (valid.split("&sig=")[0], "This link does not open a usage page"),
    }
    for name, (url, message) in cases.items():
        text = open_page(browser, url, "Usage")
        if name in ("expired", "foreign"):
            screenshot(browser, name, tmp_path)
        assert message in text, (name, text)
        assert "$" not in text, (name, text)  # not one figure
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=PAGE_LOAD_GUARD_S)
        assert refused.value.code == 403, name


def test_the_stop_at_control_within_and_past_the_ceiling_and_reserve_denies_at_it(
    browser: WebDriver, usage_sidecar: Sidecar, tmp_path: Path
) -> None:
    url = link(usage_sidecar, "org-acme", ttl_s=600, allow_limit=True, ceiling=40 * DOLLAR)
    text = open_page(browser, url, "Usage - org-acme")
    assert "You can set up to $40.00" in text
    field = browser.find_element(By.NAME, "stop_at")
    assert field.get_attribute("max") == "40"

    # Within the ceiling: $10 (of which $7.80 is used), saved and shown.
    field.send_keys("10")
    browser.find_element(By.CSS_SELECTOR, "button[value=set]").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "main"), "Saved")
    )
    text = visible_text(browser)
    screenshot(browser, "stop-at-saved", tmp_path)
    assert "Saved: your usage stops at $10.00." in text and "Your own stop-at $10.00" in text
    assert "Usage stops at $10.00" in text and "Left before it stops $2.20" in text

    # The stop-at is enforced: a member's Reserve past it is denied by the org, one that fits is granted.
    with Client(usage_sidecar.target, token=ADMIN_TOKEN) as client:
        assert client.balance("org-acme").limit == 50 * DOLLAR  # the operator's limit is untouched
        denied = client.reserve_raw("alice", 2_300_000)
        assert not denied.granted and denied.decided_by == "org-acme" and denied.remaining == 2_200_000
        assert "under the stop-at of 10000000 units its customer set on the usage page" in denied.message
        with pytest.raises(BudgetExceeded):
            client.reserve("bob", 2_300_000)
        client.reserve("bob", 2_200_000).release()

    # Past the ceiling: the browser's own check is taken away, the server still refuses and changes nothing.
    field = browser.find_element(By.NAME, "stop_at")
    browser.execute_script("arguments[0].removeAttribute('max')", field)
    field.clear()
    field.send_keys("45")
    browser.find_element(By.CSS_SELECTOR, "button[value=set]").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "main"), "Not saved")
    )
    text = visible_text(browser)
    screenshot(browser, "stop-at-past-ceiling", tmp_path)
    assert "Not saved: $45.00 is more than $40.00, the most this page can set." in text
    assert "Your own stop-at $10.00" in text
    # A higher ceiling typed into the form's signed fields does not get past the signature either.
    browser.execute_script("document.querySelector('input[name=ceiling]').value = arguments[0]", str(90 * DOLLAR))
    browser.execute_script("document.querySelector('input[name=stop_at]').removeAttribute('max')")
    field = browser.find_element(By.NAME, "stop_at")
    field.clear()
    field.send_keys("45")
    browser.find_element(By.CSS_SELECTOR, "button[value=set]").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(expected_conditions.title_is("Usage"))
    assert "This link does not open a usage page" in visible_text(browser)
    with Client(usage_sidecar.target, token=ADMIN_TOKEN) as client:
        assert client.balance("org-acme").remaining == 2_200_000  # still stopping at $10

    # Removed: back to the operator's limit.
    open_page(browser, url, "Usage - org-acme")
    browser.find_element(By.CSS_SELECTOR, "button[value=remove]").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "main"), "removed")
    )
    assert "Your own stop-at none" in visible_text(browser)
    with Client(usage_sidecar.target, token=ADMIN_TOKEN) as client:
        client.reserve("alice", 2_300_000).release()
    assert csp_violations(browser) == []


def test_a_view_link_cannot_set_the_stop_at(usage_sidecar: Sidecar) -> None:
    view = urlsplit(link(usage_sidecar, "globex", ttl_s=600))
    form = dict(parse_qsl(view.query)) | {"stop_at": "1", "action": "set"}
    request = urllib.request.Request(f"{usage_sidecar.http_url}{view.path}/stop-at", data=urlencode(form).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=PAGE_LOAD_GUARD_S)
    assert refused.value.code == 403
    assert "does not allow changing the limit" in refused.value.read().decode()
    with Client(usage_sidecar.target, token=ADMIN_TOKEN) as client:
        assert client.balance("globex").remaining == 5 * DOLLAR


def test_the_app_origin_frames_the_page_and_no_other_page_is_framed(
    browser: WebDriver, usage_sidecar: Sidecar, app_origin: AppOrigin, tmp_path: Path
) -> None:
    url = link(usage_sidecar, "org-acme", ttl_s=600)
    with urllib.request.urlopen(url, timeout=PAGE_LOAD_GUARD_S) as response:
        assert f"frame-ancestors {app_origin.url}" in response.headers["Content-Security-Policy"]
        assert response.headers.get("X-Frame-Options") is None
        assert response.headers["Cache-Control"] == "no-store"
    app_origin.frame_src = url
    browser.get(app_origin.url)
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.frame_to_be_available_and_switch_to_it((By.ID, "usage"))
    )
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "used"), "$7.80")
    )
    browser.switch_to.default_content()
    screenshot(browser, "framed", tmp_path)
    # The operator page keeps http_frame_ancestors ('none'): the app cannot frame it.
    with urllib.request.urlopen(f"{usage_sidecar.http_url}/metrics", timeout=PAGE_LOAD_GUARD_S) as response:
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"


def test_the_operator_page_shows_the_same_dashboard(browser: WebDriver, usage_sidecar: Sidecar, tmp_path: Path) -> None:
    browser.get(f"{usage_sidecar.http_url}/customers/org-acme")
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(expected_conditions.title_is("Sign in - spendgate"))
    browser.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "main form button").click()
    WebDriverWait(browser, PAGE_LOAD_GUARD_S).until(expected_conditions.title_is("Customer org-acme - spendgate"))
    screenshot(browser, "operator", tmp_path)
    assert browser.find_element(By.ID, "used").text == "$7.80"
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.daily g.day")) == 30
    assert browser.find_elements(By.CSS_SELECTOR, "svg.daily line.quota")
    assert [row.text.split(" $")[0] for row in browser.find_elements(By.CSS_SELECTOR, "#by-member tbody tr")] == [
        "alice",
        "bob",
    ]
    assert csp_violations(browser) == []
