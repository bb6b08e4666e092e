"""wrk, a real HTTP load tool, against ``stream-learner serve``: every response kept, wrk's own counts.

:func:`run_infer_load` runs wrk (Debian's ``wrk`` 4.1, installed by ``scripts/setup.sh``) with
``wrk_infer.lua``: Open Inference Protocol infer requests of one text each, a few texts in rotation,
closed loop on ``connections`` connections for ``duration_s``. The script writes every response (its
status, the index of the text it answers — from the request ``id`` the server echoes — and its body)
to a file per wrk thread, and wrk's summary (requests, socket errors, non-2xx, latency percentiles) to
one more; :class:`WrkRun` reads them back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).with_name("wrk_infer.lua")
INSTALL_HINT = (
    "install Debian's wrk package (scripts/setup.sh does: apt-get install -y --no-install-recommends wrk)"
)


def wrk_binary() -> str:
    """Path of ``wrk``; a clear error naming the fix when it is missing."""
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError(f"no 'wrk' binary on PATH: {INSTALL_HINT}")
    return found


@dataclass(frozen=True)
class Response:
    """One response wrk received: its HTTP status, the index of the text it answers (None when the body
    does not echo the request's id, as an error's does not) and the parsed body (None if not JSON)."""

    status: int
    text_index: int | None
    body: dict | None


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run did: its summary (``requests``, ``errors_connect|read|write|timeout``,
    ``errors_status`` — non-2xx/3xx —, ``latency_p50_us``…, as ``wrk_infer.lua``'s ``done`` wrote them),
    every response, and its printed report."""

    summary: dict[str, float]
    responses: list[Response]
    stdout: str

    @property
    def socket_errors(self) -> int:
        s = self.summary
        return int(s["errors_connect"] + s["errors_read"] + s["errors_write"] + s["errors_timeout"])

    @property
    def non_2xx(self) -> int:
        """Responses with a status outside 2xx: wrk's count (which spares 3xx) and the script's own."""
        return max(int(self.summary["errors_status"]), sum(not 200 <= r.status < 300 for r in self.responses))

    @property
    def requests_per_s(self) -> float:
        return self.summary["requests"] / (self.summary["duration_us"] / 1e6)

    def latency_ms(self, percentile: str) -> float:
        """``latency_ms("p99")``: wrk's latency percentile, in milliseconds."""
        return self.summary[f"latency_{percentile}_us"] / 1000


def run_infer_load(
    url: str,
    texts: list[str],
    workdir: Path,
    *,
    connections: int,
    duration_s: float,
    threads: int = 2,
    timeout_s: float = 10.0,
) -> WrkRun:
    """Run wrk against ``url`` (a ``…/infer`` path) and read back what it recorded.

    ``timeout_s`` is wrk's per-request timeout: a response slower than that counts as a timeout
    error (wrk's default, 2 s, is within reach of a swap on two busy cores without anything failing).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    texts_file = workdir / "texts.txt"
    # one JSON string literal per line: the Lua script puts them into the body as they are
    texts_file.write_text("".join(json.dumps(t) + "\n" for t in texts))
    command = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(texts_file),
        str(workdir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    if done.returncode != 0 or not (workdir / "summary.txt").is_file():
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    summary = {
        key: float(value)
        for key, value in (line.split() for line in (workdir / "summary.txt").read_text().splitlines())
    }
    responses = [_response(line) for path in sorted(workdir.glob("responses-*.txt")) for line in _lines(path)]
    return WrkRun(summary, responses, done.stdout)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().split("\n") if line]


def _response(line: str) -> Response:
    status, index, body = line.split("\t", 2)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return Response(int(status), int(index) if index else None, parsed if isinstance(parsed, dict) else None)
