"""Hostile input events, generated from a seed: what anyone with write access to the topic could send.

Each generator returns message values (bytes) and Kafka headers. Whether a value is valid is left to
:func:`stream_learner.core.events.parse_event`: the tests check the pipeline's accounting and that nothing
crashes, not the validator against a second copy of itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import orjson

from stream_learner.tools.datasets import TINY, bundled_path, read_jsonl

Headers = list[tuple[str, bytes | str | None]]
Kind = Callable[[random.Random], bytes]

_ROWS = list(read_jsonl(bundled_path(TINY)))
_INVISIBLE = ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\x00", "\x07", "\x1b", "\u202e", "\u00ad"]
BROKER_LIMIT_BYTES = 990_000  # just under librdkafka's default message.max.bytes (1,000,000)


def _row(rng: random.Random) -> dict:
    r = rng.choice(_ROWS)
    return {"text": r["text"], "label": r["label"]}


def _valid(rng: random.Random) -> bytes:
    return orjson.dumps({**_row(rng), "id": str(rng.getrandbits(32))})


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 300))


def _invalid_utf8(rng: random.Random) -> bytes:
    text = _row(rng)["text"].encode()
    cut = rng.randint(0, len(text))
    return (
        b'{"text": "' + text[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88"]) + b'"}'
    )


def _truncated(rng: random.Random) -> bytes:
    whole = _valid(rng)
    return whole[: rng.randint(1, len(whole) - 1)]


def _deeply_nested(rng: random.Random) -> bytes:
    depth = rng.choice([100, 1_000, 1_025, 5_000, 50_000])
    inner = b"[" * depth + b"]" * depth
    return rng.choice([inner, b'{"text": "x", "label": "pos", "id": ' + inner + b"}"])


def _huge_string(rng: random.Random) -> bytes:
    size = rng.choice([16_384, 16_385, 100_000, 250_000])  # characters of 1–3 bytes: up to 750 kB
    return orjson.dumps({"text": rng.choice("ab é漢") * size, "label": "pos"})


def _at_broker_limit(rng: random.Random) -> bytes:
    """A value at the size limit: all text (too long), or a short text and a huge extra field (valid)."""
    field = rng.choice(["text", "pad"])
    body = orjson.dumps({"label": "pos", "text": "x", field: ""})
    return body[:-2] + b"a" * (BROKER_LIMIT_BYTES - len(body)) + b'"}'


def _non_finite(rng: random.Random) -> bytes:
    tok = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
    return rng.choice(
        [b'{"text": "x", "label": ' + tok + b"}", b'{"text": "x", "label": "pos", "ts": ' + tok + b"}"]
    )


def _wrong_types(rng: random.Random) -> bytes:
    field = rng.choice(["text", "label", "text_pair", "id", "ts"])
    if rng.random() < 0.1:  # an integer no 64-bit type holds
        return orjson.dumps(_row(rng))[:-1] + f', "{field}": {2**70}}}'.encode()
    junk = rng.choice([None, True, 3.5, -7, [], {}, [1, "a"], {"a": 1}, ""])
    return orjson.dumps({**_row(rng), field: junk})


def _bad_labels(rng: random.Random) -> bytes:
    label = rng.choice([None, -1, 2, 10**6, "POS", " pos", "", "neutral", "0", 1.0, True])
    return orjson.dumps({"text": _row(rng)["text"], "label": label})


def _duplicate_keys(rng: random.Random) -> bytes:
    r = _row(rng)
    text = orjson.dumps(r["text"]).decode()
    field = rng.choice(
        ['"label": "pos", "label": "neg"', f'"text": {text}, "text": "other"', '"ts": 1, "ts": 2']
    )
    return f'{{"text": {text}, "label": "pos", {field}}}'.encode()


def _escaped_duplicate(rng: random.Random) -> bytes:
    """A field given twice, the second spelt with JSON escapes: the same name once decoded."""
    escaped, value = rng.choice([("\\u006cabel", '"neg"'), ("t\\u0065xt", '"other"'), ("\\u0074s", "2")])
    text = orjson.dumps(_row(rng)["text"]).decode()
    return f'{{"text": {text}, "label": "pos", "ts": 1, "{escaped}": {value}}}'.encode()


def _poison_nested(rng: random.Random) -> bytes:
    """About 1,000 levels of nesting in which a field name recurs as a string (it once crashed the
    duplicate-field check with a RecursionError, on every restart)."""
    depth = rng.choice([500, 990, 1_000, 1_023])
    field = rng.choice(["text", "label", "ts", "id", "text_pair"])
    inner = f'{{"{field}": ' * depth + '"x"' + "}" * depth
    return f'{{"text": "{field}", "label": "pos", "x": {inner}}}'.encode()


def _lone_surrogate(rng: random.Random) -> bytes:
    """A JSON escape of half a UTF-16 pair: valid JSON grammar, not UTF-8 text (tokenizers raise on it)."""
    half = rng.choice(["\\ud800", "\\udfff", "\\udbff"])
    field = rng.choice(["text", "text_pair", "id"])
    return f'{{"text": "ok {half}", "label": "pos", "{field}": "a{half}b"}}'.encode()


def _invisible(rng: random.Random) -> bytes:
    chars = "".join(rng.choice(_INVISIBLE) for _ in range(rng.randint(1, 20)))
    text = rng.choice([chars, chars + _row(rng)["text"] + chars, " " + chars + "\t"])
    return orjson.dumps({"text": text, "label": rng.choice(["pos", "neg"])})


def _missing_fields(rng: random.Random) -> bytes:
    event = {**_row(rng), "id": "1"}
    del event[rng.choice(["text", "label"])]
    return orjson.dumps(event)


def _not_objects(rng: random.Random) -> bytes:
    return rng.choice([b"null", b"true", b"42", b'"text"', b"[]", b'[{"text": "x", "label": "pos"}]', b"  "])


KINDS: dict[str, Kind] = {
    "valid": _valid,
    "random_bytes": _random_bytes,
    "invalid_utf8": _invalid_utf8,
    "truncated": _truncated,
    "deeply_nested": _deeply_nested,
    "huge_string": _huge_string,
    "non_finite": _non_finite,
    "wrong_types": _wrong_types,
    "bad_labels": _bad_labels,
    "duplicate_keys": _duplicate_keys,
    "escaped_duplicate": _escaped_duplicate,
    "poison_nested": _poison_nested,
    "lone_surrogate": _lone_surrogate,
    "invisible_characters": _invisible,
    "missing_fields": _missing_fields,
    "not_objects": _not_objects,
}


def hostile_headers(rng: random.Random) -> Headers | None:
    """Headers of any shape: none, empty, null values, binary values, repeated and odd keys."""
    shape = rng.randint(0, 5)
    if shape == 0:
        return None
    if shape == 1:
        return []
    keys = ["trace", "", " ", "x-dead-letter-reason", "ключ", "k" * 300, "a\x00b"]
    return [
        (rng.choice(keys), rng.choice([None, b"", rng.randbytes(rng.randint(1, 64)), "text", "\u200b"]))
        for _ in range(rng.randint(1, 12 if shape < 5 else 200))
    ]


def hostile_events(n: int, seed: int, valid_share: float = 0.05) -> list[tuple[str, bytes, Headers | None]]:
    """``n`` (kind, value, headers), about ``valid_share`` of them well-formed events; seeded."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if k != "valid"]
    out = []
    for _ in range(n):
        kind = "valid" if rng.random() < valid_share else rng.choice(kinds)
        out.append((kind, KINDS[kind](rng), hostile_headers(rng)))
    # a few values at the size limit of a produce request: they must be dead-lettered too
    for _ in range(2):
        out.insert(rng.randint(0, len(out)), ("at_broker_limit", _at_broker_limit(rng), None))
    return out
