"""The second labeled dataset of the tests (tests/data/README.md): CPython docstrings, labels
function / class / module, a ``segment`` per library area, long texts — a user's stream that is not VADER."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
STREAM_FILE = DATA / "stdlib_docstrings_stream.jsonl"
HELDOUT_FILE = DATA / "stdlib_docstrings_heldout.jsonl"
LABELS = ("function", "class", "module")


def stream_lines(n: int) -> list[bytes]:
    """The first ``n`` rows of the stream file, as the message values a user would produce."""
    with STREAM_FILE.open("rb") as f:
        return [line.strip() for line, _ in zip(f, range(n), strict=False)]
