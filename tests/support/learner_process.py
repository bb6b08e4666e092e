"""A learner as a child process (``stream-learner run``), and the checks of an exact lineage.

Fault tests need a real process: SIGKILL and SIGTERM, a fresh interpreter on every restart.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from confluent_kafka import Consumer, TopicPartition

from stream_learner.service.storage import ObjectStore
from stream_learner.service.versions import read_latest, read_manifest
from stream_learner.tools.child_process import log_tail, parent_death_preexec, terminate_process
from tests.support import zygote
from tests.support.services import free_ports
from tests.support.tiny_model import tiny_model_dir


def small_model() -> dict:
    """``model`` settings for a learner process: the session's tiny model
    (:mod:`tests.support.tiny_model`)."""
    return {"name_or_path": tiny_model_dir(), "max_length": 32}


#: What a launcher starts for each worker instead of the command, so that the zygote forks it.
ZYGOTE_EXEC = Path(zygote.__file__).with_name("zygote_exec.py")

SMALL_TRAINING = {"fresh_per_step": 8, "replay_per_step": 8, "max_wait_s": 0.2, "learning_rate": 1e-4}


class LearnerProcess:
    """``stream-learner run --config <yaml>`` with ``config`` (nested settings), logging to a file.

    ``launcher``: a command that runs it, e.g. torchrun's (``torchrun … --no-python``): a data-parallel
    group of ``ranks`` whose ranks all log here; ``http_port`` is then rank 0's (rank r listens on
    ``http_port + r``).
    """

    def __init__(
        self,
        config: dict,
        workdir: Path,
        name: str = "learner",
        launcher: list[str] | None = None,
        ranks: int = 1,
    ) -> None:
        self.launcher = launcher or []
        self.http_port = free_ports(ranks, consecutive=True)[0]
        config = {**config, "http": {"enabled": True, "host": "127.0.0.1", "port": self.http_port}}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.tmpdir = workdir / f"{name}.tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | zygote.ForkedProcess | None = None

    def start(self) -> LearnerProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        exe = Path(sys.executable).parent / "stream-learner"
        learner = [str(exe), "run", "--config", str(self.config_path)]
        # its staging directories here: a SIGKILLed learner's stay with the test, not in /tmp
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.tmpdir)}
        with self.log_path.open("ab") as log:
            if not self.launcher:
                self.proc = zygote.spawn(learner, stdout=log.fileno(), stderr=log.fileno(), env=env)
                return self
            # torchrun starts the ranks itself: each one forked by the zygote too, through zygote_exec
            worker = learner
            if zygote.enabled():
                zygote.ensure_started()
                worker = [sys.executable, str(ZYGOTE_EXEC), *learner]
            self.proc = subprocess.Popen(
                [*self.launcher, *worker],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=parent_death_preexec(),
            )
        return self

    @property
    def log(self) -> str:
        """What this run (since the last :meth:`start`) has logged."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"learner exited ({code}) before {pattern!r}:\n{self.log}")
            time.sleep(0.05)
        tail = log_tail(self.log_path)
        raise AssertionError(f"no {pattern!r} in the learner's log after {timeout}s:\n{tail}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/readyz")[0] == 200:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"learner exited ({self.proc.returncode}):\n{self.log}")
            time.sleep(0.2)
        raise AssertionError(f"learner not ready after {timeout}s:\n{log_tail(self.log_path)}")

    def metric(self, name: str) -> float:
        """A sample's value from ``/metrics`` (0 if absent)."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None:
            terminate_process(self.proc, grace_s=0)


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets, asked of the broker (−1001 = none committed)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def lineage(store: ObjectStore) -> list[dict]:
    """The manifests from the first version to LATEST, following ``parent`` links (oldest first)."""
    version, _ = read_latest(store)
    chain = []
    while version is not None:
        chain.append(read_manifest(store, version))
        version = chain[-1]["parent"]
    return chain[::-1]


def assert_exact_lineage(store: ObjectStore, topic: str, valid: dict[int, list[bool]]) -> list[dict]:
    """Every valid event of ``topic`` is counted exactly once along the chain of versions to LATEST.

    ``valid[p][o]`` says whether the event at offset ``o`` of partition ``p`` is valid. For each
    version, the events it added (``events_trained`` minus its parent's) must equal the valid
    events between its parent's offsets and its own: a re-trained event would count twice, a lost
    one would be missing. The chain starts at offset 0 and LATEST ends at each partition's end.
    """
    chain = lineage(store)
    assert chain, "no published version"
    before = {p: 0 for p in valid}
    ingested = 0
    for m in chain:
        offsets = {int(p): o for p, o in m["offsets"][topic].items()}
        added = 0
        for p, end in offsets.items():
            assert end >= before[p], f"version {m['version']} moves partition {p} back: {before[p]} → {end}"
            added += sum(valid[p][before[p] : end])
        assert m["events_trained"] - ingested == added, (
            f"version {m['version']} (parent {m['parent']}) added {m['events_trained'] - ingested} events "
            f"for {added} valid events in its offset ranges {before} → {offsets}"
        )
        before.update(offsets)
        ingested = m["events_trained"]
    assert before == {p: len(v) for p, v in valid.items()}, f"LATEST ends at {before}"
    assert ingested == sum(sum(v) for v in valid.values())
    return chain
