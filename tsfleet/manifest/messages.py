"""pydantic's ValidationError as the project's messages: one line per problem, each naming the
key by its dotted place in fleet.yaml and saying what it takes and what it got, in the words
ManifestError always used (no pydantic wording, traceback or documentation URL)."""
from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from annotated_types import Ge, Gt
from pydantic import BaseModel, ValidationError

from tsfleet.manifest.document import HANDLER_PATTERN, NAME_PATTERN, STEP_PATTERN, VERSION_PATTERN

# What each pattern of document.py asks for, as a person says it.
PATTERNS = {
    NAME_PATTERN: "name must be lowercase letters, digits and dashes (at most 63, a letter first)",
    VERSION_PATTERN: "version {input!r} must look like 1.0 or 2.1.3",
    STEP_PATTERN: "expected model or model@version, got {input!r}",
    HANDLER_PATTERN: "expected a path to a .py file, got {input!r}",
}
MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}
NUMBER_ERRORS = {"int_type", "int_from_float", "int_parsing", "float_type", "float_parsing", "finite_number",
                 "greater_than", "greater_than_equal"}
COUNT_WORDS = {1: "one", 2: "two"}
# Why a version is a string: unquoted, YAML reads 1.0 as a float, and 2.10 as 2.1.
QUOTE_HINT = ' (YAML reads 1.0 unquoted as a number: quote it, as "1.0")'
MAX_SHOWN = 20  # a file pasted into the wrong place gives hundreds; the first ones say what happened


def _unwrap(annotation: Any) -> Any:
    """``annotation`` without Annotated and None: ``ServingDoc | None`` -> ServingDoc."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, Any]:
    """The type at ``loc`` of a ``root`` document and the field that declares it (None for a
    dict's value or a list's item); (None, None) where ``loc`` leaves the models."""
    annotation: Any = root
    info: Any = None
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return None, None
            annotation = info.annotation
        elif get_origin(annotation) in (dict, list):
            annotation, info = get_args(annotation)[-1], None
        else:
            return None, None
    return _unwrap(annotation), info


def place(loc: tuple[Any, ...]) -> str:
    """A pydantic location as fleet.yaml's dotted key: models.x.versions.1.0.serving, steps[1]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "manifest"


def _shown(value: Any) -> str:
    """A value where a scalar was expected, as the message shows it: a scalar as written,
    anything else by its kind."""
    if value is None:
        return "nothing"
    return type(value).__name__ if isinstance(value, (dict, list)) else repr(value)


def _kind(value: Any) -> str:
    """A value where a mapping or a list was expected, by its kind: "got str"."""
    return "nothing" if value is None else type(value).__name__


def _expected_number(kind: Any, info: Any) -> str:
    """What a number field takes, from its type and bounds: "a non-negative integer"."""
    noun = "integer" if kind is int else "number"
    for bound in getattr(info, "metadata", ()):
        if isinstance(bound, Gt) and bound.gt == 0 or isinstance(bound, Ge) and bound.ge == 1 and kind is int:
            return f"a positive {noun}"
        if isinstance(bound, Ge) and bound.ge == 0:
            return f"a non-negative {noun}"
        if isinstance(bound, Ge):
            return f"a {noun} >= {bound.ge}"
    return f"an {noun}" if noun == "integer" else f"a {noun}"


def _pattern(error: Any) -> str:
    """A value that does not match its pattern, in the words of PATTERNS."""
    said = PATTERNS.get((error.get("ctx") or {}).get("pattern"))
    return said.format(input=error.get("input")) if said else str(error["msg"])


def _one(error: Any, root: type[BaseModel]) -> str:
    """The message for one of pydantic's errors (after its place)."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":  # a dict's key: a model's name, a version
        if kind == "string_type":
            return f"expected a string key, got {value!r}{QUOTE_HINT}"
        return _pattern(error)
    if kind in MAPPING_ERRORS:
        return f"expected a mapping, got {_kind(value)}"
    if kind in NUMBER_ERRORS:
        field_type, info = _walk(root, loc)
        return f"expected {_expected_number(field_type, info)}, got {_shown(value)}"
    if kind == "bool_type":
        return f"expected true or false, got {_shown(value)}"
    if kind == "string_type":
        hint = QUOTE_HINT if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return f"expected a string, got {_shown(value)}{hint}"
    if kind == "list_type":
        return f"expected a list, got {_kind(value)}"
    if kind == "string_pattern_mismatch":
        return _pattern(error)
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        noun = str(loc[-1]) if least > 1 else str(loc[-1]).rstrip("s")
        return f"at least {COUNT_WORDS.get(least, least)} {noun} needed, got {ctx.get('actual_length', 0)}"
    if kind == "missing":
        return "missing (required)"
    if kind == "value_error" and "error" in ctx:  # raised by a validator of document.py: its own words
        return str(ctx["error"])
    return str(error["msg"])


def problems(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """``exc``'s errors as "place: what" lines, unknown keys of one mapping in one line."""
    lines: list[str] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            if loc[:-1] not in unknown:
                unknown[loc[:-1]] = []
                lines.append("")  # its line, once every key of that mapping is known
            unknown[loc[:-1]].append(str(loc[-1]))
            continue
        key_error = loc and loc[-1] == "[key]"
        lines.append(f"{place(loc[:-1] if key_error else loc)}: {_one(error, root)}")
    extra = iter(unknown.items())
    for i, line in enumerate(lines):
        if not line:
            parent, keys = next(extra)
            section = _walk(root, parent)[0]
            allowed = ", ".join(section.model_fields) if isinstance(section, type) else "?"
            lines[i] = f"{place(parent)}: unknown key(s) {', '.join(sorted(keys))} (allowed: {allowed})"
    if len(lines) > MAX_SHOWN:
        lines[MAX_SHOWN:] = [f"... and {len(lines) - MAX_SHOWN} more"]
    return lines
