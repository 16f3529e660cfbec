"""Who pays, from the body (behind proxy_customer_id_from_body): the fields each provider has, never JSON blobs."""

from __future__ import annotations

from spendgate.proxy.server import _body_customer, _credential, _upstream_headers
from spendgate.proxy.wire import ANTHROPIC, OPENAI


def test_openai_prefers_safety_identifier_then_user() -> None:
    assert _body_customer(OPENAI, {"safety_identifier": "cus_a", "user": "cus_b"}) == "cus_a"
    assert _body_customer(OPENAI, {"user": "cus_b"}) == "cus_b"
    assert _body_customer(OPENAI, {}) == ""


def test_anthropic_uses_metadata_user_id_and_json_shaped_ids_name_nobody() -> None:
    assert _body_customer(ANTHROPIC, {"metadata": {"user_id": "cus_c"}}) == "cus_c"
    assert _body_customer(ANTHROPIC, {"metadata": {"user_id": '{"session": "x"}'}}) == ""
    assert _body_customer(ANTHROPIC, {"metadata": "cus_c"}) == ""


def test_the_credential_is_x_api_key_or_a_bearer_token() -> None:
    assert _credential({"x-api-key": "sgk_1", "authorization": "Bearer other"}) == "sgk_1"
    assert _credential({"authorization": "Bearer sgk_2"}) == "sgk_2"
    assert _credential({"authorization": "Basic abc"}) == ""


def test_spendgate_and_hop_by_hop_headers_never_go_upstream_and_a_virtual_key_is_replaced() -> None:
    incoming = {
        "Authorization": "Bearer sgk_1",
        "x-spendgate-customer-id": "cus",
        "Connection": "keep-alive",
        "Content-Length": "10",
        "anthropic-version": "2023-06-01",
        "Accept-Encoding": "br",
    }
    headers = _upstream_headers(incoming, {"x-api-key": "sk-ant-real"})
    assert headers == {
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant-real",
        "content-type": "application/json",
    }
