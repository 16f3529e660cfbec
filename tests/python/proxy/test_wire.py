"""spendgate.proxy.wire: event framing, where each API's usage is, and the providers' error shapes."""

from __future__ import annotations

import json

from spendgate.proxy.estimate import CHAT, MESSAGES, RESPONSES
from spendgate.proxy.wire import ANTHROPIC, OPENAI, EventSplitter, UsageTracker, error_body


def sse(data: dict, event: str = "") -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n"


def test_events_split_anywhere_are_put_back_together_byte_for_byte() -> None:
    stream = sse({"a": "\u00e9" * 5}) + b"data: [DONE]\r\n\r\n" + sse({"b": 1})
    for cut in range(1, len(stream)):
        splitter = EventSplitter()
        events = [*splitter.feed(stream[:cut]), *splitter.feed(stream[cut:])]
        assert b"".join(events) == stream and len(events) == 3 and splitter.rest() == b""


def test_the_chat_usage_chunk_is_read_and_hidden_only_when_the_client_did_not_ask() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 3}
    final = sse({"choices": [], "usage": usage})
    delta = sse({"choices": [{"delta": {"content": "x"}}], "usage": None})
    hidden = UsageTracker(CHAT, strip_usage_chunk=True)
    assert hidden.see(delta) and not hidden.see(final) and hidden.usage == usage
    shown = UsageTracker(CHAT, strip_usage_chunk=False)
    assert shown.see(final) and shown.usage == usage


def test_responses_usage_comes_from_the_terminal_event() -> None:
    tracker = UsageTracker(RESPONSES, strip_usage_chunk=False)
    tracker.see(sse({"type": "response.created", "response": {"usage": None}}, "response.created"))
    assert tracker.usage is None
    tracker.see(sse({"type": "response.incomplete", "response": {"usage": {"input_tokens": 4}}}, "x"))
    assert tracker.usage == {"input_tokens": 4}


def test_anthropic_deltas_are_cumulative_and_message_start_fills_the_rest() -> None:
    tracker = UsageTracker(MESSAGES, strip_usage_chunk=False)
    tracker.see(
        sse(
            {
                "type": "message_start",
                "message": {
                    "usage": {
                        "input_tokens": 10,
                        "cache_read_input_tokens": 7,
                        "cache_creation_input_tokens": 2,
                        "output_tokens": 1,
                    }
                },
            }
        )
    )
    assert tracker.usage is None  # no final count yet
    for output in (5, 9):
        tracker.see(sse({"type": "message_delta", "usage": {"output_tokens": output}}))
    assert tracker.usage == {
        "input_tokens": 10,
        "cache_read_input_tokens": 7,
        "cache_creation_input_tokens": 2,
        "output_tokens": 9,
    }
    tracker.see(sse({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, "error"))
    assert tracker.error == "busy"


def test_error_bodies_in_each_providers_shape() -> None:
    assert json.loads(error_body(OPENAI, 429, "no", "insufficient_quota")) == {
        "error": {"message": "no", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}
    }
    assert json.loads(error_body(ANTHROPIC, 429, "no")) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "no"},
    }
