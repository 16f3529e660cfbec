"""The usage page's routes and Admin.CreateUsageLink over real HTTP and gRPC from an in-process sidecar: the settings,
the refusals, and the headers. (The browser's view is tests/python/e2e/test_usage_page_browser.py.)"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import grpc
import grpc.aio
import pytest

from spendgate.config import ConfigError
from spendgate.server.app import Sidecar
from spendgate.service.usage_links import UsageLinkSigner
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

from .test_app import create_budget, settings_for, with_sidecar
from .test_page import spend, text_of


async def make_link(channel: grpc.aio.Channel, customer_id: str, **fields: object) -> pb.CreateUsageLinkResponse:
    reply: pb.CreateUsageLinkResponse = await pb_grpc.AdminStub(channel).CreateUsageLink(
        pb.CreateUsageLinkRequest(customer_id=customer_id, **fields)
    )  # type: ignore[arg-type]
    return reply


def test_create_usage_link_refuses_what_cannot_open(tmp_path: Path) -> None:
    async def without_http(sidecar: Sidecar, channel: grpc.aio.Channel) -> grpc.StatusCode:
        await create_budget(channel, "cus_1", 100)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await make_link(channel, "cus_1")
        assert "set http_listen" in (refused.value.details() or "")
        return refused.value.code()

    assert with_sidecar(settings_for(tmp_path / "a"), without_http) == grpc.StatusCode.FAILED_PRECONDITION

    async def with_http(sidecar: Sidecar, channel: grpc.aio.Channel) -> list[grpc.StatusCode]:
        await create_budget(channel, "cus_1", 100)
        codes = []
        for customer, fields in (
            ("cus_nobody", {}),
            ("cus_1", {"ttl_ms": 1_000}),
            ("cus_1", {"allow_limit": True}),
            ("cus_1", {"ceiling": 5}),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await make_link(channel, customer, **fields)
            codes.append(refused.value.code())
        return codes

    assert (
        with_sidecar(settings_for(tmp_path / "b", http_listen="127.0.0.1:0"), with_http)
        == [grpc.StatusCode.NOT_FOUND] + [grpc.StatusCode.INVALID_ARGUMENT] * 3
    )


def test_links_use_the_base_url_and_the_key_file_of_the_settings(tmp_path: Path) -> None:
    key_file = tmp_path / "link.key"
    key_file.write_text("0123456789abcdef" * 4 + "\n")

    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> pb.CreateUsageLinkResponse:
        await create_budget(channel, "cus/ü 1", 100)
        return await make_link(channel, "cus/ü 1", ttl_ms=120_000, allow_limit=True, ceiling=50)

    settings = settings_for(
        tmp_path,
        http_listen="127.0.0.1:0",
        usage_link_secret_file=str(key_file),
        usage_link_base_url="https://usage.example.com/",
    )
    reply = with_sidecar(settings, body)
    assert reply.url == "https://usage.example.com" + reply.path
    assert reply.path.startswith("/usage/cus%2F%C3%BC%201?") and (reply.scope, reply.ceiling) == ("limit", 50)
    grant = UsageLinkSigner(key_file.read_bytes().strip()).verify(
        "cus/ü 1", dict(parse_qsl(urlsplit(reply.path).query)), now_s=reply.expires_at_ms / 1000 - 1
    )
    assert grant.ceiling == 50
    assert not (tmp_path / "data" / "usage-link.key").exists()  # the configured key is the one used

    key_file.write_text("too short")
    with pytest.raises(ConfigError, match="usage_link_secret_file"):
        with_sidecar(settings, body)


def test_the_form_refuses_cross_site_posts_and_bad_amounts_and_changes_nothing(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> list[tuple[int, str]]:
        await create_budget(channel, "cus_1", 1_000)
        await spend(channel, "cus_1", 100)
        reply = await make_link(channel, "cus_1", allow_limit=True, ceiling=500)
        signed = dict(parse_qsl(urlsplit(reply.path).query))
        action = f"http://{sidecar.http_address}{urlsplit(reply.path).path}/stop-at"
        results = []
        async with aiohttp.ClientSession() as session:
            for form, headers in (
                ({"stop_at": "200"}, {"Sec-Fetch-Site": "cross-site"}),
                ({"stop_at": "lots"}, {}),
                ({"stop_at": "0"}, {}),
                ({"stop_at": "501"}, {}),
                ({"stop_at": "2.5"}, {}),
                ({"stop_at": "9" * 5000}, {}),
            ):
                async with session.post(action, data=signed | form | {"action": "set"}, headers=headers) as response:
                    results.append((response.status, html.unescape(text_of(await response.text()))))
        balance = await pb_grpc.BudgetStub(channel).GetBalance(pb.GetBalanceRequest(customer_id="cus_1"))
        assert balance.remaining == 900  # nothing was set
        return results

    results = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)
    assert [status for status, _ in results] == [403, 400, 400, 400, 400, 413]
    assert "only from the usage page itself" in results[0][1]
    assert "Not saved: 'lots' is not a number" in results[1][1]
    assert "must be more than zero" in results[2][1]
    assert "Not saved: 501 units is more than 500 units, the most this page can set." in results[3][1]
    assert "finer than the smallest amount, 1 units" in results[4][1]


def test_the_page_sets_its_own_headers(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> list[dict[str, str]]:
        await create_budget(channel, "cus_1", 1_000)
        reply = await make_link(channel, "cus_1")
        async with aiohttp.ClientSession() as session:
            headers = []
            for path in (reply.path, reply.path + "x", "/usage/cus_2?" + reply.path.split("?")[1]):
                async with session.get(f"http://{sidecar.http_address}{path}") as response:
                    headers.append(dict(response.headers) | {"status": str(response.status)})
            return headers

    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", http_frame_ancestors="'self'")
    page, tampered, foreign = with_sidecar(settings, body)
    assert (page["status"], tampered["status"], foreign["status"]) == ("200", "403", "403")
    for headers in (page, tampered, foreign):
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]  # usage_page_frame_ancestors
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
        assert headers["X-Robots-Tag"] == "noindex, nofollow" and headers["Referrer-Policy"] == "same-origin"
