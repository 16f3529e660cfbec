"""The worst case of one proxied call, in tokens, from its request body alone (no tokenizer, O(size), no network).

Input: every token comes from the bytes of the request, and OpenAI's tokenizers (cl100k, o200k) never make more
tokens than UTF-8 bytes (each vocabulary entry is at least one byte; /work/shared/research/proxy.md 3.3), so the
body's size, plus INPUT_OVERHEAD_TOKENS for what a provider adds around it (chat framing, Anthropic's tool-use system
prompt), bounds the input; capped by the model's context window. Anthropic's tokenizer is private: the same bound is
assumed for it. When the body does not show the whole input (server-side state such as previous_response_id, files
and images by reference, server tools whose results are added as input), the bound is the model's whole context
window.

Output: max_completion_tokens (else the deprecated max_tokens) times n for Chat Completions, max_output_tokens for
Responses, max_tokens for Messages; each includes reasoning/thinking tokens. When the request sets none, the model's
largest output. Either way never above the model's largest output, which the provider enforces.

A bound the request does not give and the price table does not know is an EstimateError that says what to add: a
call is never let through with a guessed bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Final

from spendgate.policy.prices import MAX_TOKENS_PER_TYPE, PriceTable, UnknownModelError

CHAT: Final[str] = "chat"
RESPONSES: Final[str] = "responses"
MESSAGES: Final[str] = "messages"
APIS: Final[tuple[str, ...]] = (CHAT, RESPONSES, MESSAGES)

# Tokens a provider may add to the input beyond the body's bytes: message framing (about 3 a message plus 3, which the
# JSON syntax already outweighs) and Anthropic's tool-use system prompt (a few hundred tokens per tool mode).
INPUT_OVERHEAD_TOKENS: Final[int] = 4_096
# Chat Completions `n`: the API allows at most 128 choices.
MAX_CHOICES: Final[int] = 128
# Request keys whose input lives on the provider's side: the body no longer bounds the input.
SERVER_STATE_KEYS: Final[frozenset[str]] = frozenset(
    {"previous_response_id", "conversation", "prompt", "mcp_servers", "container"}
)
# Content part types whose tokens are not the bytes of the body (media, files, by reference or encoded).
OPAQUE_PART_TYPES: Final[frozenset[str]] = frozenset({
    "image_url", "input_image", "input_file", "input_audio", "file", "image", "document", "audio", "container_upload",
    "search_result", "mcp_tool_use", "mcp_tool_result", "web_search_tool_result", "web_fetch_tool_result",
    "code_execution_tool_result", "server_tool_use", "computer_call_output", "image_generation_call",
})  # fmt: skip
# Tool types that run on the provider's side and add their results to the input.
CLIENT_TOOL_TYPES: Final[frozenset[str]] = frozenset({"function", "custom"})
# How deep the body's JSON is walked for opaque parts; deeper bodies count as opaque (no bound from the bytes).
MAX_WALK_DEPTH: Final[int] = 64


class EstimateError(ValueError):
    """The request cannot be bounded: bad fields, or a bound neither the request nor the price table gives."""


@dataclasses.dataclass(frozen=True, slots=True)
class CallBound:
    model: str
    input_tokens: int
    max_output_tokens: int
    whole_window: bool  # the input bound is the context window (the body does not show the whole input)


def bound_call(api: str, body: Mapping[str, Any], body_bytes: int, table: PriceTable) -> CallBound:
    """The worst case of the call `body` (parsed JSON of `body_bytes` bytes) makes on `api`. Raises EstimateError or
    UnknownModelError (the caller denies: an unknown model is never let through)."""
    assert api in APIS, api
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise EstimateError('the request has no model: set "model" to a model the price table prices')
    price, _ = table.price_of(model)
    window, largest = price.context_window_tokens, price.max_output_tokens
    output = _output_bound(api, body, model, largest)
    whole_window = shows_partial_input(body)
    if whole_window:
        if window is None:
            raise EstimateError(
                f"this request's input is not all in its body (server-side state, files, images or server tools), and "
                f'the price table has no context_window_tokens for {model!r}: add it to [models."{price.model}"]'
            )
        input_tokens = window
    else:
        input_tokens = body_bytes + INPUT_OVERHEAD_TOKENS
        if window is not None:
            input_tokens = min(input_tokens, window)
    return CallBound(model, min(input_tokens, MAX_TOKENS_PER_TYPE), min(output, MAX_TOKENS_PER_TYPE), whole_window)


def _output_bound(api: str, body: Mapping[str, Any], model: str, largest: int | None) -> int:
    keys = {CHAT: ("max_completion_tokens", "max_tokens"), RESPONSES: ("max_output_tokens",),
            MESSAGES: ("max_tokens",)}[api]  # fmt: skip
    asked = next((body[key] for key in keys if body.get(key) is not None), None)
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 0):
        raise EstimateError(f"{keys[0]} must be a non-negative integer, got {asked!r}")
    if asked is None and largest is None:
        raise EstimateError(
            f"the request sets no {' or '.join(keys)} and the price table has no max_output_tokens for {model!r}: "
            f"set {keys[0]} in the request, or add max_output_tokens to the model in the price table"
        )
    per_choice = largest if asked is None else asked if largest is None else min(asked, largest)
    assert per_choice is not None  # one of the two is set (checked above)
    return per_choice * _choices(api, body)


def _choices(api: str, body: Mapping[str, Any]) -> int:
    n = body.get("n") if api == CHAT else None
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise EstimateError(f"n must be an integer in 1..={MAX_CHOICES}, got {n!r}")
    return n


def shows_partial_input(body: Mapping[str, Any]) -> bool:
    """True when the provider adds input the body does not hold (so its size bounds nothing)."""
    if any(body.get(key) for key in SERVER_STATE_KEYS):
        return True
    tools = body.get("tools")
    if isinstance(tools, list) and any(_server_tool(tool) for tool in tools):
        return True
    return any(part in OPAQUE_PART_TYPES for part in _part_types(body, 0))


def _server_tool(tool: object) -> bool:
    if not isinstance(tool, Mapping):
        return True
    kind = tool.get("type")
    # Anthropic's own tools have no type (or "custom"); OpenAI's are "function" or "custom"; anything else runs
    # on the provider's side (web_search, file_search, code_interpreter, mcp, ...).
    return kind is not None and kind not in CLIENT_TOOL_TYPES


def _part_types(value: object, depth: int) -> Iterator[str]:
    if depth > MAX_WALK_DEPTH:
        yield next(iter(OPAQUE_PART_TYPES))
        return
    if isinstance(value, Mapping):
        kind = value.get("type")
        if isinstance(kind, str):
            yield kind
        for key, item in value.items():
            if key == "tools":  # schemas, judged by _server_tool
                continue
            if isinstance(item, (Mapping, list)):
                yield from _part_types(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (Mapping, list)):
                yield from _part_types(item, depth + 1)


__all__ = ["APIS", "CHAT", "MESSAGES", "RESPONSES", "CallBound", "EstimateError", "UnknownModelError", "bound_call"]
