"""Provider usage -> TokenUsage, on responses shaped as the providers' API references show them.

OpenAI counts cached tokens inside prompt_tokens / input_tokens and reasoning tokens inside completion_tokens /
output_tokens; Anthropic's three input groups are disjoint. TokenUsage is disjoint, so the helpers subtract for OpenAI
and copy for Anthropic.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Any

import pytest

from spendgate.policy.prices import TokenUsage, load_price_table
from spendgate.policy.providers import usage_from_anthropic, usage_from_openai, usage_from_openai_responses

# POST /v1/chat/completions, a reasoning model with a prompt-cache hit.
OPENAI_CHAT = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1764000000,
    "model": "gpt-6-sol-2026-09-22",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help?", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
}

# POST /v1/responses.
OPENAI_RESPONSE = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1764000000,
    "status": "completed",
    "model": "gpt-6.2-sol",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi there.", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 32},
        "total_tokens": 380,
    },
}

# POST /v1/messages, a request that wrote a prompt cache.
ANTHROPIC_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-5-5",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188086,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 393,
        "service_tier": "standard",
    },
}


def as_sdk_object(value: Any) -> Any:
    """The same data with attribute access, as the provider SDKs return it."""
    if isinstance(value, dict):
        return SimpleNamespace(**{key: as_sdk_object(item) for key, item in value.items()})
    if isinstance(value, list):
        return [as_sdk_object(item) for item in value]
    return value


def with_usage(response: dict[str, Any], **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(response)
    changed["usage"].update(changes)
    return changed


def test_openai_chat_completions_subtract_cached_and_reasoning_tokens() -> None:
    expected = TokenUsage("gpt-6-sol-2026-09-22", input_tokens=86, cached_input_tokens=1920, output_tokens=108,
                          reasoning_tokens=192)  # fmt: skip
    assert usage_from_openai(OPENAI_CHAT) == expected
    assert usage_from_openai(json.loads(json.dumps(OPENAI_CHAT))) == expected
    assert usage_from_openai(as_sdk_object(OPENAI_CHAT)) == expected


def test_openai_responses_subtract_cached_and_reasoning_tokens() -> None:
    expected = TokenUsage("gpt-6.2-sol", input_tokens=72, cached_input_tokens=256, output_tokens=20,
                          reasoning_tokens=32)  # fmt: skip
    assert usage_from_openai_responses(OPENAI_RESPONSE) == expected
    assert usage_from_openai_responses(as_sdk_object(OPENAI_RESPONSE)) == expected


def test_anthropic_counts_are_already_disjoint() -> None:
    expected = TokenUsage("claude-opus-5-5", input_tokens=21, cache_write_tokens=188086, output_tokens=393)
    assert usage_from_anthropic(ANTHROPIC_MESSAGE) == expected
    assert usage_from_anthropic(as_sdk_object(ANTHROPIC_MESSAGE)) == expected
    read = with_usage(ANTHROPIC_MESSAGE, cache_creation_input_tokens=0, cache_read_input_tokens=188086)
    assert usage_from_anthropic(read).cached_input_tokens == 188086


def test_model_comes_from_the_response_unless_given() -> None:
    assert usage_from_openai(OPENAI_CHAT, model="gpt-6-sol").model == "gpt-6-sol"
    bare = OPENAI_CHAT["usage"]
    assert usage_from_openai(bare, model="gpt-6-sol").input_tokens == 86
    assert usage_from_openai(as_sdk_object(bare), model="gpt-6-sol").reasoning_tokens == 192
    with pytest.raises(ValueError, match="a bare usage object needs model="):
        usage_from_openai(bare)
    with pytest.raises(ValueError, match="the response has no model"):
        usage_from_anthropic({"usage": ANTHROPIC_MESSAGE["usage"]})


def test_missing_or_null_details_count_zero() -> None:
    plain = {"model": "gpt-6-luna", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    assert usage_from_openai(plain) == TokenUsage("gpt-6-luna", input_tokens=10, output_tokens=5)
    nulls = with_usage(OPENAI_CHAT, prompt_tokens_details=None, completion_tokens_details={"reasoning_tokens": None})
    assert usage_from_openai(nulls) == TokenUsage("gpt-6-sol-2026-09-22", input_tokens=2006, output_tokens=300)
    no_cache = {"model": "claude-haiku-5-5", "usage": {"input_tokens": 7, "output_tokens": 3,
                                                        "cache_creation_input_tokens": None}}  # fmt: skip
    assert usage_from_anthropic(no_cache) == TokenUsage("claude-haiku-5-5", input_tokens=7, output_tokens=3)


def test_inconsistent_or_malformed_counts_are_refused() -> None:
    too_many_cached = with_usage(OPENAI_CHAT, prompt_tokens_details={"cached_tokens": 2007})
    with pytest.raises(ValueError, match="cached_tokens = 2007 is more than prompt_tokens = 2006"):
        usage_from_openai(too_many_cached)
    too_much_reasoning = copy.deepcopy(OPENAI_RESPONSE)
    too_much_reasoning["usage"]["output_tokens_details"]["reasoning_tokens"] = 53
    with pytest.raises(ValueError, match="reasoning_tokens = 53 is more than output_tokens = 52"):
        usage_from_openai_responses(too_much_reasoning)
    with pytest.raises(ValueError, match="cannot be negative, got -1"):
        usage_from_anthropic(with_usage(ANTHROPIC_MESSAGE, cache_read_input_tokens=-1))
    with pytest.raises(ValueError, match=r"expected a token count \(an integer\), got '21'"):
        usage_from_anthropic(with_usage(ANTHROPIC_MESSAGE, input_tokens="21"))
    with pytest.raises(ValueError, match="usage.prompt_tokens is missing"):
        usage_from_openai({"model": "gpt-6-sol", "usage": {"completion_tokens": 1}})
    with pytest.raises(ValueError, match="got None"):
        usage_from_openai(None)


def test_the_helpers_feed_exact_charges() -> None:
    bundled = load_price_table(None)
    # 86 x $2 + 1,920 x $0.20 + 108 x $10 + 192 x $10, in micro-USD (gpt-6-sol).
    assert bundled.charge(usage_from_openai(OPENAI_CHAT, model="gpt-6-sol")).units == 3_556
    # 72 x $2 + 256 x $0.10 + 20 x $10 + 32 x $10 = 144 + 25.6 + 200 + 320, rounded up once (gpt-6.2-sol).
    assert bundled.charge(usage_from_openai_responses(OPENAI_RESPONSE)).units == 690
    # 21 x $4 + 188,086 x $5 (5-minute cache write) + 393 x $20 (claude-opus-5-5).
    assert bundled.charge(usage_from_anthropic(ANTHROPIC_MESSAGE)).units == 948_374
