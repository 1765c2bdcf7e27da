"""OpenAI wire types for the server: chat completions, responses, models, errors.

msgspec Structs with snake_case names as OpenAI spells them. Unknown fields are ignored (msgspec's default), so
clients that send newer or vendor-specific fields (Open WebUI does) are not refused. Content parts are one lenient
Struct keyed by `type` rather than a tagged union, so the server can skip part types it does not understand
instead of failing the whole request. `response_format` and the Responses `text.format` are tagged unions
(common.engine.structured): a wrong shape is refused when the body is decoded, naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from common.engine.sampling import MAX_NEW_TOKENS_BOUND, MAX_NGRAM_SIZE, MAX_NGRAM_WINDOW, MAX_SEED, MAX_TOP_K
from common.engine.structured import ResponseFormat, TextParam
from common.model.modes import MAX_SIDE, MAX_TILES

MODEL_ID = "deepseek-ocr"

NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
# Every numeric field is bounded here, so an absurd value is refused while the body is decoded (a 400 naming the
# field), within what common.engine.sampling and common.model.modes check again.
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
TopK = Annotated[int, Meta(ge=0, le=MAX_TOP_K)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS_BOUND)]
NgramSize = Annotated[int, Meta(ge=0, le=MAX_NGRAM_SIZE)]
NgramWindow = Annotated[int, Meta(ge=0, le=MAX_NGRAM_WINDOW)]
ViewSize = Annotated[int, Meta(ge=1, le=MAX_SIDE)]
CropCount = Annotated[int, Meta(ge=1, le=MAX_TILES)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]


# ---------------------------------------------------------------------------------------------------- requests


class ImageURL(Struct):
    url: str
    detail: str | None = None


class FileData(Struct):
    """OpenAI / Open WebUI `file` part payload: `file_data` is a data URL (for example a PDF)."""

    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None
    url: str | None = None


class ContentPart(Struct):
    """One part of a message: text / image_url (chat), input_text / input_image / input_file (responses),
    file (Open WebUI). `image_url` is an object in chat completions and a plain string in the responses API."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    file: FileData | None = None
    file_data: str | None = None  # responses API input_file
    filename: str | None = None


class ChatMessage(Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Struct):
    include_usage: bool = False


class GenerationOptions(Struct):
    """Fields shared by both request kinds, including the DeepSeek-OCR extensions."""

    mode: str | None = None  # tiny, small, base, large, gundam
    base_size: ViewSize | None = None
    image_size: ViewSize | None = None
    crop_mode: bool | None = None
    min_crops: CropCount | None = None
    max_crops: CropCount | None = None
    no_repeat_ngram_size: NgramSize | None = None
    ngram_window: NgramWindow | None = None
    # "strip" (default): <|ref|>/<|det|> grounding markup is removed, as chat clients cannot show boxes;
    # "keep": the model's raw text with the boxes.
    grounding: Literal["strip", "keep"] | None = None


class ChatCompletionRequest(GenerationOptions, kw_only=True):
    messages: list[ChatMessage]
    model: str = MODEL_ID
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None  # one choice only
    user: str | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema"?: {...}}; the schema: common.engine.structured
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None  # each answer token's log-probability (the model's confidence)
    top_logprobs: TopLogprobs | None = None  # and this many most likely tokens at each position (needs logprobs)
    # Accepted only where they leave the answer's meaning as it is: common.serve.admission refuses the rest, naming
    # them. Open WebUI sends its tools with every chat (and no tool_choice): the model simply never calls one.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    modalities: list[str] | None = None
    prediction: Any = None


class ResponseInputItem(Struct):
    """A responses-API input item: a message ({role, content}) or {"type": "message", ...}."""

    role: str = "user"
    content: str | list[ContentPart] | None = None
    type: str | None = None


class ResponsesRequest(GenerationOptions, kw_only=True):
    input: str | list[ResponseInputItem]
    model: str = MODEL_ID
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    text: TextParam | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    top_logprobs: TopLogprobs | None = None  # with include ["message.output_text.logprobs"]
    include: list[str] | None = None
    tools: list[Any] | None = None  # as in chat completions: accepted, never called
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None  # the chat completions field: refused here (the Responses API takes text.format)


# ---------------------------------------------------------------------------------------------------- responses


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorBody


class ModelCard(Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "dsocr"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class CompletionUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Struct):
    content: str
    role: str = "assistant"


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(Struct):
    """One token of the answer: its text, log-probability and UTF-8 bytes, and the most likely tokens there."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprobs] | None
    refusal: list[TokenLogprobs] | None = None


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChunkDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class OutputText(Struct):
    text: str
    type: str = "output_text"
    annotations: list[Any] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # with include ["message.output_text.logprobs"]


class OutputMessage(Struct):
    id: str
    content: list[OutputText]
    status: str = "completed"
    role: str = "assistant"
    type: str = "message"


class InputTokensDetails(Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = field(default_factory=OutputTokensDetails)


class IncompleteDetails(Struct):
    reason: str


class ResponseObject(Struct):
    id: str
    created_at: int
    model: str
    output: list[OutputMessage]
    status: str = "completed"  # in_progress, completed, incomplete
    object: str = "response"
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    error: ErrorBody | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.output for part in item.content)


# ---------------------------------------------------------------------------------------------------- helpers


def new_id(prefix: str) -> str:
    return (
        f"{prefix}-{uuid.uuid4().hex[:24]}" if prefix == "chatcmpl" else f"{prefix}_{uuid.uuid4().hex[:24]}"
    )


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def completion_usage(result: Any) -> CompletionUsage:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return CompletionUsage(prompt, completion, prompt + completion)


def response_usage(result: Any) -> ResponseUsage:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return ResponseUsage(prompt, completion, prompt + completion)
