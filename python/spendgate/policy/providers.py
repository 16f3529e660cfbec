"""Provider usage objects -> TokenUsage, the disjoint counts a PriceTable charges.

Each helper takes the provider SDK's response or usage object (attribute access) or the same as a dict (parsed JSON):
the whole response, whose `model` is used unless `model=` is given, or the bare `usage` object, which needs `model=`.
No provider SDK is imported.

    response = openai_client.chat.completions.create(model="gpt-6-sol", ...)
    bill = table.charge(usage_from_openai(response, model=hold.model))

Pass `model=` the model you reserved with (Estimate.model): providers answer with a dated snapshot id
("gpt-6-sol-2026-09-22"), which the table does not resolve unless you alias it.

Where the providers count differently (field names from their API references):
- OpenAI Chat Completions `usage`: `prompt_tokens` INCLUDES `prompt_tokens_details.cached_tokens`, and
  `completion_tokens` INCLUDES `completion_tokens_details.reasoning_tokens`. So input = prompt - cached and
  output = completion - reasoning.
- OpenAI Responses `usage`: the same with `input_tokens`, `input_tokens_details.cached_tokens`, `output_tokens` and
  `output_tokens_details.reasoning_tokens`.
- OpenAI reports no cache-write count in either usage object, so cache writes cannot be told apart from input tokens
  and are charged at the input rate.
- Anthropic Messages `usage`: `input_tokens` EXCLUDES `cache_read_input_tokens` and `cache_creation_input_tokens`
  (three disjoint groups, taken as they are); `output_tokens` includes thinking, which Anthropic does not count
  apart (and bills at the output rate).
A missing or null detail counts 0; a negative count, a non-integer, or a detail larger than its total (cached >
prompt) raises ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendgate.policy.prices import TokenUsage


def usage_from_openai(obj: Any, model: str | None = None) -> TokenUsage:
    """TokenUsage of an OpenAI Chat Completions response (or its `usage`)."""
    usage, model = _usage_and_model(obj, model, "OpenAI chat completion")
    return _openai_usage(usage, model, "prompt_tokens", "prompt_tokens_details", "completion_tokens",
                         "completion_tokens_details")  # fmt: skip


def usage_from_openai_responses(obj: Any, model: str | None = None) -> TokenUsage:
    """TokenUsage of an OpenAI Responses API response (or its `usage`)."""
    usage, model = _usage_and_model(obj, model, "OpenAI response")
    return _openai_usage(usage, model, "input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details")


def usage_from_anthropic(obj: Any, model: str | None = None) -> TokenUsage:
    """TokenUsage of an Anthropic Messages response (or its `usage`)."""
    usage, model = _usage_and_model(obj, model, "Anthropic message")
    return TokenUsage(
        model=model,
        input_tokens=_count(usage, "input_tokens", required=True),
        cached_input_tokens=_count(usage, "cache_read_input_tokens"),
        cache_write_tokens=_count(usage, "cache_creation_input_tokens"),
        output_tokens=_count(usage, "output_tokens", required=True),
    )


def _openai_usage(usage: Any, model: str, prompt_key: str, prompt_details_key: str, completion_key: str,
                  completion_details_key: str) -> TokenUsage:  # fmt: skip
    prompt = _count(usage, prompt_key, required=True)
    completion = _count(usage, completion_key, required=True)
    cached = _count(_field(usage, prompt_details_key), "cached_tokens", parent=prompt_details_key)
    reasoning = _count(_field(usage, completion_details_key), "reasoning_tokens", parent=completion_details_key)
    _check_part(cached, f"{prompt_details_key}.cached_tokens", prompt, prompt_key)
    _check_part(reasoning, f"{completion_details_key}.reasoning_tokens", completion, completion_key)
    return TokenUsage(
        model=model,
        input_tokens=prompt - cached,
        cached_input_tokens=cached,
        output_tokens=completion - reasoning,
        reasoning_tokens=reasoning,
    )


def _field(obj: Any, name: str) -> Any:
    """obj[name] for a mapping, obj.name otherwise; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _usage_and_model(obj: Any, model: str | None, what: str) -> tuple[Any, str]:
    if obj is None:
        raise ValueError(f"{what}: got None instead of a response or a usage object")
    usage = _field(obj, "usage")
    if usage is None:  # a bare usage object
        if model is None:
            raise ValueError(f"{what}: a bare usage object needs model= (the model it was used with)")
        return obj, model
    chosen = model if model is not None else _field(obj, "model")
    if not isinstance(chosen, str) or not chosen:
        raise ValueError(f"{what}: the response has no model; pass model=")
    return usage, chosen


def _count(obj: Any, name: str, *, required: bool = False, parent: str = "usage") -> int:
    value = _field(obj, name)
    if value is None:
        if required:
            raise ValueError(f"{parent}.{name} is missing: is this a {parent} object?")
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{parent}.{name}: expected a token count (an integer), got {value!r}")
    if value < 0:
        raise ValueError(f"{parent}.{name}: a token count cannot be negative, got {value}")
    return value


def _check_part(part: int, part_name: str, total: int, total_name: str) -> None:
    if part > total:
        raise ValueError(
            f"inconsistent usage: {part_name} = {part} is more than {total_name} = {total}, which includes it"
        )
