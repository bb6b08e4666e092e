"""Tuning on the user's stream: a grid of settings, ranked by held-out macro-F1, and the winner as a
settings file that ``stream-learner run -c`` accepts.

``stream-learner eval --sweep section.key=v1,v2,…`` (repeatable) adds one strategy per point of the
grid — the cartesian product of the values, each on top of ``default`` — to the evaluation's runs.
Within ``--budget-minutes`` the runs go cheapest first (:func:`stream_learner.tools.evaluation.run_cost`),
so that the budget covers as many settings as it can; a run that has not started when the budget is
spent is not started, and is listed as such (:class:`stream_learner.tools.evaluation.Budget`). The
report (:mod:`stream_learner.tools.evaluation_report`) ranks what ran by the mean held-out macro-F1
over seeds, its spread beside it, and writes the best deployable one — the offline bound is a bound,
not a setting — as ``recommended.yaml``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from stream_learner.core.config import load_settings
from stream_learner.tools.evaluation import Strategy


def parse_axis(spec: str) -> tuple[str, str, list[Any]]:
    """One ``section.key=v1,v2,…`` axis of the grid; values are JSON where they parse, strings otherwise.

    >>> parse_axis("training.learning_rate=1e-5,3e-5")
    ('training', 'learning_rate', [1e-05, 3e-05])
    """
    key, eq, raw = spec.partition("=")
    section, dot, name = key.strip().partition(".")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not eq or not dot or not section or not name or not values:
        raise ValueError(f"--sweep {spec!r}: expected section.key=value1,value2,…")
    parsed = []
    for v in values:
        try:
            parsed.append(json.loads(v))
        except json.JSONDecodeError:
            parsed.append(v)
    return section, name, parsed


def grid(specs: Sequence[str]) -> list[Strategy]:
    """One strategy per point of the grid of ``specs``, each checked against the settings' rules.

    A value the settings refuse fails here, before anything runs, with the settings' own message.

    >>> [s.name for s in grid(["training.learning_rate=1e-5,3e-5", "replay.capacity=500"])]
    ['training.learning_rate=1e-05 replay.capacity=500', 'training.learning_rate=3e-05 replay.capacity=500']
    """
    if not specs:
        return []
    axes = [parse_axis(s) for s in specs]
    keys = [(section, name) for section, name, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError("--sweep: each section.key may be swept once (give all its values in one option)")
    out = []
    for values in itertools.product(*(vals for *_, vals in axes)):
        overrides: dict[str, dict[str, Any]] = {}
        for (section, name), value in zip(keys, values, strict=True):
            overrides.setdefault(section, {})[name] = value
        label = " ".join(f"{s}.{k}={json.dumps(v)}" for (s, k), v in zip(keys, values, strict=True))
        try:
            load_settings(**overrides)
        except Exception as err:  # ConfigError: name the grid point and the settings' own fix
            raise ValueError(f"--sweep point {label}: {err}") from None
        out.append(Strategy(label, overrides, about=f"default with {label}"))
    return out
