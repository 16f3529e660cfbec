"""The proxy, specified through the official `openai` and `anthropic` SDKs: a real sidecar process serves the proxy,
in front of a fake upstream on loopback that answers as the providers do (spendgate.testing.fake_llm).

Every call is checked against the books: its ledger entry (read from the live data dir) holds exactly the fake's
reported usage priced by the bundled table, or the whole hold when the usage cannot be known, and a call that failed
before any output leaves its hold released.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import anthropic
import httpx2
import openai
import pytest

from spendgate.testing.fake_llm import FakeCall
from tests.python.proxy._support import (
    ANTHROPIC_MODEL,
    ANTHROPIC_UPSTREAM_KEY,
    OPENAI_MODEL,
    OPENAI_UPSTREAM_KEY,
    TABLE,
    Rig,
    priced,
    script,
    start_rig,
)

MESSAGES = [{"role": "user", "content": "Say hello."}]
BIG = 10**12


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from start_rig(tmp_path_factory.mktemp("proxy"))


def customer(rig: Rig, name: str, limit: int = BIG) -> str:
    rig.client.set_budget(name, limit=limit)
    return name


def only_call(rig: Rig, marker: str) -> FakeCall:
    calls = [call for call in rig.fake.calls if marker in json.dumps(call.body)]
    assert len(calls) == 1, calls
    return calls[0]


def test_chat_is_committed_at_its_exact_usage_cached_and_reasoning_tokens_included(rig: Rig) -> None:
    who = customer(rig, "chat-plain")
    raw = rig.openai(who).chat.completions.with_raw_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "chat-plain"}],
        max_completion_tokens=500,
        extra_headers=script(input_tokens=300, cached_tokens=1_200, output_tokens=40, reasoning_tokens=90),
    )
    completion = raw.parse()
    assert completion.usage.prompt_tokens == 1_500 and completion.usage.prompt_tokens_details.cached_tokens == 1_200
    assert completion.usage.completion_tokens_details.reasoning_tokens == 90
    entry = rig.ledger_entry(raw.headers["x-spendgate-reservation-id"])
    call = only_call(rig, "chat-plain")
    assert entry["amount"] == priced(call) > 0
    parts = {part["token_type"]: part["tokens"] for part in entry["usage"]["parts"]}
    assert parts == {"input": 300, "cached_input": 1_200, "output": 40, "reasoning": 90}
    assert "x-spendgate-customer-id" not in {name.lower() for name in call.headers}  # never forwarded
    assert rig.client.balance(who).spent == entry["amount"] and rig.client.balance(who).reserved == 0


def test_a_stream_whose_client_did_not_ask_for_usage_is_metered_and_the_usage_chunk_is_hidden(rig: Rig) -> None:
    who = customer(rig, "chat-stream")
    raw = rig.openai(who).chat.completions.with_raw_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "chat-stream"}],
        stream=True,
        extra_headers=script(output_tokens=33, reasoning_tokens=7, chunks=6),
    )
    chunks = list(raw.parse())
    assert all(chunk.choices for chunk in chunks)  # no `choices: []` chunk: the loop `choices[0]` stays safe
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(f"tok{i} " for i in range(6))
    call = only_call(rig, "chat-stream")
    assert call.body["stream_options"] == {"include_usage": True} and call.finished
    assert rig.ledger_entry(raw.headers["x-spendgate-reservation-id"])["amount"] == priced(call)


def test_a_stream_that_asked_for_usage_gets_it(rig: Rig) -> None:
    who = customer(rig, "chat-usage")
    stream = rig.openai(who).chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "chat-usage"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=script(output_tokens=21),
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 21
    assert rig.client.balance(who).spent == priced(only_call(rig, "chat-usage"))


def test_responses_plain_and_streamed(rig: Rig) -> None:
    who = customer(rig, "responses")
    sdk = rig.openai(who)
    raw = sdk.responses.with_raw_response.create(
        model=OPENAI_MODEL,
        input="responses-plain",
        max_output_tokens=300,
        extra_headers=script(cached_tokens=50, reasoning_tokens=100),
    )
    assert raw.parse().usage.output_tokens_details.reasoning_tokens == 100
    assert rig.ledger_entry(raw.headers["x-spendgate-reservation-id"])["amount"] == priced(
        only_call(rig, "responses-plain")
    )
    raw = sdk.responses.with_raw_response.create(
        model=OPENAI_MODEL,
        input="responses-stream",
        stream=True,
        extra_headers=script(output_tokens=17, reasoning_tokens=3),
    )
    events = list(raw.parse())
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == 20
    assert rig.ledger_entry(raw.headers["x-spendgate-reservation-id"])["amount"] == priced(
        only_call(rig, "responses-stream")
    )


def test_anthropic_messages_plain_and_streamed_with_cache_tokens_and_cumulative_deltas(rig: Rig) -> None:
    who = customer(rig, "messages")
    sdk = rig.anthropic(who)
    raw = sdk.messages.with_raw_response.create(
        model=ANTHROPIC_MODEL,
        max_tokens=400,
        messages=[{"role": "user", "content": "messages-plain"}],
        extra_headers=script(input_tokens=20, cached_tokens=2_000, cache_write_tokens=500, output_tokens=60),
    )
    assert raw.parse().usage.cache_read_input_tokens == 2_000
    entry = rig.ledger_entry(raw.headers["x-spendgate-reservation-id"])
    assert entry["amount"] == priced(only_call(rig, "messages-plain"))
    assert {p["token_type"]: p["tokens"] for p in entry["usage"]["parts"]} == {
        "input": 20,
        "cached_input": 2_000,
        "cache_write": 500,
        "output": 60,
    }
    with sdk.messages.with_streaming_response.create(
        model=ANTHROPIC_MODEL,
        max_tokens=400,
        messages=[{"role": "user", "content": "messages-stream"}],
        stream=True,
        extra_headers=script(cached_tokens=10, output_tokens=90, message_deltas=3),
    ) as response:
        reservation = response.headers["x-spendgate-reservation-id"]
        kinds = [event.type for event in response.parse()]
    assert kinds[0] == "message_start" and kinds.count("message_delta") == 3 and kinds[-1] == "message_stop"
    call = only_call(rig, "messages-stream")
    # The deltas said 30, 60, 90 (cumulative): 90 output tokens, not 180.
    assert rig.ledger_entry(reservation)["usage"]["parts"][-1] == {
        "token_type": "output",
        "tokens": 90,
        "units": rig.ledger_entry(reservation)["usage"]["parts"][-1]["units"],
    }
    assert rig.ledger_entry(reservation)["amount"] == priced(call)


def test_a_client_that_leaves_mid_stream_is_still_billed_its_exact_usage(rig: Rig) -> None:
    who = customer(rig, "disconnect")
    with rig.openai(who).chat.completions.with_streaming_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "disconnect"}],
        stream=True,
        extra_headers=script(output_tokens=55, chunks=20, delay_ms=25),
    ) as response:
        reservation = response.headers["x-spendgate-reservation-id"]
        for index, _ in enumerate(response.iter_lines()):
            if index == 2:
                break  # leaving the block closes the connection mid-stream
    entry = rig.ledger_entry(reservation)  # committed only once the drained stream gave its usage
    call = only_call(rig, "disconnect")
    assert call.finished and not call.client_gone  # the proxy read upstream to its end
    assert entry["amount"] == priced(call) and entry["amount"] < entry["reserved"]


def test_an_upstream_500_before_the_stream_releases_the_hold(rig: Rig) -> None:
    who = customer(rig, "fault-before")
    sdk = rig.openai(who, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        list(
            sdk.chat.completions.create(
                model=OPENAI_MODEL,
                messages=[{"role": "user", "content": "fault-before"}],
                stream=True,
                extra_headers=script(fault="500"),
            )
        )
    balance = rig.client.balance(who)
    assert balance.spent == 0 and balance.reserved == 0 and balance.active_holds == 0
    with pytest.raises(anthropic.InternalServerError):
        rig.anthropic(who, max_retries=0).messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=[{"role": "user", "content": "fault-before-a"}],
            extra_headers=script(fault="500"),
        )
    assert rig.client.balance(who).spent == 0 and rig.client.balance(who).reserved == 0


def test_an_upstream_error_during_the_stream_surfaces_and_commits_the_whole_hold(rig: Rig) -> None:
    who = customer(rig, "fault-during")
    with rig.openai(who, max_retries=0).chat.completions.with_streaming_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "fault-during"}],
        stream=True,
        extra_headers=script(fault="during", fault_after=2),
    ) as response:
        reservation = response.headers["x-spendgate-reservation-id"]
        with pytest.raises(openai.APIError):
            list(response.parse())
    entry = rig.ledger_entry(reservation)
    assert entry["amount"] == entry["reserved"]  # the usage is unknown: never bill less than the call may cost
    with rig.anthropic(who, max_retries=0).messages.with_streaming_response.create(
        model=ANTHROPIC_MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "fault-drop"}],
        stream=True,
        extra_headers=script(fault="drop", fault_after=2),
    ) as response:
        reservation = response.headers["x-spendgate-reservation-id"]
        with pytest.raises((anthropic.APIError, httpx2.HTTPError)):
            list(response.parse())
    entry = rig.ledger_entry(reservation)
    assert entry["amount"] == entry["reserved"]


def test_a_denial_is_the_providers_quota_error_and_the_sdk_does_not_retry(rig: Rig) -> None:
    who = customer(rig, "denied", limit=10)
    attempts: list[str] = []
    hooks = {"request": [lambda request: attempts.append(str(request.url))]}
    sdk = rig.openai(who, http_client=openai.DefaultHttpxClient(event_hooks=hooks))  # default max_retries=2
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "denied"}])
    error = raised.value
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert "DENY_REASON_INSUFFICIENT_BUDGET" in error.message and "remaining 10" in error.message
    assert error.response.headers["x-should-retry"] == "false" and len(attempts) == 1
    anthropic_attempts: list[str] = []
    client = anthropic.DefaultHttpxClient(event_hooks={"request": [lambda r: anthropic_attempts.append(str(r.url))]})
    with pytest.raises(anthropic.RateLimitError) as refused:
        rig.anthropic(who, http_client=client).messages.create(
            model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "denied-a"}]
        )
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "DENY_REASON_INSUFFICIENT_BUDGET" in refused.value.message and len(anthropic_attempts) == 1
    assert not [call for call in rig.fake.calls if "denied" in json.dumps(call.body)]  # nothing was forwarded


def test_a_virtual_key_names_the_customer_and_the_proxy_sends_the_provider_key(rig: Rig) -> None:
    who = customer(rig, "keyed")
    key = rig.key_create(who)
    reply = rig.openai(None, api_key=key).chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "keyed-openai"}]
    )
    assert reply.usage is not None
    call = only_call(rig, "keyed-openai")
    assert call.headers["Authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}" and key not in json.dumps(call.headers)
    rig.anthropic(None, api_key=key).messages.create(
        model=ANTHROPIC_MODEL, max_tokens=20, messages=[{"role": "user", "content": "keyed-anthropic"}]
    )
    headers = {name.lower(): value for name, value in only_call(rig, "keyed-anthropic").headers.items()}
    assert headers["x-api-key"] == ANTHROPIC_UPSTREAM_KEY and key not in json.dumps(headers)
    assert rig.client.balance(who).spent == priced(call) + priced(only_call(rig, "keyed-anthropic"))
    with pytest.raises(openai.AuthenticationError):
        rig.openai(None, api_key=key[:-2] + "xx").chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)


def test_who_pays_must_be_known_and_have_a_budget(rig: Rig) -> None:
    with pytest.raises(openai.AuthenticationError) as unnamed:
        rig.openai(None).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert "x-spendgate-customer-id" in unnamed.value.message
    with pytest.raises(openai.PermissionDeniedError) as unknown:
        rig.openai("nobody-has-this-budget").chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert "no budget" in unknown.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        rig.anthropic("nobody-has-this-budget").messages.create(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES)


def test_other_routes_are_404_in_the_providers_shape(rig: Rig) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        rig.openai("anyone").models.list()
    assert missing.value.type == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as absent:
        rig.anthropic("anyone").models.list()
    assert absent.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_an_unknown_model_is_denied_before_the_call(rig: Rig) -> None:
    who = customer(rig, "unknown-model")
    with pytest.raises(openai.RateLimitError) as raised:
        rig.openai(who).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "DENY_REASON_UNKNOWN_MODEL" in raised.value.message


def test_64_concurrent_streams_on_one_budget_never_overspend_and_each_bills_its_usage(rig: Rig) -> None:
    per_hold = TABLE.estimate(OPENAI_MODEL, 4_096 + 400, 64).units  # about what one of these calls holds
    limit = per_hold * 20  # room for about 20 of the 64 at once
    who = customer(rig, "crowd", limit=limit)

    async def one(sdk: openai.AsyncOpenAI, index: int) -> tuple[int, str | None]:
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=OPENAI_MODEL,
                messages=[{"role": "user", "content": f"crowd-{index:02d}"}],
                stream=True,
                max_completion_tokens=64,
                extra_headers=script(output_tokens=1 + index % 60, cached_tokens=index, chunks=5, delay_ms=10),
            )
            async for _ in raw.parse():
                pass
            return index, raw.headers["x-spendgate-reservation-id"]
        except openai.RateLimitError as denied:
            assert "DENY_REASON_INSUFFICIENT_BUDGET" in denied.message
            return index, None

    async def crowd() -> list[tuple[int, str | None]]:
        sdk = rig.async_openai(
            who, max_retries=0, http_client=openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=64))
        )
        try:
            return await asyncio.gather(*(one(sdk, index) for index in range(64)))
        finally:
            await sdk.close()

    results = asyncio.run(crowd())
    granted = [(index, reservation) for index, reservation in results if reservation]
    assert 0 < len(granted) < 64, len(granted)  # some were denied: the budget was the bound
    total = 0
    for index, reservation in granted:
        entry = rig.ledger_entry(reservation)
        assert entry["amount"] == priced(only_call(rig, f"crowd-{index:02d}")), index
        total += entry["amount"]
    balance = rig.client.balance(who)
    assert balance.spent == total <= limit and balance.reserved == 0 and balance.overdraft == 0
    denied = 64 - len(granted)
    assert len([call for call in rig.fake.calls if "crowd-" in json.dumps(call.body)]) == len(granted), denied


def test_the_bundled_prices_bound_every_call_here(rig: Rig) -> None:
    # The bounds the proxy reserves with come from the table: a model without them could not be proxied unbounded.
    for model in (OPENAI_MODEL, ANTHROPIC_MODEL):
        price, _ = TABLE.price_of(model)
        assert price.context_window_tokens and price.max_output_tokens


def test_every_call_is_counted_by_outcome(rig: Rig) -> None:
    who = customer(rig, "counted")
    rig.openai(who).chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "counted"}])
    with pytest.raises(openai.RateLimitError):
        rig.openai(customer(rig, "counted-poor", limit=1)).chat.completions.create(
            model=OPENAI_MODEL, messages=MESSAGES
        )
    metrics = httpx2.get(rig.sidecar.http_url + "/metrics").text
    assert 'spendgate_proxy_calls_total{api="chat",outcome="committed_exact"}' in metrics
    assert 'spendgate_proxy_calls_total{api="chat",outcome="denied"}' in metrics


def test_a_call_that_names_its_customer_is_refused_through_a_foreign_host_name(rig: Rig) -> None:
    """DNS rebinding: a web page the operator visits could point its own name at the proxy and bill any customer by
    naming it. Such a page sends its own name as the Host; loopback names and IP addresses pass."""
    who = customer(rig, "rebind-victim")

    def through(host: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=rig.sidecar.proxy_url + "/v1",
            api_key="sk-client",
            default_headers={"x-spendgate-customer-id": who, "Host": host},
        )

    foreign = through("rebind.attacker.example")
    with pytest.raises(openai.APIStatusError) as refused:
        foreign.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES, max_completion_tokens=10)
    assert refused.value.status_code == 421 and "http_allowed_hosts" in refused.value.message
    assert rig.client.balance(who).spent == 0 and rig.client.balance(who).reserved == 0
    for host in ("localhost", "127.0.0.1"):
        through(host).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES, max_completion_tokens=10)
    assert rig.client.balance(who).spent > 0
