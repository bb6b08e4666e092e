"""The Open Inference Protocol (KServe V2) REST as this server speaks it: an inference request parsed
and checked, the response, the model's metadata and the errors built. Pure: no torch, no HTTP.

A request (``POST /v2/models/<name>/infer``) gives one string per row in the BYTES input ``text``
and, optionally, the second segment of each row in ``text_pair`` (as the learner's events do)::

    {"id": "42",
     "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["great film", "dull"]}],
     "outputs": [{"name": "label"}]}

``shape`` is ``[n]`` or ``[n, 1]``, ``data`` holds n strings, flat or nested as the shape is. ``id``,
``parameters`` and ``outputs`` are optional; without ``outputs`` both outputs are answered::

    {"model_name": "stream-learner", "model_version": "7", "id": "42",
     "outputs": [{"name": "label", "datatype": "BYTES", "shape": [2], "data": ["pos", "neg"]},
                 {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, …]}]}

``model_version`` names the version whose weights computed every row. Anything else is refused with
:class:`BadRequest`, whose message says what is wrong; it never raises another exception, whatever
the body (a property test sends it arbitrary JSON and bytes).

>>> r = parse_infer_request(
...     b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}'
... )
>>> r.texts, r.pairs, r.outputs
(('hi',), None, ('label', 'probabilities'))
>>> parse_infer_request(b'{"inputs": []}')
Traceback (most recent call last):
...
stream_learner.service.serving.protocol.BadRequest: 'inputs' is empty: give the BYTES input 'text'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import orjson

TEXT, TEXT_PAIR = "text", "text_pair"
LABEL, PROBABILITIES = "label", "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
PLATFORM = "pytorch_transformers"  # what the metadata's ``platform`` says: plain transformers weights
_SHOWN = 40  # characters of a name given in a request repeated in an error message


class BadRequest(ValueError):
    """The request breaks the protocol (HTTP 400); the message says what is wrong and what to send."""


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: ``texts`` (one per row), ``pairs`` (None or one per row), the
    ``outputs`` asked for (in the order answered) and the request's ``id``, if it gave one."""

    texts: tuple[str, ...]
    pairs: tuple[str, ...] | None
    outputs: tuple[str, ...]
    id: str | None = None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def _flatten(data: list, where: str) -> list[str]:
    """The strings of ``data``, flat or nested (row-major), without recursion: a body of a thousand
    nested lists is refused, not a stack overflow."""
    out: list[str] = []
    iters = [iter(data)]
    while iters:
        try:
            item = next(iters[-1])
        except StopIteration:
            iters.pop()
            continue
        if isinstance(item, list):
            iters.append(iter(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise BadRequest(f"{where} holds {_shown(item)}, not a string: BYTES data are JSON strings")
    return out


def _rows(tensor: dict, where: str) -> tuple[str, ...]:
    """The strings of one BYTES input tensor, checked against its shape."""
    datatype = tensor.get("datatype")
    if datatype != "BYTES":
        raise BadRequest(f'{where} has datatype {_shown(datatype)}: it must be "BYTES" (one string a row)')
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or len(shape) not in (1, 2)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise BadRequest(f"{where} has shape {_shown(shape)}: give [n] (or [n, 1]) for n texts")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise BadRequest(f'{where} has no \'data\' list: give its n strings as "data": ["…", …]')
    texts = _flatten(data, f"{where}'s data")
    if len(texts) != shape[0]:
        raise BadRequest(f"{where} has shape {shape} but {len(texts)} strings in its data")
    if not texts:
        raise BadRequest(f"{where} has no rows: give at least one text")
    for i, text in enumerate(texts):
        if not text.strip():
            raise BadRequest(f"{where}[{i}] is empty: there is nothing to classify")
    return tuple(texts)


def _outputs(requested: object) -> tuple[str, ...]:
    if requested is None:
        return OUTPUTS
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list of {\"name\": …} objects, or left out for both outputs")
    names: list[str] = []
    for i, out in enumerate(requested):
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUTS:
            raise BadRequest(
                f"outputs[{i}] asks for {_shown(name if isinstance(out, dict) else out)}: "
                f"this model answers {LABEL!r} and {PROBABILITIES!r}"
            )
        if name in names:
            raise BadRequest(f"output {name!r} is asked for twice")
        names.append(name)
    return tuple(names) or OUTPUTS


def parse_infer_request(body: bytes) -> InferRequest:
    """Parse and check an inference request's body; :class:`BadRequest` says what is wrong."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as err:  # not UTF-8, not JSON, nested too deep, a lone surrogate
        raise BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object with an 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, not {_shown(request_id)}")
    if not isinstance(request.get("parameters", {}), dict):
        raise BadRequest("'parameters' must be an object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        raise BadRequest("no 'inputs' list: give the BYTES input 'text' (and optionally 'text_pair')")
    if not inputs:
        raise BadRequest("'inputs' is empty: give the BYTES input 'text'")
    tensors: dict[str, dict] = {}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f'inputs[{i}] is not an object: give {{"name", "datatype", "shape", "data"}}')
        name = tensor.get("name")
        if name not in (TEXT, TEXT_PAIR):
            raise BadRequest(
                f"inputs[{i}] is named {_shown(name)}: this model takes {TEXT!r} and optionally {TEXT_PAIR!r}"
            )
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name] = tensor
    if TEXT not in tensors:
        raise BadRequest(f"no input {TEXT!r}: {TEXT_PAIR!r} goes with it, not alone")
    texts = _rows(tensors[TEXT], f"input {TEXT!r}")
    pairs = _rows(tensors[TEXT_PAIR], f"input {TEXT_PAIR!r}") if TEXT_PAIR in tensors else None
    if pairs is not None and len(pairs) != len(texts):
        raise BadRequest(
            f"{TEXT_PAIR!r} has {len(pairs)} rows and {TEXT!r} {len(texts)}: give one pair per text"
        )
    return InferRequest(texts=texts, pairs=pairs, outputs=_outputs(request.get("outputs")), id=request_id)


def infer_response(
    model_name: str,
    version: int,
    request: InferRequest,
    labels: Sequence[str],
    probabilities: np.ndarray,
) -> bytes:
    """The response to ``request``: for each row its label (the most probable) and its
    ``probabilities`` (float32, one per label in ``labels``' order), computed by ``version``."""
    n, k = probabilities.shape
    outputs = {
        LABEL: {
            "name": LABEL,
            "datatype": "BYTES",
            "shape": [n],
            "data": [labels[i] for i in probabilities.argmax(axis=1).tolist()],
        },
        PROBABILITIES: {
            "name": PROBABILITIES,
            "datatype": "FP32",
            "shape": [n, k],
            "data": probabilities.astype(np.float32).ravel().tolist(),
        },
    }
    response: dict = {"model_name": model_name, "model_version": str(version)}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = [outputs[name] for name in request.outputs]
    return orjson.dumps(response)


def model_metadata(model_name: str, version: int, labels: Sequence[str], manifest: dict) -> bytes:
    """``GET /v2/models/<name>``: the protocol's metadata, and in ``parameters`` what the served version
    is (its number, labels, creation time, base model and the events it learned)."""
    created_at = manifest.get("created_at")
    return orjson.dumps(
        {
            "name": model_name,
            "versions": [str(version)],
            "platform": PLATFORM,
            "inputs": [
                {"name": TEXT, "datatype": "BYTES", "shape": [-1]},
                {"name": TEXT_PAIR, "datatype": "BYTES", "shape": [-1], "parameters": {"optional": True}},
            ],
            "outputs": [
                {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(labels)]},
            ],
            "parameters": {
                "version": version,
                "labels": list(labels),
                "created_at": created_at,
                "base_model": manifest.get("base_model"),
                "events_trained": manifest.get("events_trained"),
            },
        }
    )


def error_body(message: str) -> bytes:
    """An error in the protocol's form, ``{"error": "…"}``."""
    return orjson.dumps({"error": message})


def created_timestamp(manifest: dict) -> float | None:
    """The manifest's ``created_at`` as a Unix time; None when it has none or cannot be read.

    >>> created_timestamp({"created_at": "2026-12-06T07:00:00+00:00"})
    1796540400.0
    """
    try:
        value = datetime.fromisoformat(str(manifest["created_at"])).timestamp()
    except (KeyError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) else None
