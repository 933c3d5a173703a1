"""Decoding an HTTP request body into JSON: strict, and with bounded nesting.

Python's `json` accepts more than the API promises: bytes in UTF-16 or UTF-32
(it guesses the encoding), `NaN` and `Infinity`, duplicate keys (the last one
silently wins), and nesting as deep as the interpreter's recursion limit, past
which it raises RecursionError instead of a decode error. Each of these is
refused here as `invalid_json`, so a body means one thing or is a 400.

Nesting is measured before `json.loads` runs, so no RecursionError is possible
there or in anything that later walks the value (views, storage, msgpack): the
strings are cut out, every `[]`/`{}` pair with nothing but scalars inside is
removed, and that repeats. Each pass removes one level, so a body still holding
brackets after MAX_JSON_DEPTH passes is nested deeper than that, or its brackets
do not balance. Each pass is one regular-expression scan, so a 1 MiB body costs
at most MAX_JSON_DEPTH linear scans.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from coordinator.errors import InvalidRequest, brief

# The deepest nesting a body may have; the top-level object is level 1. The API's
# deepest documented body (constraints inside the allocate object) is level 2, so
# 32 leaves `workload_data` room for any sensible structure.
MAX_JSON_DEPTH = 32

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def decode_json_body(raw: bytes) -> Any:
    """The JSON value of a request body.

    Raises InvalidRequest (code `invalid_json`) for an empty body, bytes that are not
    UTF-8, nesting deeper than MAX_JSON_DEPTH, unbalanced brackets, duplicate object
    keys, `NaN`/`Infinity`, integers of more than 4,300 digits, and any other decode error.
    """
    if not raw:
        raise InvalidRequest("a JSON request body is required", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not UTF-8 (invalid byte at offset {exc.start})", code="invalid_json"
        ) from None
    check_nesting(text)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, and the two hooks' refusals
        raise InvalidRequest(f"request body is not valid JSON: {brief(str(exc))}", code="invalid_json") from None


def check_nesting(text: str) -> None:
    """Raise InvalidRequest (`invalid_json`) if `text` nests deeper than MAX_JSON_DEPTH or its brackets do not balance."""
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(MAX_JSON_DEPTH):
        if not skeleton:
            return
        shorter = _INNERMOST.sub("", skeleton)
        if shorter == skeleton:
            raise InvalidRequest("request body is not valid JSON: its brackets do not balance", code="invalid_json")
        skeleton = shorter
    if skeleton:
        raise InvalidRequest(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects", code="invalid_json"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {brief(repr(key))}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")
