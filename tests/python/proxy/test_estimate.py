"""spendgate.proxy.estimate: a call's worst case from its body, bounded by the price table's model bounds."""

from __future__ import annotations

import json

import pytest

from spendgate.policy import load_price_table
from spendgate.policy.prices import TokenUsage, UnknownModelError
from spendgate.proxy.estimate import CHAT, INPUT_OVERHEAD_TOKENS, MESSAGES, RESPONSES, EstimateError, bound_call

TABLE = load_price_table(None)
SOL = "gpt-6-sol"  # 1,050,000-token window, 128,000 output (default_prices.toml)


def bound(api: str, body: dict) -> tuple[int, int, bool]:
    raw = json.dumps(body).encode()
    result = bound_call(api, body, len(raw), TABLE)
    return result.input_tokens, result.max_output_tokens, result.whole_window


def test_input_is_the_body_size_plus_the_overhead_and_output_the_request_bound_times_n() -> None:
    body = {"model": SOL, "messages": [{"role": "user", "content": "x" * 1000}], "max_completion_tokens": 300, "n": 3}
    size = len(json.dumps(body).encode())
    assert bound(CHAT, body) == (size + INPUT_OVERHEAD_TOKENS, 900, False)


def test_the_deprecated_max_tokens_counts_when_max_completion_tokens_is_absent() -> None:
    assert bound(CHAT, {"model": SOL, "messages": [], "max_tokens": 77})[1] == 77


def test_no_output_bound_means_the_models_largest_output_and_a_larger_one_is_capped() -> None:
    assert bound(CHAT, {"model": SOL, "messages": []})[1] == 128_000
    assert bound(RESPONSES, {"model": SOL, "input": "hi", "max_output_tokens": 10**7})[1] == 128_000
    assert bound(MESSAGES, {"model": "claude-opus-5-5", "max_tokens": 1024, "messages": []})[1] == 1024


@pytest.mark.parametrize("body", [
    {"model": SOL, "input": "more", "previous_response_id": "resp_1"},
    {"model": SOL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
    {"model": SOL, "input": "hi", "tools": [{"type": "web_search"}]},
    {"model": SOL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
    {"model": "claude-opus-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_1"}}]}]},
])  # fmt: skip
def test_a_body_that_does_not_show_the_whole_input_holds_the_whole_window(body: dict) -> None:
    api = MESSAGES if body["model"].startswith("claude") else RESPONSES if "input" in body else CHAT
    input_tokens, _, whole = bound(api, body)
    assert whole and input_tokens == TABLE.price_of(body["model"])[0].context_window_tokens


def test_function_tools_do_not_count_as_server_side_input() -> None:
    body = {
        "model": SOL,
        "messages": [],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "image"}}}},
            }
        ],
    }
    assert not bound(CHAT, body)[2]


def test_the_input_bound_never_exceeds_the_window() -> None:
    price = TABLE.price_of(SOL)[0]
    result = bound_call(CHAT, {"model": SOL, "messages": []}, 5_000_000, TABLE)
    assert result.input_tokens == price.context_window_tokens


def test_unbounded_requests_on_a_model_without_bounds_are_refused_with_what_to_add() -> None:
    model = "gemini-3.5-flash"  # priced, but without bounds in the bundled table
    with pytest.raises(EstimateError, match="max_output_tokens"):
        bound(CHAT, {"model": model, "messages": []})
    with pytest.raises(EstimateError, match="context_window_tokens"):
        bound(RESPONSES, {"model": model, "input": "x", "previous_response_id": "r", "max_output_tokens": 5})
    assert bound(CHAT, {"model": model, "messages": [], "max_completion_tokens": 5})[1] == 5


def test_bad_fields_and_unknown_models() -> None:
    with pytest.raises(EstimateError, match="no model"):
        bound(CHAT, {"messages": []})
    with pytest.raises(EstimateError, match="non-negative"):
        bound(CHAT, {"model": SOL, "max_completion_tokens": "ten"})
    with pytest.raises(EstimateError, match="n must be"):
        bound(CHAT, {"model": SOL, "n": 0, "max_completion_tokens": 1})
    with pytest.raises(UnknownModelError):
        bound(CHAT, {"model": "gpt-nope", "messages": []})


def test_the_reserved_estimate_covers_any_usage_within_the_bounds() -> None:
    body = {"model": SOL, "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 50}
    result = bound_call(CHAT, body, len(json.dumps(body)), TABLE)
    held = TABLE.estimate(result.model, result.input_tokens, result.max_output_tokens).units
    for usage in (
        TokenUsage(SOL, cache_write_tokens=result.input_tokens, reasoning_tokens=50),
        TokenUsage(SOL, input_tokens=result.input_tokens, output_tokens=50),
    ):
        assert TABLE.charge(usage).units <= held
