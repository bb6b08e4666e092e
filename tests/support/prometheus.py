"""A real Prometheus server for the tests, run as a child process on 127.0.0.1.

The binaries are Debian's ``prometheus`` package (server + ``promtool``; ``scripts/setup.sh`` installs
it). :class:`PrometheusServer` writes a config that scrapes the given targets every second (and
optionally loads rule files, evaluated every second), keeps its TSDB in a temporary directory, waits
for ``/-/ready`` and is stopped in teardown. Prometheus scrapes a new target first about 5-6 s after
start (its service discovery hands targets over at most every 5 s): :meth:`wait_for` covers that.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stream_learner.tools.child_process import ServerProcess
from tests.support.services import free_port

INSTALL_HINT = (
    "install Debian's prometheus package (scripts/setup.sh does: "
    "apt-get install -y --no-install-recommends prometheus)"
)


def prometheus_tool(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; a clear error naming the fix when it is missing."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if not found:
        raise RuntimeError(f"no '{name}' binary on PATH: {INSTALL_HINT}")
    return found


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error (``status: error``)."""


class PrometheusServer(ServerProcess):
    """``prometheus`` scraping ``targets`` (host:port) as job ``job``, with its data in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        job: str = "stream-learner",
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
    ) -> None:
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.job = job
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.interval = interval
        self.port = free_port()
        super().__init__(self.workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The prometheus.yml written at start (JSON is YAML)."""
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_interval": self.interval,
                    "scrape_timeout": self.interval,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        """Start and wait until ``/-/ready`` answers 200; returns ``self``."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=1))
        args = [
            prometheus_tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self._spawn(args, cwd=self.workdir)
        self._wait_ready(timeout_s, self._ready)
        return self

    def _ready(self) -> str | None:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return None if r.status == 200 else f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as err:
            return str(err)

    def describe(self) -> str:
        return f"prometheus on {self.url}"

    # ---------------------------------------------------------------------------------- the API
    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``/api/v1/<path>``: the whole JSON answer, errors included (sent as HTTP 400/422)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return json.loads(body)
            except ValueError:
                raise PrometheusError(f"{url}: HTTP {err.code}: {body[:300]!r}") from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at now: the result samples (``[{"metric": {...}, "value": [t, "v"]}]``).

        Raises :class:`PrometheusError` if Prometheus rejects the expression. A scalar result comes
        back as one sample without labels.
        """
        answer = self.api("query", query=expr)
        if answer.get("status") != "success":
            raise PrometheusError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        data = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(
        self, expr: str, timeout_s: float = 60.0, check: Callable[[list[dict[str, Any]]], bool] = bool
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``check(result)`` holds (default: non-empty); the last result."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} still {result!r} after {timeout_s:g}s")
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------ PromQL
# Just enough PromQL lexing for the tests: which metrics an expression names, its vector selectors,
# and the operands of its top-level comparisons and set operators. Strings, label matchers {...} and
# ranges [...] are single tokens, so nothing inside them is mistaken for a metric or an operator.
_TOKEN = re.compile(
    r"""
      "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*'        # strings
    | \{(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^{}"'])*\}   # label matchers
    | \[[^\]]*\]                                    # range / subquery
    | (?:\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?)+   # numbers and durations
    | [A-Za-z_:][A-Za-z0-9_:]*                      # identifiers
    | ==|!=|>=|<=|=~|!~                             # two-character operators
    | \S                                            # anything else, one character
    """,
    re.VERBOSE,
)
_GROUPING = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right"))
KEYWORDS = frozenset(("and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN", *_GROUPING))
_COMPARISONS = frozenset(("==", "!=", ">=", "<=", ">", "<"))
_SET_OPERATORS = frozenset(("and", "or", "unless"))
_NUMBER = re.compile(r"^[\d.]+(?:e[+-]?\d+)?$")


def returns_data(prom: PrometheusServer, expr: str) -> str | None:
    """None if ``expr`` is accepted and returns at least one sample; else what went wrong."""
    try:
        result = prom.query(expr)
    except PrometheusError as err:
        return f"rejected: {err}"
    return None if result else "accepted, but no data"


def _tokens(expr: str) -> list[re.Match[str]]:
    return list(_TOKEN.finditer(expr))


def _skip_group(tokens: list[re.Match[str]], i: int) -> int:
    """Index after the parenthesised label list starting at ``tokens[i]`` (if there is one)."""
    if i < len(tokens) and tokens[i].group() == "(":
        while i < len(tokens) and tokens[i].group() != ")":
            i += 1
        return i + 1
    return i


def vector_selectors(expr: str) -> list[str]:
    """Every vector selector of ``expr`` as ``name{matchers}`` (ranges and offsets dropped)."""
    tokens, out, i = _tokens(expr), [], 0
    while i < len(tokens):
        t = tokens[i].group()
        nxt = tokens[i + 1].group() if i + 1 < len(tokens) else ""
        if t in _GROUPING:
            i = _skip_group(tokens, i + 1)
            continue
        # a name followed by "(" is a function; by "by"/"without", an aggregation (sum by (x) (...))
        if re.match(r"[A-Za-z_:]", t) and t not in KEYWORDS and nxt not in ("(", "by", "without"):
            out.append(t + (nxt if nxt.startswith("{") else ""))
        i += 1
    return out


def metric_names(expr: str) -> set[str]:
    """Names of the metrics ``expr`` reads."""
    return {s.split("{")[0] for s in vector_selectors(expr)}


def top_level_operands(expr: str) -> list[str]:
    """The operands of ``expr``'s comparisons and ``and``/``or``/``unless`` outside any parentheses.

    ``(a / b) > 0.05 and on (job) c >= 10`` → ``["(a / b)", "0.05", "c", "10"]``; an expression
    without such an operator → ``[expr]``. Vector-matching modifiers and ``bool`` are dropped.
    """
    tokens = _tokens(expr)
    operands, depth, start, i = [], 0, 0, 0
    while i < len(tokens):
        t = tokens[i].group()
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        elif depth == 0 and (t in _COMPARISONS or t in _SET_OPERATORS):
            operands.append(expr[start : tokens[i].start()].strip())
            i += 1
            while i < len(tokens) and tokens[i].group() in ("bool", *_GROUPING):
                i = _skip_group(tokens, i + 1)
            start = tokens[i].start() if i < len(tokens) else len(expr)
            continue
        i += 1
    operands.append(expr[start:].strip())
    return [o for o in operands if o]


def is_number(operand: str) -> bool:
    return bool(_NUMBER.match(operand))


# ----------------------------------------------------------------------------- alerts and dashboard
REPO = Path(__file__).resolve().parents[2]
ALERTS_FILE = REPO / "helm/stream-learner/files/alerts.yaml"
DASHBOARD_FILE = REPO / "helm/stream-learner/files/dashboard.json"


def alert_rules(path: Path = ALERTS_FILE) -> list[dict[str, Any]]:
    """Every alerting rule of the rule file."""
    import yaml

    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(
    dashboard: dict[str, Any], variables: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query, with ``$name`` / ``${name}`` replaced from ``variables``."""
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for name, value in sorted((variables or {}).items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
            out.append((panel["title"], expr))
    return out
