"""The bundled labeled text (VADER, four domains; see ``data/NOTICE``) and sample malformed events."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import orjson

from stream_learner.core.events import Reason

STREAM = "vader_multidomain_stream.jsonl"
HELDOUT = "vader_multidomain_heldout.jsonl"
TINY = "vader_multidomain_stream_tiny.jsonl"
DOMAINS = ("movie", "amazon", "tweets", "nyt")  # the stream's order: the drift


def bundled_path(name: str) -> Path:
    """Path of a bundled data file (works from an installed wheel as well as from the repo)."""
    path = Path(str(resources.files("stream_learner.tools") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"bundled data file {name!r} missing from the stream_learner.tools package")
    return path


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with Path(path).open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def demo_sample(per_domain: int) -> list[dict]:
    """The first ``per_domain`` events of each domain, in stream order (the drift stays in)."""
    taken: dict[str, int] = dict.fromkeys(DOMAINS, 0)
    out = []
    for row in read_jsonl(bundled_path(STREAM)):
        if taken[row["domain"]] < per_domain:
            taken[row["domain"]] += 1
            out.append(row)
    return out


def malformed_events(max_text_bytes: int = 16_384) -> list[tuple[Reason, bytes]]:
    """One message value per way an event can be invalid, with the reason it must be dead-lettered for."""
    return [
        (Reason.NOT_JSON, b'{"text": "cut off'),
        (Reason.NOT_JSON, b"\xff\xfe not utf-8"),
        (Reason.NOT_JSON, b'{"text": "x", "label": NaN}'),
        (Reason.NOT_OBJECT, b'["a list", "pos"]'),
        (Reason.MISSING_TEXT, b'{"label": "pos"}'),
        (Reason.BAD_TEXT, b'{"text": 42, "label": "pos"}'),
        (Reason.EMPTY_TEXT, b'{"text": "   ", "label": "pos"}'),
        (Reason.TEXT_TOO_LONG, orjson.dumps({"text": "a" * (max_text_bytes + 1), "label": "pos"})),
        (Reason.MISSING_LABEL, b'{"text": "no label here"}'),
        (Reason.UNKNOWN_LABEL, b'{"text": "great", "label": "meh"}'),
        (Reason.UNKNOWN_LABEL, b'{"text": "great", "label": 7}'),
        (Reason.BAD_FIELD, b'{"text": "great", "label": "pos", "ts": "yesterday"}'),
        (Reason.EMPTY_TEXT, orjson.dumps({"text": "\u200b\u200d\ufeff\u0007", "label": "pos"})),
        (Reason.DUPLICATE_FIELD, b'{"text": "great", "label": "pos", "label": "neg"}'),
        (Reason.NOT_JSON, b"[" * 5000 + b"]" * 5000),
    ]
