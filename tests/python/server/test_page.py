"""The operator page over real HTTP from a real sidecar: what it shows, how it escapes, who may see it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp
import grpc.aio

from spendgate.server.app import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

from .test_app import create_budget, settings_for, with_sidecar

ADMIN_TOKEN = "admin-0123456789abcdef0123456789"
APP_TOKEN = "app-0123456789abcdef0123456789ab"
TAGS = re.compile(r"<[^>]+>")


def text_of(page: str) -> str:
    """The page's text as a reader sees it, roughly: tags dropped, whitespace collapsed (no <style>)."""
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return " ".join(TAGS.sub(" ", page).split())


async def get(sidecar: Sidecar, path: str, **kwargs: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{sidecar.http_address}{path}", **kwargs) as response:  # type: ignore[arg-type]
            return response.status, await response.text()


async def spend(channel: grpc.aio.Channel, customer_id: str, amount: int) -> None:
    budget = pb_grpc.BudgetStub(channel)
    held = await budget.Reserve(pb.ReserveRequest(customer_id=customer_id, amount=amount))
    assert held.granted
    await budget.Commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=amount))


def test_the_overview_shows_settlement_health_and_the_budgets_with_thousands_separators(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> tuple[int, str]:
        await create_budget(channel, "cus_acme", 5_000_000)
        await spend(channel, "cus_acme", 1_234_567)
        return await get(sidecar, "/")

    status, page = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)
    text = text_of(page)
    assert status == 200 and "<script" not in page
    assert "Settlement to Stripe OFF (no STRIPE_API_KEY)" in text
    assert "Outbox depth 1 of 10,000,000" in text and "Dead letters 0" in text
    assert "cus_acme cus_acme 5,000,000 1,234,567 0 3,765,433" in text and "24.7 %" in text


def test_search_finds_by_part_of_the_customer_or_stripe_id_in_any_case(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> list[str]:
        for customer, stripe_id in (("acme-eu", "cus_ACME1"), ("acme-us", "cus_ACME2"), ("globex", "cus_G")):
            await pb_grpc.AdminStub(channel).SetBudget(
                pb.SetBudgetRequest(customer_id=customer, limit=10, stripe_customer_id=stripe_id)
            )
        pages = [await get(sidecar, "/budgets", params={"q": q}) for q in ("ACME", "acme2", "nothing", "")]
        return [text_of(page) for _, page in pages]

    acme, acme2, nothing, everything = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)
    assert "2 budgets matching “ACME”" in acme and "acme-eu" in acme and "acme-us" in acme and "globex" not in acme
    assert "1 budget matching “acme2”" in acme2 and "acme-us" in acme2 and "acme-eu" not in acme2
    assert "No budgets match." in nothing
    assert "3 budgets." in everything


def test_a_customer_page_shows_usage_against_the_included_quota_the_limit_and_the_projection(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> tuple[tuple[int, str], tuple[int, str]]:
        await create_budget(channel, "cus_acme", 2_000_000)
        await pb_grpc.AdminStub(channel).SetBudget(pb.SetBudgetRequest(customer_id="cus_acme", included=1_000_000))
        await spend(channel, "cus_acme", 500_000)
        await pb_grpc.BudgetStub(channel).Reserve(pb.ReserveRequest(customer_id="cus_acme", amount=250_000))
        return await get(sidecar, "/customers/cus_acme"), await get(sidecar, "/customers/cus_nobody")

    (status, page), (missing, absent) = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)
    text = text_of(page)
    assert status == 200
    assert "Customer cus_acme" in text and "Spent 500,000" in text and "Remaining 1,250,000" in text
    assert "Reserved (open holds) 250,000 in 1 hold" in text and "Limit 2,000,000" in text
    assert "37.5 % (750,000 of 2,000,000 units spent or held)" in text
    assert "Included quota 1,000,000" in text and "50.0 %" in text
    # Linear in the period's elapsed time: at least what is spent already, and a number, not a placeholder.
    projected = re.search(r"Projected spend this period ([\d,]+)", text)
    assert projected is not None and int(projected.group(1).replace(",", "")) >= 500_000, text
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"{today}: 500,000 units" in text and "not available" not in text
    assert missing == 404 and "There is no budget for customer cus_nobody" in text_of(absent)


def test_every_value_is_escaped(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script>'

    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> list[str]:
        await create_budget(channel, hostile, 10)
        return [page for _, page in (await get(sidecar, "/"), await get(sidecar, "/budgets", params={"q": hostile}))]

    for page in with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body):
        assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_with_tokens_the_page_needs_an_admin_token_by_header_or_a_signed_in_session(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, _: grpc.aio.Channel) -> dict[str, object]:
        seen: dict[str, object] = {}
        seen["anonymous"] = await get(sidecar, "/budgets?q=x")
        seen["app"] = (await get(sidecar, "/", headers={"Authorization": f"Bearer {APP_TOKEN}"}))[0]
        seen["header"] = (await get(sidecar, "/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))[0]
        # unsafe=True: keep cookies of an IP address host (127.0.0.1), as a browser does.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            url = f"http://{sidecar.http_address}/login"
            async with session.post(url, data={"token": APP_TOKEN, "next": "/"}) as wrong:
                seen["wrong"] = wrong.status
            async with session.post(url, data={"token": ADMIN_TOKEN, "next": "/budgets?q=x"}) as right:
                seen["signed_in"] = (right.status, str(right.url.path_qs), right.history[0].cookies)
            async with session.post(url, data={"token": ADMIN_TOKEN, "next": "https://evil.example/"}) as away:
                seen["away"] = (away.url.host, away.url.path)
        return seen

    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", admin_tokens=ADMIN_TOKEN, app_tokens=APP_TOKEN)
    seen = with_sidecar(settings, body)
    status, page = seen["anonymous"]  # type: ignore[misc]
    assert status == 401 and "needs one of the sidecar's admin tokens" in page and 'value="/budgets?q=x"' in page
    assert seen["app"] == 401 and seen["header"] == 200 and seen["wrong"] == 401
    signed_status, landed, cookies = seen["signed_in"]  # type: ignore[misc]
    assert signed_status == 200 and landed == "/budgets?q=x"
    cookie = cookies["spendgate_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]  # plain HTTP on loopback
    assert ADMIN_TOKEN not in cookie.value and len(cookie.value) >= 43  # a random session id, never the token
    assert seen["away"] == ("127.0.0.1", "/")  # a sign-in never sends the browser to another site


def test_webhooks_share_the_http_port_when_both_settings_name_one_address(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, _: grpc.aio.Channel) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{sidecar.http_address}/stripe/webhook", data=b"{}") as response:
                return response.status

    settings = settings_for(
        tmp_path, http_listen="127.0.0.1:0", webhook_listen="127.0.0.1:0", webhook_secret="whsec_0123456789abcdef"
    )
    assert with_sidecar(settings, body) == 400  # the webhook route answers (no signature), on the page's port


def test_a_customer_page_shows_the_credits_in_the_limit_what_is_unused_and_the_grants(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> str:
        await create_budget(channel, "cus_credits", 1_000)
        admin = pb_grpc.AdminStub(channel)
        for key, amount in (("pack-1", 300), ("pack-2", 200)):
            await admin.GrantCredits(
                pb.GrantCreditsRequest(customer_id="cus_credits", amount=amount, idempotency_key=key)
            )
        await spend(channel, "cus_credits", 1_100)  # the configured 1,000, then 100 of the credits
        return (await get(sidecar, "/customers/cus_credits"))[1]

    text = text_of(with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body))
    assert "Limit 1,500 (with 500 credits)" in text, text
    assert "Credits unused 400 of 500" in text and "Credits granted this period 500 in 2 grants" in text
    assert "Remaining 400" in text
