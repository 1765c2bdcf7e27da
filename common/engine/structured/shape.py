"""A schema's shape checked before llguidance sees it, without recursion: size, nesting, `$ref`s, patterns."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import InputError

# A schema is a request field; past this size it is refused before compiling.
MAX_SCHEMA_CHARS = 100_000
# Its shape, checked before llguidance sees it (real schemas stay far below; llguidance's recursion overflowed an
# 8 MiB stack at about 2,500 levels of `$ref`s or nesting): the nesting of the JSON document, the nesting when its
# `$ref`s are followed (each `$ref` one level, so a chain of `$ref`s counts its length; a `$ref` back into what it is
# part of, a recursive schema, is not followed again), the `$ref`s and the distinct regex patterns.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_REF_DEPTH = 256
MAX_SCHEMA_REFS = 500
MAX_SCHEMA_PATTERNS = 128


# ----------------------------------------------------------------------------------------------- schema shape

# Keywords whose values are JSON data, not schemas (a "$ref" or "pattern" inside is not one).
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# Keywords whose values map names to schemas (the names are not keywords).
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_DEFINITIONS = frozenset({"$defs", "definitions"})
_SCHEMA, _NAMES, _DATA = 0, 1, 2


@dataclass(frozen=True)
class SchemaShape:
    """What `schema_shape` measured: nesting of the document, nesting with `$ref`s followed, `$ref`s, patterns."""

    depth: int
    ref_depth: int
    refs: int
    patterns: tuple[str, ...]


def _children(value: Any, kind: int) -> list[tuple[Any, int, bool]]:
    """The container values directly inside `value`: each with what it is (schema, name map, data) and whether it
    holds definitions (`$defs`, `definitions`: compiled where they are referred to, not where they stand)."""
    if isinstance(value, Mapping):
        if kind == _SCHEMA:
            return [
                (v, _DATA if k in _DATA_KEYWORDS else _NAMES if k in _NAME_MAPS else _SCHEMA, k in _DEFINITIONS)
                for k, v in value.items()
                if isinstance(v, Mapping | list)
            ]
        return [(v, kind if kind == _DATA else _SCHEMA, False) for v in value.values() if isinstance(v, Mapping | list)]
    return [(v, kind if kind != _NAMES else _SCHEMA, False) for v in value if isinstance(v, Mapping | list)]


def _too_big(where: str) -> InputError:
    return InputError(f"{where}: the schema is over {MAX_SCHEMA_CHARS} characters; the limit is {MAX_SCHEMA_CHARS}",
                      param=where)


def _walk(schema: Mapping[str, Any], where: str) -> tuple[int, list[str], dict[str, None]]:
    """First pass, without recursion: the nesting (refused past MAX_SCHEMA_DEPTH), the `$ref`s (refused past
    MAX_SCHEMA_REFS) and the regex patterns (`pattern` values and `patternProperties` names)."""
    refs: list[str] = []
    patterns: dict[str, None] = {}
    deepest, containers = 1, 0
    stack: list[tuple[Any, int, int]] = [(schema, _SCHEMA, 1)]
    while stack:
        value, kind, depth = stack.pop()
        containers += 1
        if containers > MAX_SCHEMA_CHARS:  # each takes two characters or more: a schema far past the size limit
            raise _too_big(where)
        if depth > MAX_SCHEMA_DEPTH:
            raise InputError(
                f"{where}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep; the limit is {MAX_SCHEMA_DEPTH}",
                param=where,
            )
        deepest = max(deepest, depth)
        if kind == _SCHEMA and isinstance(value, Mapping):
            ref, pattern, named = value.get("$ref"), value.get("pattern"), value.get("patternProperties")
            if isinstance(ref, str):
                refs.append(ref)
                if len(refs) > MAX_SCHEMA_REFS:
                    raise InputError(
                        f"{where}: the schema has more than {MAX_SCHEMA_REFS} $refs; the limit is {MAX_SCHEMA_REFS}",
                        param=where,
                    )
            if isinstance(pattern, str):
                patterns[pattern] = None
            if isinstance(named, Mapping):
                patterns.update((str(key), None) for key in named)
        stack.extend((child, child_kind, depth + 1) for child, child_kind, _ in _children(value, kind))
    return deepest, refs, patterns


_MISSING = object()


def _resolve(root: Any, ref: str) -> Any:
    """The container a local `$ref` ("#", "#/$defs/a": a JSON pointer) points to; None for any other `$ref`."""
    if not ref.startswith("#"):
        return None
    pointer = urllib.parse.unquote(ref[1:])
    if pointer and not pointer.startswith("/"):
        return None  # an anchor
    node = root
    for token in pointer.split("/")[1:] if pointer else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            node = node.get(token, _MISSING)
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node if isinstance(node, Mapping | list) else None


def _ref_depth(schema: Mapping[str, Any], refs: list[str]) -> int:
    """The nesting of `schema` with its `$ref`s followed, each `$ref` one level; a `$ref` to a part that is being
    followed already (a recursive schema) counts its level and stops there. Definitions count where they are
    referred to, not where they stand. Without recursion: one pass finds, for every part a `$ref` points to, its own
    nesting and the `$ref`s inside it; then the longest expansion from the root is searched depth first (memoized,
    cycles cut)."""
    resolved = {ref: _resolve(schema, ref) for ref in dict.fromkeys(refs)}
    targets = {id(t) for t in resolved.values() if t is not None} | {id(schema)}
    heights: dict[int, int] = {}
    edges: dict[int, list[tuple[int, int]]] = {}  # part -> [(levels down to a $ref inside it, its target)]
    open_parts: list[tuple[int, int]] = []  # the targets among the containers being walked, with their depth
    # Frames: [value, depth, children left, deepest depth below, holds definitions, open parts outside them].
    frames: list[list[Any]] = []

    def enter(value: Any, kind: int, depth: int, definitions: bool) -> None:
        visible = len(open_parts) if definitions else (frames[-1][5] if frames else 0)
        frames.append([value, depth, iter(_children(value, kind)), depth, definitions, visible])
        if id(value) in targets:
            open_parts.append((id(value), depth))
        ref = value.get("$ref") if kind == _SCHEMA and isinstance(value, Mapping) else None
        target = resolved.get(ref) if isinstance(ref, str) else None
        if target is not None:
            for part, part_depth in open_parts[visible:]:
                edges.setdefault(part, []).append((depth - part_depth + 1, id(target)))

    enter(schema, _SCHEMA, 1, False)
    while frames:
        frame = frames[-1]
        child = next(frame[2], None)
        if child is not None:
            enter(child[0], child[1], frame[1] + 1, child[2])
            continue
        frames.pop()
        if open_parts and open_parts[-1] == (id(frame[0]), frame[1]):
            open_parts.pop()
            heights[id(frame[0])] = max(heights.get(id(frame[0]), 0), frame[3] - frame[1] + 1)
        if frames and not frame[4]:
            frames[-1][3] = max(frames[-1][3], frame[3])
    done: dict[int, int] = {}
    best = {id(schema): heights[id(schema)]}
    path: list[list[int]] = [[id(schema), 0]]  # [part, edges taken]
    on_path = {id(schema)}
    while path:
        part, taken = path[-1]
        out = edges.get(part, [])
        if taken < len(out):
            path[-1][1] += 1
            levels, target = out[taken]
            if target in done:
                best[part] = max(best[part], levels + done[target])
            elif target in on_path:
                best[part] = max(best[part], levels)
            else:
                on_path.add(target)
                best[target] = heights.get(target, 1)
                path.append([target, 0])
            continue
        path.pop()
        on_path.discard(part)
        done[part] = best[part]
        if path:
            parent, taken = path[-1]
            best[parent] = max(best[parent], edges[parent][taken - 1][0] + done[part])
    return done[id(schema)]


def schema_shape(schema: Mapping[str, Any], where: str = "schema") -> SchemaShape:
    """Checks a JSON schema's shape before llguidance sees it, without recursion: at most MAX_SCHEMA_DEPTH levels
    of nesting, MAX_SCHEMA_REF_DEPTH levels with its `$ref`s followed, MAX_SCHEMA_REFS `$ref`s and
    MAX_SCHEMA_PATTERNS distinct regex patterns. InputError naming `where` otherwise."""
    depth, refs, patterns = _walk(schema, where)
    ref_depth = _ref_depth(schema, refs) if refs else depth
    if ref_depth > MAX_SCHEMA_REF_DEPTH:
        raise InputError(
            f"{where}: the schema nests {ref_depth} levels deep with its $refs followed (each $ref one level); "
            f"the limit is {MAX_SCHEMA_REF_DEPTH}",
            param=where,
        )
    if len(patterns) > MAX_SCHEMA_PATTERNS:
        raise InputError(
            f"{where}: the schema has {len(patterns)} distinct regex patterns; the limit is {MAX_SCHEMA_PATTERNS}",
            param=where,
        )
    return SchemaShape(depth, ref_depth, len(refs), tuple(patterns))


