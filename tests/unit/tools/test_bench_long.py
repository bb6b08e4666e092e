"""``bench_long.long_documents``: what holds for every stream of sentences (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stream_learner.tools.bench_long import long_documents

words = st.lists(st.sampled_from(["a", "bb", "ccc"]), min_size=1, max_size=6).map(" ".join)
rows = st.lists(
    st.fixed_dictionaries(
        {"text": words, "label": st.sampled_from(["pos", "neg"]), "domain": st.sampled_from(["m", "t"])}
    ),
    max_size=60,
)


@given(rows, st.integers(1, 20), st.integers(1, 12), st.integers(0, 12), st.integers(0, 3))
def test_documents_are_sentences_of_one_domain_and_label_in_order(rows, n, low, extra, seed) -> None:
    bounds = (low, low + extra)
    docs = long_documents(rows, n, bounds, seed)
    assert len(docs) <= n
    # each document: consecutive sentences of its (domain, label) in stream order, each used once,
    # closed at the first sentence that brings it to its drawn count
    used: dict[tuple, int] = {}
    for doc in docs:
        key = (doc["domain"], doc["label"])
        same = [r["text"] for r in rows if (r["domain"], r["label"]) == key]
        start = used.get(key, 0)
        taken, count = [], 0
        for text in same[start:]:
            taken.append(text)
            count += len(text.split())
            if doc["text"] == " ".join(taken):
                break
        assert doc["text"] == " ".join(taken), "not the next sentences of its domain and label"
        used[key] = start + len(taken)
        assert count >= bounds[0]  # its drawn count is at least the lower bound
        # closed as soon as it reached its count: without its last sentence it was short of the bound
        assert count - len(taken[-1].split()) < bounds[1]


def test_words_bounds_are_checked() -> None:
    import pytest

    with pytest.raises(ValueError, match="words"):
        long_documents([], 1, (0, 3))
