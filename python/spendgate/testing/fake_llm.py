"""A fake LLM provider on loopback that answers as OpenAI and Anthropic do, for tests and demos of the proxy.

    with FakeLLM() as fake:                                  # an aiohttp server in a thread of its own
        OpenAI(base_url=fake.openai_base_url, api_key="sk-test")
        Anthropic(base_url=fake.anthropic_base_url, api_key="sk-ant-test")
        fake.calls[-1].usage                                 # the usage object it reported, as the provider shapes it

Routes: POST /v1/chat/completions, /v1/responses (OpenAI) and /v1/messages (Anthropic), whole or streamed as
server-sent events in the providers' own shapes (field names from openai-python's and anthropic-sdk-python's types):
- Chat: `usage` with prompt_tokens (cached included, prompt_tokens_details.cached_tokens) and completion_tokens
  (reasoning included, completion_tokens_details.reasoning_tokens); a stream sends its usage as one extra chunk
  with `"choices": []` before `data: [DONE]` only when stream_options.include_usage is true, and then `"usage": null`
  on every other chunk.
- Responses: response.created ... response.output_text.delta ... response.completed, whose response.usage is final
  (input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens).
- Messages: message_start (input_tokens, cache_creation_input_tokens, cache_read_input_tokens, output_tokens 1), ping,
  content blocks, one or more message_delta whose usage.output_tokens is cumulative, message_stop.

What a call does is scripted: FakeLLM(script=Script(...)) for every call, or per request by the JSON of the
`x-fake-llm` header (any Script field, e.g. {"output_tokens": 40, "chunks": 8, "delay_ms": 20, "fault": "during"}).
Faults: "500" answers 500 before any output (the provider's error shape); "during" sends `fault_after` chunks, then
the provider's error event, then ends; "drop" sends `fault_after` chunks, then closes the connection mid-body.
Every call is recorded (`calls`): route, request body and headers, the usage it reported, and whether its client (the
proxy) read it to the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, Final, Self

from aiohttp import web

SCRIPT_HEADER: Final[str] = "x-fake-llm"
FAULTS: Final[tuple[str, ...]] = ("", "500", "during", "drop")
START_TIMEOUT_S: Final[float] = 10.0


@dataclasses.dataclass(frozen=True)
class Script:
    """What a call answers. Token counts are disjoint: input excludes cached and cache-write tokens, output excludes
    reasoning tokens; each API reports them its own way. input_tokens -1: the request body's bytes // 8 (always
    within the proxy's bytes bound)."""

    input_tokens: int = -1
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # Anthropic cache_creation_input_tokens
    output_tokens: int = 12
    reasoning_tokens: int = 0  # OpenAI only (Anthropic counts thinking in output_tokens)
    chunks: int = 4
    delay_ms: int = 0  # before each chunk of a stream
    message_deltas: int = 1  # Anthropic: cumulative message_delta events
    fault: str = ""
    fault_after: int = 1
    status: int = 500  # the status of fault "500"

    def __post_init__(self) -> None:
        assert self.fault in FAULTS, self.fault


@dataclasses.dataclass
class FakeCall:
    route: str
    body: dict[str, Any]
    headers: dict[str, str]
    script: Script
    stream: bool
    usage: dict[str, Any] | None = None  # as reported to the client (None: no usage was reported)
    finished: bool = False  # every byte of the answer was written (the client read it to the end)
    client_gone: bool = False  # the client closed the connection before the end
    model: str = ""


class FakeLLM:
    """See the module docstring. `calls` may be read from any thread."""

    def __init__(self, *, script: Script | None = None, port: int = 0, start: bool = True) -> None:
        self.script = script or Script()
        self.calls: list[FakeCall] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def start(self) -> FakeLLM:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-llm", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S) or not self.port:
            raise RuntimeError("the fake LLM did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._cleanup(), loop).result(START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        ready.set()
        loop.run_forever()
        loop.close()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- one call ---------------------------------------------------------------------------------------------------

    async def _begin(self, request: web.Request, route: str) -> FakeCall:
        body = await request.json()
        script = self.script
        if SCRIPT_HEADER in request.headers:
            script = dataclasses.replace(script, **json.loads(request.headers[SCRIPT_HEADER]))
        if script.input_tokens < 0:
            script = dataclasses.replace(script, input_tokens=max(1, request.content_length or 0) // 8 or 1)
        call = FakeCall(
            route, body, dict(request.headers), script, body.get("stream") is True, model=str(body.get("model", ""))
        )
        with self._lock:
            self.calls.append(call)
        return call

    def _id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    async def _fault_500(self, call: FakeCall, anthropic: bool) -> web.Response:
        message = "The server had an error while processing your request. Sorry about that!"
        if anthropic:
            body: dict[str, Any] = {"type": "error", "error": {"type": "api_error", "message": message}}
        else:
            body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return web.json_response(body, status=call.script.status)

    async def _stream(
        self, request: web.Request, call: FakeCall, events: Iterator[bytes], error_event: bytes
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": self._id("req"),
            }
        )
        await response.prepare(request)
        script = call.script
        try:
            for index, event in enumerate(events):
                if script.fault in ("during", "drop") and index == script.fault_after + 1:
                    if script.fault == "drop":
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    await response.write(error_event)
                    call.usage = None
                    await response.write_eof()
                    return response
                if script.delay_ms:
                    await asyncio.sleep(script.delay_ms / 1000)
                await response.write(event)
            await response.write_eof()
            call.finished = True
        except (ConnectionError, OSError):
            call.client_gone = True
        return response

    # -- OpenAI Chat Completions -------------------------------------------------------------------------------------

    def _chat_usage(self, s: Script) -> dict[str, Any]:
        prompt, completion = s.input_tokens + s.cached_tokens, s.output_tokens + s.reasoning_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": s.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        call = await self._begin(request, "chat")
        s = call.script
        if s.fault == "500":
            return await self._fault_500(call, anthropic=False)
        usage = self._chat_usage(s)
        rid, created = self._id("chatcmpl"), int(time.time())
        text = [f"tok{i} " for i in range(s.chunks)]
        if not call.stream:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i in range(int(call.body.get("n") or 1))
            ]
            call.usage, call.finished = usage, True
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": call.model,
                    "choices": choices,
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                },
                headers={"x-request-id": self._id("req")},
            )
        options = call.body.get("stream_options") or {}
        include = isinstance(options, dict) and options.get("include_usage") is True
        call.usage = usage if include else None

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            document: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": call.model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include:
                document["usage"] = None
            return b"data: " + json.dumps(document).encode() + b"\n\n"

        def events() -> Iterator[bytes]:
            yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
            for piece in text:
                yield chunk({"content": piece}, None)
            yield chunk({}, "stop")
            if include:
                final = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": call.model,
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": usage,
                }
                yield b"data: " + json.dumps(final).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        error = {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return await self._stream(request, call, events(), b"data: " + json.dumps(error).encode() + b"\n\n")

    # -- OpenAI Responses --------------------------------------------------------------------------------------------

    def _response_object(self, call: FakeCall, rid: str, status: str, text: str, usage: Any) -> dict[str, Any]:
        output = (
            []
            if status == "in_progress"
            else [
                {
                    "type": "message",
                    "id": f"msg_{rid}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
                }
            ]
        )
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": call.body.get("max_output_tokens"),
            "model": call.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        call = await self._begin(request, "responses")
        s = call.script
        if s.fault == "500":
            return await self._fault_500(call, anthropic=False)
        prompt, completion = s.input_tokens + s.cached_tokens, s.output_tokens + s.reasoning_tokens
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": s.cached_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
            "total_tokens": prompt + completion,
        }
        rid = self._id("resp")
        pieces = [f"tok{i} " for i in range(s.chunks)]
        call.usage = usage
        if not call.stream:
            call.finished = True
            return web.json_response(self._response_object(call, rid, "completed", "".join(pieces), usage))
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            document = {"type": kind, "sequence_number": next(sequence), **fields}
            return f"event: {kind}\ndata: {json.dumps(document)}\n\n".encode()

        def events() -> Iterator[bytes]:
            item = f"msg_{rid}"
            yield event("response.created", response=self._response_object(call, rid, "in_progress", "", None))
            yield event(
                "response.output_item.added",
                output_index=0,
                item={"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []},
            )
            yield event(
                "response.content_part.added",
                item_id=item,
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
            for piece in pieces:
                yield event(
                    "response.output_text.delta",
                    item_id=item,
                    output_index=0,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                )
            yield event(
                "response.output_text.done",
                item_id=item,
                output_index=0,
                content_index=0,
                text="".join(pieces),
                logprobs=[],
            )
            yield event(
                "response.completed", response=self._response_object(call, rid, "completed", "".join(pieces), usage)
            )

        error = {
            "type": "error",
            "code": "server_error",
            "message": "The server had an error.",
            "param": None,
            "sequence_number": 0,
        }
        return await self._stream(request, call, events(), f"event: error\ndata: {json.dumps(error)}\n\n".encode())

    # -- Anthropic Messages ------------------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        call = await self._begin(request, "messages")
        s = call.script
        if s.fault == "500":
            return await self._fault_500(call, anthropic=True)
        usage = {
            "input_tokens": s.input_tokens,
            "cache_creation_input_tokens": s.cache_write_tokens,
            "cache_read_input_tokens": s.cached_tokens,
            "output_tokens": s.output_tokens,
            "service_tier": "standard",
        }
        mid = self._id("msg")
        pieces = [f"tok{i} " for i in range(s.chunks)]
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        call.usage = usage
        if not call.stream:
            call.finished = True
            whole = {
                **message,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": "end_turn",
                "usage": usage,
            }
            return web.json_response(whole, headers={"request-id": self._id("req")})

        def event(kind: str, **fields: Any) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

        def events() -> Iterator[bytes]:
            yield event("message_start", message={**message, "usage": {**usage, "output_tokens": 1}})
            yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield event("ping")
            for piece in pieces:
                yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
            yield event("content_block_stop", index=0)
            for n in range(1, s.message_deltas + 1):  # cumulative counts: the last one is the total
                yield event(
                    "message_delta",
                    delta={"stop_reason": "end_turn", "stop_sequence": None},
                    usage={"output_tokens": s.output_tokens * n // s.message_deltas},
                )
            yield event("message_stop")

        error = {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}
        return await self._stream(request, call, events(), f"event: error\ndata: {json.dumps(error)}\n\n".encode())


def main() -> None:
    """`python -m spendgate.testing.fake_llm [PORT]`: serve until interrupted (for demos of the proxy)."""
    import sys

    fake = FakeLLM(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(
        f"fake LLM on {fake.url}: OpenAI base_url {fake.openai_base_url}, Anthropic base_url {fake.anthropic_base_url}"
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
