"""OpenAI reply bodies from a request's handle: chat completions and Responses API objects, streamed as
Server-Sent Events (Litestar frames them) or collected whole.

Streams read the handle on the event loop (`RequestHandle.stream`): text arrives in pieces as large as what was
generated since the last read, and a keep-alive comment goes out after `keepalive_s` of silence. Grounding markup
(`<|ref|>…<|det|>…`) is removed here when the request asks for it: chat clients cannot show boxes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from litestar.response import ServerSentEventMessage

from common.documents.postprocess import GroundingStripper
from common.engine.requests import Delta, GenerationResult, RequestHandle, TokenLogprob
from common.serve.errors import APIError, api_error_for
from common.serve.schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    TokenLogprobs,
    TopLogprob,
    completion_usage,
    encode,
    error_body,
    new_id,
    now,
    response_usage,
)

KEEPALIVE = ServerSentEventMessage(data=None, comment="keep-alive")


def _message(payload: Any, event: str | None = None) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=encode(payload).decode(), event=event)


class Shown:
    """The text a client is shown: the generated text, without grounding markup unless the request keeps it."""

    def __init__(self, strip_grounding: bool) -> None:
        self._stripper = GroundingStripper() if strip_grounding else None

    def feed(self, text: str) -> str:
        return self._stripper.feed(text) if self._stripper is not None else text

    def flush(self) -> str:
        return self._stripper.flush() if self._stripper is not None else ""

    def whole(self, text: str) -> str:
        return self.feed(text) + self.flush()


async def texts(handle: RequestHandle, shown: Shown, keepalive_s: float) -> AsyncIterator[Delta | None]:
    """Shown text (and the tokens' log-probabilities) as they are generated, None after `keepalive_s` of silence;
    the request is cancelled if the reader leaves early. Ends when the request does (raising its error)."""
    try:
        async for delta in handle.stream(keepalive_s):
            if delta is None:
                yield None
            elif (text := shown.feed(delta.text)) or delta.logprobs:
                yield Delta(text, delta.logprobs)
        if tail := shown.flush():
            yield Delta(tail, [])
    finally:
        handle.cancel()  # a no-op once finished; stops the generation if the client left


class TokenNames(Protocol):
    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def logprob_items(entries: list[TokenLogprob] | None, tokens: TokenNames) -> list[TokenLogprobs] | None:
    """OpenAI's shape of per-token log-probabilities: each token's text and UTF-8 bytes (a token may hold part of a
    character), its log-probability, and the most likely tokens at its position."""
    if entries is None:
        return None

    def top(ids: list[int], logprobs: list[float]) -> list[TopLogprob]:
        return [TopLogprob(tokens.token_text(i), lp, list(tokens.token_bytes(i))) for i, lp in zip(ids, logprobs,
                                                                                                  strict=True)]

    return [TokenLogprobs(tokens.token_text(e.token_id), e.logprob, list(tokens.token_bytes(e.token_id)),
                          top(e.top_ids, e.top_logprobs)) for e in entries]


async def collect(receive: Callable[[], Awaitable[dict[str, Any]]], handle: RequestHandle) -> GenerationResult:
    """The result of a non-streamed request; a client that hangs up cancels it."""

    async def finished() -> GenerationResult:
        async for _ in handle.stream():
            pass
        assert handle.result is not None
        return handle.result

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    result_task = asyncio.ensure_future(finished())
    disconnect_task = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if not result_task.done():
            raise APIError(499, "client disconnected")
        return result_task.result()
    finally:
        disconnect_task.cancel()
        if not result_task.done():
            handle.cancel()
            result_task.cancel()


def error_payload(exc: BaseException) -> Any:
    error = api_error_for(exc)
    return error_body(error.message, error.type, code=error.code, param=error.param)


class ChatReply:
    """A chat completion, whole or as chunks."""

    def __init__(self, model: str, tokens: TokenNames) -> None:
        self.id, self.created, self.model, self.tokens = new_id("chatcmpl"), now(), model, tokens

    def completion(self, text: str, result: GenerationResult) -> ChatCompletion:
        items = logprob_items(result.logprobs, self.tokens)
        choice = ChatChoice(0, AssistantMessage(text), result.finish_reason,
                            ChoiceLogprobs(items) if items is not None else None)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                              usage=completion_usage(result))

    def _chunk(self, delta: ChunkDelta, finish: str | None = None, logprobs: list[TokenLogprob] | None = None
               ) -> ServerSentEventMessage:
        items = ChoiceLogprobs(logprob_items(logprobs, self.tokens)) if logprobs else None
        choice = ChunkChoice(0, delta, finish, items)
        return _message(ChatCompletionChunk(self.id, self.created, self.model, [choice]))

    async def chunks(self, handle: RequestHandle, shown: Shown, keepalive_s: float,
                     include_usage: bool) -> AsyncIterator[ServerSentEventMessage]:
        yield self._chunk(ChunkDelta(role="assistant", content=""))
        try:
            async for delta in texts(handle, shown, keepalive_s):
                yield KEEPALIVE if delta is None else self._chunk(ChunkDelta(content=delta.text), None, delta.logprobs)
        except Exception as exc:  # the generation failed after the stream began: say so in the stream
            yield _message(error_payload(exc))
        else:
            result = handle.result
            assert result is not None
            yield self._chunk(ChunkDelta(), result.finish_reason)
            if include_usage:
                usage = completion_usage(result)
                yield _message(ChatCompletionChunk(self.id, self.created, self.model, [], usage=usage))
        yield ServerSentEventMessage(data="[DONE]")


class ResponsesReply:
    """A Responses API object, whole or as its event sequence."""

    def __init__(self, body: ResponsesRequest, tokens: TokenNames) -> None:
        self.body, self.tokens = body, tokens
        self.id, self.message_id, self.created = new_id("resp"), new_id("msg"), now()
        self._sequence = 0

    def response(self, text: str, result: GenerationResult | None) -> ResponseObject:
        status, incomplete, usage = "in_progress", None, None
        if result is not None:
            status = "completed" if result.finish_reason != "length" else "incomplete"
            incomplete = IncompleteDetails("max_output_tokens") if status == "incomplete" else None
            usage = response_usage(result)
        logprobs = logprob_items(result.logprobs, self.tokens) if result is not None else None
        output = [OutputMessage(self.message_id, [OutputText(text, logprobs=logprobs or [])], status=status)
                  ] if result is not None else []
        body = self.body
        return ResponseObject(id=self.id, created_at=self.created, model=body.model, output=output, status=status,
                              usage=usage, incomplete_details=incomplete, instructions=body.instructions,
                              temperature=body.temperature, top_p=body.top_p,
                              max_output_tokens=body.max_output_tokens)

    def _event(self, kind: str, **fields: Any) -> ServerSentEventMessage:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return _message(payload, event=kind)

    def _text_event(self, kind: str, **fields: Any) -> ServerSentEventMessage:
        return self._event(kind, item_id=self.message_id, output_index=0, content_index=0, **fields)

    async def events(self, handle: RequestHandle, shown: Shown, keepalive_s: float
                     ) -> AsyncIterator[ServerSentEventMessage]:
        started = self.response("", None)
        yield self._event("response.created", response=started)
        yield self._event("response.in_progress", response=started)
        item = {"id": self.message_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        yield self._event("response.output_item.added", output_index=0, item=item)
        yield self._text_event("response.content_part.added", part={"type": "output_text", "text": "",
                                                                     "annotations": []})
        pieces: list[str] = []
        try:
            async for delta in texts(handle, shown, keepalive_s):
                if delta is None:
                    yield KEEPALIVE
                    continue
                pieces.append(delta.text)
                yield self._text_event("response.output_text.delta", delta=delta.text,
                                       logprobs=logprob_items(delta.logprobs, self.tokens) or [])
        except Exception as exc:
            failed = self.response("".join(pieces), None)
            failed.status = "failed"
            failed.error = error_payload(exc).error
            yield self._event("response.failed", response=failed)
            return
        assert handle.result is not None
        text = "".join(pieces)
        final = self.response(text, handle.result)
        yield self._text_event("response.output_text.done", text=text,
                               logprobs=logprob_items(handle.result.logprobs, self.tokens) or [])
        yield self._text_event("response.content_part.done", part=OutputText(text))
        yield self._event("response.output_item.done", output_index=0, item=final.output[0])
        yield self._event("response.completed" if final.status == "completed" else "response.incomplete",
                          response=final)
