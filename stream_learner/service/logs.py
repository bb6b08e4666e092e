"""Logging that stays readable during an outage: repeated client errors are rate-limited.

librdkafka logs every failed connection attempt, and its lines reach Python logging through the
``logger=`` given to each client (:mod:`stream_learner.service.consumer`,
:mod:`stream_learner.service.topics`): a broker
that is down writes hundreds of ERROR lines in seconds, which bury everything else and cost money in
a log pipeline. :class:`RepeatFilter` lets the first record of each kind through, drops the repeats
within ``window_s`` and then writes one line saying how many there were; while the repeats go on,
that one line per window is all:

    … Connect to ipv4#10.0.0.7:9092 failed: Connection refused (after 0ms in state CONNECT)
    … Connect to ipv4#10.0.0.7:9092 failed: Connection refused … [repeated 577 times in the last 30 s]
    … Connect to ipv4#10.0.0.7:9092 failed: Connection refused … [repeated 580 times in the last 30 s]

(measured: a learner whose broker went away wrote 8 lines in the first minute of the outage, and
counted ≈ 1,160 repeats it did not write: about 19 a second).

Records of one kind share a *key*: logger, level and message with every number replaced by ``#``
(librdkafka's lines differ in "after 3ms", "5 identical error(s) suppressed", ports of the same
broker). Only WARNING and above are limited; DEBUG and INFO pass untouched. The summary of a
window is written when the next record of that logger, of any level, arrives after the window ends
(or at :meth:`RepeatFilter.flush`, which ``stream-learner run`` calls at exit): a burst that stops is
still counted.

:func:`install` attaches one filter to each logger in :data:`KAFKA_CLIENT_LOGGERS`; ``stream-learner run``
calls it.

>>> import io
>>> stream = io.StringIO()
>>> logger = logging.getLogger("stream_learner.service.logs.example")
>>> logger.propagate = False
>>> logger.addHandler(logging.StreamHandler(stream))
>>> now = [0.0]
>>> limiter = RepeatFilter(window_s=30, clock=lambda: now[0])
>>> logger.addFilter(limiter)
>>> for attempt in range(100):
...     now[0] = attempt * 0.1  # 100 refused connections in 10 s
...     logger.error("Connect to 10.0.0.7:9092 failed: Connection refused (after %dms)", attempt % 7)
>>> now[0] = 31.0  # a new window: the summary of the last one stands for this repeat too
>>> logger.error("Connect to 10.0.0.7:9092 failed: Connection refused (after 0ms)")
>>> logger.warning("Something else")
>>> now[0] = 35.0
>>> limiter.flush()  # at shutdown
>>> print(stream.getvalue(), end="")
Connect to 10.0.0.7:9092 failed: Connection refused (after 0ms)
Connect to 10.0.0.7:9092 failed: Connection refused (after 0ms) [repeated 99 times in the last 30 s]
Something else
Connect to 10.0.0.7:9092 failed: Connection refused (after 0ms) [repeated 1 times in the last 4 s]
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: The loggers librdkafka's lines arrive on: the ``logger=`` of every Kafka client of the learner.
KAFKA_CLIENT_LOGGERS = ("stream_learner.service.consumer", "stream_learner.service.topics")

#: Seconds within which repeats of one kind are counted instead of written.
DEFAULT_WINDOW_S = 30.0

_NUMBER = re.compile(r"\d+")
_MAX_KINDS = 1000  # kinds remembered at once: a flood of distinct lines cannot grow the table unbounded


@dataclass
class _Window:
    key: tuple[str, int, str]
    start: float
    first: logging.LogRecord
    repeats: int = 0


class RepeatFilter(logging.Filter):
    """Rate-limit repeated records (see the module docstring); attach with ``logger.addFilter``."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.min_level = min_level
        self.clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(record: logging.LogRecord) -> tuple[str, int, str]:
        """What makes two records "the same": logger, level, and the message with numbers as ``#``."""
        return record.name, record.levelno, _NUMBER.sub("#", record.getMessage())

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        now = self.clock()
        with self._lock:
            due = self._expired(now)  # on every record, INFO included: a burst that stopped gets its line
            passes = record.levelno < self.min_level or self._admit(self.key(record), record, due, now)
        for window in due:
            self._summarize(window, now)
        return passes

    def _admit(
        self, key: tuple[str, int, str], record: logging.LogRecord, due: list[_Window], now: float
    ) -> bool:
        """Whether this record is written; counts it otherwise (the caller holds the lock)."""
        window = self._windows.get(key)
        if window is not None:
            window.repeats += 1
            return False
        if len(self._windows) >= _MAX_KINDS:  # forget the oldest kind (its repeats are lost)
            self._windows.pop(next(iter(self._windows)))
        # a kind that repeated all through the window that just ended is still repeating: its summary is
        # written now, and this record is the first repeat counted in the next window
        still_repeating = any(w.key == key for w in due)
        self._windows[key] = _Window(key, now, record, repeats=1 if still_repeating else 0)
        return not still_repeating

    def flush(self) -> None:
        """Write the summary of every window with repeats, now (at shutdown, say)."""
        now = self.clock()
        with self._lock:
            due = [w for w in self._windows.values() if w.repeats]
            self._windows.clear()
        for window in due:
            self._summarize(window, now)

    def _expired(self, now: float) -> list[_Window]:
        """Remove the windows that have ended; return those with repeats to summarize."""
        ended = [k for k, w in self._windows.items() if now - w.start >= self.window_s]
        return [w for w in (self._windows.pop(k) for k in ended) if w.repeats]

    def _summarize(self, window: _Window, now: float) -> None:
        first = window.first
        seconds = max(min(now - window.start, self.window_s), 1)
        text = f"{first.getMessage()} [repeated {window.repeats} times in the last {seconds:.0f} s]"
        logger = logging.getLogger(first.name)
        summary = logger.makeRecord(
            first.name,
            first.levelno,
            first.pathname,
            first.lineno,
            text,
            None,
            None,
            func=first.funcName,
            extra={"repeat_summary": True},
        )
        logger.handle(summary)


_installed: dict[str, RepeatFilter] = {}
_install_lock = threading.Lock()


def install(
    loggers: tuple[str, ...] = KAFKA_CLIENT_LOGGERS, window_s: float = DEFAULT_WINDOW_S
) -> list[RepeatFilter]:
    """Attach a :class:`RepeatFilter` to each of ``loggers`` (once: calling again changes nothing)."""
    with _install_lock:
        for name in loggers:
            if name not in _installed:
                _installed[name] = RepeatFilter(window_s)
                logging.getLogger(name).addFilter(_installed[name])
        return [_installed[name] for name in loggers]
