"""Structured output: JSON constrained by a JSON schema (OpenAI `response_format`), on llguidance.

Three layers, all framework-free:

* `JsonSpec`: what the output must be, from the OpenAI request shapes (chat `response_format`, Responses
  `text.format`: msgspec tagged unions, which the server's request types use) or from a schema read by the CLI.
  A bad shape or schema is an `InputError` naming the field and the problem, raised before any model work.
* `GrammarCompiler`: one per model. Holds llguidance's view of the tokenizer (built from `tokenizer.json`,
  with the MODEL's vocab size so ids the tokenizer lacks are never allowed) and the compiled grammars, cached
  by schema text (an LRU bounded by count and by estimated bytes), so many sequences share one compilation.
* `GrammarMatcher`: the grammar state of one sequence: writes the allowed-token bitmask for the next token,
  consumes the sampled token, says whether EOS is allowed and whether the JSON is complete.

Bitmask layout (llguidance's, also used by vLLM and SGLang): int32 rows of width ceil(vocab_size / 32); id `t`
is allowed when bit `t % 32` of word `t // 32` is set.

Hardening (a schema is untrusted request data):

* its shape is checked first, without recursion (`schema_shape`): size, nesting, `$ref`s, regex patterns;
* llguidance's own checks and compilations run on dedicated threads with a large stack (`on_grammar_thread`): its
  schema handling recurses, and a deep schema must never overflow a thread's stack (a crash, not an error);
* `GRAMMAR_LIMITS` bound its work and memory (grammar size, lexer states, fuel per step), in validation and in
  every matcher;
* validation (with a byte vocabulary) and compilation (with the model's) compute the first mask, walk the forced
  prefix and probe each regex pattern, so a schema that no JSON value matches, or that is too costly to enforce,
  is refused before any sequence decodes with it (`probed_matcher`);
* the compiled grammars are cached within a byte budget (`GrammarCompiler`).


Modules: `masks` (bitmask helpers), `threads` (llguidance's limits and stack-safe threads), `shape` (the
schema's shape), `spec` (JsonSpec, validation and probing), `formats` (the request shapes), `compiler`
(GrammarCompiler, GrammarMatcher). The names below are the package's interface.
"""
from __future__ import annotations

from common.engine.structured.compiler import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_CACHED,
    GrammarCompiler,
    GrammarMatcher,
    entry_bytes_floor,
)
from common.engine.structured.formats import (
    JsonSchemaFormat,
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    TextFormat,
    TextFormatJsonSchema,
    TextParam,
    spec_from_response_format,
    spec_from_text_format,
    spec_from_text_param,
)
from common.engine.structured.masks import (
    allocate_masks,
    allowed_ids,
    ban_within_grammar,
    bitmask_to_bool,
    mask_width,
)
from common.engine.structured.shape import (
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_PATTERNS,
    MAX_SCHEMA_REF_DEPTH,
    MAX_SCHEMA_REFS,
    SchemaShape,
    schema_shape,
)
from common.engine.structured.spec import (
    DEFAULT_SCHEMA_NAME,
    JSON_OBJECT_SCHEMA,
    JsonSpec,
    json_object_spec,
    json_schema_file_spec,
    json_schema_spec,
    probed_matcher,
)
from common.engine.structured.threads import (
    GRAMMAR_LIMITS,
    GRAMMAR_THREAD_STACK_BYTES,
    GRAMMAR_THREADS,
    grammar_limits,
    on_grammar_thread,
)

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MAX_CACHED",
    "DEFAULT_SCHEMA_NAME",
    "GRAMMAR_LIMITS",
    "GRAMMAR_THREADS",
    "GRAMMAR_THREAD_STACK_BYTES",
    "GrammarCompiler",
    "GrammarMatcher",
    "JSON_OBJECT_SCHEMA",
    "JsonSchemaFormat",
    "JsonSpec",
    "MAX_SCHEMA_CHARS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_PATTERNS",
    "MAX_SCHEMA_REFS",
    "MAX_SCHEMA_REF_DEPTH",
    "ResponseFormat",
    "ResponseFormatJsonObject",
    "ResponseFormatJsonSchema",
    "ResponseFormatText",
    "SchemaShape",
    "TextFormat",
    "TextFormatJsonSchema",
    "TextParam",
    "allocate_masks",
    "allowed_ids",
    "ban_within_grammar",
    "bitmask_to_bool",
    "entry_bytes_floor",
    "grammar_limits",
    "json_object_spec",
    "json_schema_file_spec",
    "json_schema_spec",
    "mask_width",
    "on_grammar_thread",
    "probed_matcher",
    "schema_shape",
    "spec_from_response_format",
    "spec_from_text_format",
    "spec_from_text_param",
]
