"""OpenAI reply bodies from a request's events: chat completions and Responses API objects, streamed as
Server-Sent Events or collected whole. Framework-free: the ASGI `receive` callable is the only link to HTTP.

Events come from `common.serve.admission.InferenceRequest`: ("delta", text), then ("done", result) or ("error", exc).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from common.serve.admission import InferenceRequest
from common.serve.errors import APIError
from common.serve.schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    completion_usage,
    encode,
    error_body,
    new_id,
    now,
    response_usage,
)

KEEPALIVE = b": keep-alive\n\n"
Event = tuple[str, Any]


def sse(payload: bytes, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + payload + b"\n\n"


async def event_stream(inference: InferenceRequest, keepalive_s: float) -> AsyncIterator[Event | None]:
    """Events until done/error, and None every `keepalive_s` of silence; cancels the job if abandoned."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(inference.events.get(), timeout=keepalive_s)
            except TimeoutError:
                event = None
            yield event
            if event is not None and event[0] != "delta":
                return
    finally:
        inference.cancel()  # no-op once finished; stops the generation (or leaves the queue) if the client left


async def collect(receive: Callable[[], Awaitable[dict[str, Any]]], inference: InferenceRequest) -> tuple[str, Any]:
    """The whole text and result of a non-streamed request; a client that hangs up cancels it."""

    async def gather() -> tuple[str, Any]:
        pieces: list[str] = []
        while True:
            kind, payload = await inference.events.get()
            if kind == "delta":
                pieces.append(payload)
            elif kind == "done":
                return "".join(pieces), payload
            else:
                raise payload

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    result_task = asyncio.ensure_future(gather())
    disconnect_task = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if not result_task.done():
            raise APIError(499, "client disconnected")
        return result_task.result()
    finally:
        disconnect_task.cancel()
        if not result_task.done():
            inference.cancel()
            result_task.cancel()


def error_event(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        return encode(error_body(exc.message, exc.type, code=exc.code, param=exc.param))
    return encode(error_body(str(exc), "server_error"))


class ChatReply:
    """A chat completion, whole or as chunks."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), model

    def completion(self, text: str, result: Any) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=[ChatChoice(0, AssistantMessage(text), result.finish_reason)],
                              usage=completion_usage(result))

    def _chunk(self, delta: ChunkDelta, finish: str | None = None) -> bytes:
        return sse(encode(ChatCompletionChunk(self.id, self.created, self.model, [ChunkChoice(0, delta, finish)])))

    async def chunks(self, events: AsyncIterator[Event | None], include_usage: bool) -> AsyncIterator[bytes]:
        yield self._chunk(ChunkDelta(role="assistant", content=""))
        async for event in events:
            if event is None:
                yield KEEPALIVE
                continue
            kind, payload = event
            if kind == "delta":
                yield self._chunk(ChunkDelta(content=payload))
            elif kind == "done":
                yield self._chunk(ChunkDelta(), payload.finish_reason)
                if include_usage:
                    usage = completion_usage(payload)
                    yield sse(encode(ChatCompletionChunk(self.id, self.created, self.model, [], usage=usage)))
            else:
                yield sse(error_event(payload))
        yield b"data: [DONE]\n\n"


class ResponsesReply:
    """A Responses API object, whole or as its event sequence."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.body = body
        self.id, self.message_id, self.created = new_id("resp"), new_id("msg"), now()
        self._sequence = 0

    def response(self, text: str, result: Any | None) -> ResponseObject:
        status, incomplete, usage = "in_progress", None, None
        if result is not None:
            status = "completed" if result.finish_reason != "length" else "incomplete"
            incomplete = IncompleteDetails("max_output_tokens") if status == "incomplete" else None
            usage = response_usage(result)
        output = [OutputMessage(self.message_id, [OutputText(text)], status=status)] if result is not None else []
        body = self.body
        return ResponseObject(id=self.id, created_at=self.created, model=body.model, output=output, status=status,
                              usage=usage, incomplete_details=incomplete, instructions=body.instructions,
                              temperature=body.temperature, top_p=body.top_p,
                              max_output_tokens=body.max_output_tokens)

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse(encode(payload), event=kind)

    def _text_event(self, kind: str, **fields: Any) -> bytes:
        return self._event(kind, item_id=self.message_id, output_index=0, content_index=0, **fields)

    async def events(self, events: AsyncIterator[Event | None]) -> AsyncIterator[bytes]:
        started = self.response("", None)
        yield self._event("response.created", response=started)
        yield self._event("response.in_progress", response=started)
        item = {"id": self.message_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        yield self._event("response.output_item.added", output_index=0, item=item)
        yield self._text_event("response.content_part.added", part={"type": "output_text", "text": "",
                                                                     "annotations": []})
        pieces: list[str] = []
        async for event in events:
            if event is None:
                yield KEEPALIVE
                continue
            kind, payload = event
            if kind == "delta":
                pieces.append(payload)
                yield self._text_event("response.output_text.delta", delta=payload, logprobs=[])
            elif kind == "done":
                text = "".join(pieces)
                final = self.response(text, payload)
                yield self._text_event("response.output_text.done", text=text, logprobs=[])
                yield self._text_event("response.content_part.done", part=OutputText(text))
                yield self._event("response.output_item.done", output_index=0, item=final.output[0])
                done_kind = "response.completed" if final.status == "completed" else "response.incomplete"
                yield self._event(done_kind, response=final)
            else:
                message = payload.message if isinstance(payload, APIError) else str(payload)
                failed = self.response("".join(pieces), None)
                failed.status = "failed"
                failed.error = error_body(message, "server_error").error
                yield self._event("response.failed", response=failed)
