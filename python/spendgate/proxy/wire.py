"""The providers' wire formats the proxy reads: error bodies, server-sent events, and where each API puts usage.

- OpenAI errors: {"error": {"message", "type", "param", "code"}}; Anthropic errors: {"type": "error", "error":
  {"type", "message"}}. Both SDKs read `x-should-retry: false` as "do not retry" (openai-python and
  anthropic-sdk-python _base_client.py `_should_retry`).
- Chat Completions streams carry usage only with `stream_options.include_usage`: one extra chunk with
  `"choices": []` and the usage, before `data: [DONE]`.
- Responses streams end with `response.completed`, `response.incomplete` or `response.failed`, whose `response.usage`
  is final.
- Anthropic streams: `message_start.message.usage` (input and cache counts), then `message_delta.usage`, whose fields
  are cumulative: the last value of each field wins, message_start's where a delta has none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Final

from spendgate.proxy.estimate import CHAT, MESSAGES, RESPONSES

OPENAI: Final[str] = "openai"
ANTHROPIC: Final[str] = "anthropic"
# An event's end: a blank line (servers may end lines with CRLF).
EVENT_ENDS: Final[tuple[bytes, ...]] = (b"\n\n", b"\r\n\r\n")
# One event may not grow past this while its end is awaited (a stream that never ends an event is cut off).
MAX_EVENT_BYTES: Final[int] = 16 * 1024 * 1024
RESPONSES_TERMINAL: Final[frozenset[str]] = frozenset({"response.completed", "response.incomplete", "response.failed"})
ANTHROPIC_USAGE_FIELDS: Final[tuple[str, ...]] = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Anthropic's error type per HTTP status (docs.claude.com/en/api/errors).
ANTHROPIC_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}  # fmt: skip
OPENAI_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 413: "invalid_request_error", 429: "insufficient_quota", 500: "server_error",
    502: "server_error", 503: "server_error", 504: "server_error",
}  # fmt: skip


def error_body(provider: str, status: int, message: str, code: str | None = None) -> bytes:
    """The error a provider would send, in its own shape."""
    if provider == ANTHROPIC:
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind = OPENAI_ERROR_TYPES.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class EventSplitter:
    """Cuts a byte stream into whole server-sent events (bytes, terminator included) as they complete."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        buffer = self._pending + data if self._pending else data
        start = 0
        while True:
            end, width = _next_end(buffer, start)
            if end < 0:
                break
            yield buffer[start : end + width]
            start = end + width
        self._pending = buffer[start:]
        if len(self._pending) > MAX_EVENT_BYTES:
            raise ValueError(f"an upstream event is over {MAX_EVENT_BYTES} bytes without an end")

    def rest(self) -> bytes:
        """What is left after the stream ended: an unterminated last event ("" normally)."""
        rest, self._pending = self._pending, b""
        return rest


def _next_end(buffer: bytes, start: int) -> tuple[int, int]:
    found = [(i, len(end)) for end in EVENT_ENDS if (i := buffer.find(end, start)) >= 0]
    return min(found) if found else (-1, 0)


def event_fields(event: bytes) -> tuple[str, bytes]:
    """(event name, data) of one event: `data:` lines joined by newlines, the `event:` name or ""."""
    name, data = "", []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


class UsageTracker:
    """Reads one stream's events and keeps what its API says about usage; `usage` is the provider's usage object
    once the stream has given it (None before)."""

    def __init__(self, api: str, strip_usage_chunk: bool) -> None:
        self.api = api
        self.strip_usage_chunk = strip_usage_chunk  # Chat: the client did not ask for the usage chunk
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None  # an error event, if the stream carried one
        self._anthropic: dict[str, Any] = {}

    def see(self, event: bytes) -> bool:
        """Record what `event` says; False when the client must not see it (the usage chunk it did not ask for)."""
        name, data = event_fields(event)
        if not data or data == b"[DONE]":
            return True
        if self.api == CHAT:
            return self._see_chat(data)
        if b'"usage"' not in data and b'"error"' not in data and name != "error":
            return True  # most events: deltas, with nothing to read
        document = _json(data)
        if document is None:
            return True
        if self.api == RESPONSES:
            self._see_responses(document)
        else:
            self._see_messages(document)
        return True

    def _see_chat(self, data: bytes) -> bool:
        if b'"usage"' not in data and b'"error"' not in data:
            return True
        document = _json(data)
        if document is None:
            return True
        if isinstance(document.get("error"), dict):
            self.error = str(document["error"].get("message", "error"))
            return True
        usage = document.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage_chunk and document.get("choices") == []:
                return False
        return True

    def _see_responses(self, document: dict[str, Any]) -> None:
        kind = document.get("type")
        if kind in RESPONSES_TERMINAL:
            response = document.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):
                self.usage = usage
        elif kind == "error":
            self.error = str(document.get("message", "error"))

    def _see_messages(self, document: dict[str, Any]) -> None:
        kind = document.get("type")
        if kind == "message_start":
            message = document.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._anthropic.update({k: usage[k] for k in ANTHROPIC_USAGE_FIELDS if usage.get(k) is not None})
        elif kind == "message_delta" and isinstance(document.get("usage"), dict):
            delta = document["usage"]  # cumulative: the latest value of each field wins
            self._anthropic.update({k: delta[k] for k in ANTHROPIC_USAGE_FIELDS if delta.get(k) is not None})
            self.usage = dict(self._anthropic)
        elif kind == "error":
            error = document.get("error")
            self.error = str(error.get("message", "error")) if isinstance(error, dict) else "error"


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def response_usage(api: str, document: Any) -> dict[str, Any] | None:
    """The usage object of a whole (not streamed) response, or None."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    return usage if isinstance(usage, dict) else None


__all__ = ["ANTHROPIC", "MESSAGES", "OPENAI", "EventSplitter", "UsageTracker", "error_body", "response_usage"]
