"""requiem.digest against the public BLAKE3 and RFC 8785 vectors."""

from __future__ import annotations

import json

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from requiem import digest
from requiem.errors import JsonDuplicateKey, JsonParseError

RFC8785_CASES = ["arrays", "french", "structures", "unicode", "values", "weird"]


def _blake3_cases(vectors):
    return json.loads((vectors / "blake3" / "test_vectors.json").read_text())


def test_blake3_all_official_vectors(vectors):
    """Every case of the official file matches in all three modes, byte for byte."""
    spec = _blake3_cases(vectors)
    key = spec["key"].encode("ascii")
    context = spec["context_string"]

    assert len(spec["cases"]) == 35
    for case in spec["cases"]:
        data = bytes(i % 251 for i in range(case["input_len"]))
        xof_len = len(case["hash"]) // 2
        assert digest.of_bytes(data) == case["hash"][:64]
        assert blake3.blake3(data).hexdigest(length=xof_len) == case["hash"]
        keyed = blake3.blake3(data, key=key).hexdigest(length=xof_len)
        assert keyed == case["keyed_hash"]
        derived = blake3.blake3(data, derive_key_context=context)
        assert derived.hexdigest(length=xof_len) == case["derive_key"]


def test_streaming_digest_equals_one_shot(vectors, tmp_path):
    data = bytes(i % 251 for i in range(3 * digest.CHUNK + 17))
    path = tmp_path / "blob"
    path.write_bytes(data)

    assert digest.of_file(path) == digest.of_bytes(data)


@pytest.mark.parametrize("name", RFC8785_CASES)
def test_rfc8785_vectors_byte_for_byte(vectors, name):
    source = (vectors / "rfc8785" / "input" / f"{name}.json").read_bytes()
    expected = (vectors / "rfc8785" / "output" / f"{name}.json").read_bytes()

    assert digest.canonical_json(digest.parse_json(source)) == expected


def test_record_digest_is_domain_separated():
    """The same record hashes differently as a request and as a result."""
    record = {"exit_code": 0}

    as_request = digest.of_record("req", record)
    as_result = digest.of_record("res", record)

    assert as_request != as_result
    assert as_request == digest.of_bytes(b'req:{"exit_code":0}')


def test_duplicate_key_is_refused_with_its_code():
    with pytest.raises(JsonDuplicateKey) as caught:
        digest.parse_json('{"a": 1, "a": 2}')
    assert caught.value.code == "json_duplicate_key"


@pytest.mark.parametrize(
    "text", ['{"a": NaN}', "[Infinity]", "[-Infinity]", "{", "", "[" + "7" * 5000 + "]"]
)
def test_nan_infinity_huge_integers_and_garbage_are_parse_errors(text):
    with pytest.raises(JsonParseError) as caught:
        digest.parse_json(text)
    assert caught.value.code == "json_parse_error"


def test_canonicalising_nan_is_refused():
    with pytest.raises(JsonParseError):
        digest.canonical_json({"x": float("nan")})


def test_invalid_utf8_is_a_parse_error():
    with pytest.raises(JsonParseError):
        digest.parse_json(b'{"a": "\xff"}')


@given(st.binary(max_size=4096))
def test_is_digest_accepts_only_lowercase_hex(data):
    value = digest.of_bytes(data)
    assert digest.is_digest(value)
    assert not digest.is_digest(value.upper())
    assert not digest.is_digest(value[:-1])


@pytest.mark.parametrize(
    "text", [r'{"\udfff": 1}', r'["x\ud800"]', r'["\ude02\ud83d"]']
)
def test_lone_surrogate_escapes_are_parse_errors(text):
    with pytest.raises(JsonParseError, match="lone surrogate"):
        digest.parse_json(text)


def test_a_surrogate_pair_is_one_character():
    assert digest.parse_json(r'["\ud83d\ude02"]') == ["\U0001f602"]
