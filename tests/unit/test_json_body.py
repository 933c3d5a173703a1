"""Request bodies are decoded strictly: UTF-8 only, no duplicate keys, no NaN, bounded nesting."""

from __future__ import annotations

import pytest

from coordinator.errors import InvalidRequest
from coordinator.json_body import MAX_JSON_DEPTH, decode_json_body


def refused(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        decode_json_body(raw)
    assert info.value.code == "invalid_json"


def nested(depth: int, inner: str = "") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def test_nesting_up_to_the_limit_is_decoded() -> None:
    assert decode_json_body(nested(MAX_JSON_DEPTH, "1")) is not None
    assert decode_json_body(b'{"a": {"b": [1, {"c": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}}') is not None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deeper_nesting_is_refused_before_json_runs(depth: int) -> None:
    """The sweep's 1,000-level body: a 400, never a RecursionError (here or in json)."""
    refused(nested(depth), f"deeper than {MAX_JSON_DEPTH} levels")
    refused(b'{"workload_data": {"x": ' + nested(depth) + b"}}", "deeper than")


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a": [1}', b"]]]"])
def test_unbalanced_brackets_are_refused(raw: bytes) -> None:
    refused(raw, "brackets do not balance")


@pytest.mark.parametrize(
    "raw, match",
    [
        ('{"service_name": "s"}'.encode("utf-16"), "not UTF-8"),
        ('{"service_name": "s"}'.encode("utf-32"), "not UTF-8"),
        (b'{"service_name": "\xff"}', "not UTF-8"),
        (b'\xef\xbb\xbf{"service_name": "s"}', "BOM"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "Infinity is not a JSON number"),
        (b"1" * 5000, "4300 digits"),
        (b"", "required"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_what_python_json_would_accept_or_crash_on_is_refused(raw: bytes, match: str) -> None:
    refused(raw, match)


def test_a_long_duplicate_key_is_quoted_briefly() -> None:
    key = "k" * 5000
    with pytest.raises(InvalidRequest) as info:
        decode_json_body(f'{{"{key}": 1, "{key}": 2}}'.encode())
    assert len(info.value.message) < 200 and "…" in info.value.message
