"""The Open Inference Protocol's requests, parsed (``service/serving/protocol.py``): any body either
parses into rows that match what was sent, or is refused with a 400 whose message says why; never
another exception (which would be a 500)."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.service.serving.protocol import (
    LABEL,
    PROBABILITIES,
    BadRequest,
    InferRequest,
    created_timestamp,
    error_body,
    infer_response,
    model_metadata,
    parse_infer_request,
)


def body(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def text(data: list, name: str = "text", shape: list | None = None, datatype: str = "BYTES") -> dict:
    return {
        "name": name,
        "datatype": datatype,
        "shape": [len(data)] if shape is None else shape,
        "data": data,
    }


def outcome(raw: bytes) -> InferRequest | str:
    """The parse, or the 400's message: anything else raised fails the test."""
    try:
        return parse_infer_request(raw)
    except BadRequest as err:
        assert str(err).strip(), "a 400 without a reason"
        return str(err)


def test_a_request_parses_into_its_rows_pairs_outputs_and_id() -> None:
    parsed = parse_infer_request(
        body(
            text(["good", "bad"]),
            text(["x", "y"], name="text_pair", shape=[2, 1]),
            id="r1",
            outputs=[{"name": "probabilities"}],
            parameters={"content_type": "str"},
        )
    )
    assert parsed == InferRequest(("good", "bad"), ("x", "y"), (PROBABILITIES,), "r1")
    # nested data, as the protocol allows for shape [n, 1]
    assert parse_infer_request(body(text([["a"], ["b"]], shape=[2, 1]))).texts == ("a", "b")
    assert parse_infer_request(body(text(["a"]), outputs=[])).outputs == (LABEL, PROBABILITIES)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'"text"', "JSON object"),
        (b"[" * 5000 + b"]" * 5000, "not JSON"),  # nesting too deep: refused, not a RecursionError
        (
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
            "not JSON",
        ),
        (body(text(["a"]), text(["b"])), "given twice"),
        (body(text(["a"], shape=[1, 2])), "shape"),
        (body(text(["a"], shape=[True])), "shape"),
        (body(text([], shape=[0])), "no rows"),
        (body({"name": "text", "datatype": "BYTES", "shape": [1]}), "no 'data' list"),
        (body(text(["a"]), outputs=[{"name": "label"}, {"name": "label"}]), "twice"),
        (body(text(["a"]), outputs={"name": "label"}), "'outputs' must be a list"),
        (body(text(["a"]), parameters=[1]), "'parameters' must be an object"),
        (body("text"), "not an object"),
    ],
)
def test_what_is_refused_and_why(raw: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=None) as err:
        parse_infer_request(raw)
    assert says in str(err.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
DATA = st.lists(st.text(max_size=12) | st.lists(st.text(max_size=6), max_size=2), max_size=4)
TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["text", "text_pair", "label"]) | JSON,
        "datatype": st.sampled_from(["BYTES", "FP32"]) | JSON,
        "shape": st.lists(st.integers(-1, 4), max_size=3) | JSON,
        "data": DATA | JSON,
        "parameters": JSON,
    },
)
REQUEST = st.fixed_dictionaries(
    {"inputs": st.lists(TENSOR, max_size=3) | JSON},
    optional={
        "id": st.text(max_size=5) | JSON,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from([LABEL, PROBABILITIES]) | JSON}))
        | JSON,
        "parameters": JSON,
    },
)


@settings(max_examples=400, deadline=None)
@given(JSON | REQUEST)
def test_any_json_parses_or_is_refused_with_a_reason(value: object) -> None:
    result = outcome(json.dumps(value).encode())  # json: integers of any size, as clients send them
    if isinstance(result, InferRequest):  # what was accepted is what was sent
        sent = {t["name"]: t for t in value["inputs"]}  # type: ignore[index]
        assert len(result.texts) == sent["text"]["shape"][0] >= 1
        assert all(t.strip() for t in result.texts)
        if result.pairs is not None:
            assert len(result.pairs) == len(result.texts)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_reason(raw: bytes) -> None:
    outcome(raw)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=6),
    with_pairs=st.booleans(),
    nested=st.booleans(),
)
def test_a_valid_request_gives_back_exactly_its_texts(
    texts: list[str], with_pairs: bool, nested: bool
) -> None:
    data = [[t] for t in texts] if nested else texts
    shape = [len(texts), 1] if nested else [len(texts)]
    inputs = [text(data, shape=shape)]
    if with_pairs:
        inputs.append(text(texts[::-1], name="text_pair"))
    parsed = parse_infer_request(orjson.dumps({"inputs": inputs}))
    assert parsed.texts == tuple(texts)
    assert parsed.pairs == (tuple(texts[::-1]) if with_pairs else None)


def test_the_response_holds_each_rows_label_and_probabilities_and_the_version() -> None:
    request = InferRequest(("a", "b"), None, (LABEL, PROBABILITIES), "r")
    probs = np.array([[0.2, 0.8], [0.7, 0.3]], dtype=np.float32)
    response = orjson.loads(infer_response("m", 7, request, ("neg", "pos"), probs))
    assert response["model_name"] == "m" and response["model_version"] == "7" and response["id"] == "r"
    label, probabilities = response["outputs"]
    assert label == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["pos", "neg"]}
    assert probabilities["shape"] == [2, 2] and probabilities["datatype"] == "FP32"
    np.testing.assert_allclose(probabilities["data"], probs.ravel())
    only = InferRequest(("a", "b"), None, (LABEL,), None)
    assert [o["name"] for o in orjson.loads(infer_response("m", 7, only, ("n", "p"), probs))["outputs"]] == [
        LABEL
    ]


def test_metadata_errors_and_the_manifest_time() -> None:
    meta = orjson.loads(model_metadata("m", 3, ("a", "b", "c"), {"created_at": "2026-01-01T00:00:00+00:00"}))
    assert meta["versions"] == ["3"] and meta["outputs"][1]["shape"] == [-1, 3]
    assert meta["parameters"]["labels"] == ["a", "b", "c"]
    assert orjson.loads(error_body("why")) == {"error": "why"}
    assert created_timestamp({"created_at": "2026-01-01T00:00:00+00:00"}) == 1767225600.0
    assert created_timestamp({}) is None and created_timestamp({"created_at": 5}) is None
