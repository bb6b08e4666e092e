"""Lineage-true recovery (issue 15): a corrupt LATEST is replaced by a version of LATEST's own chain,
never by a rolled-back branch, a rejected or a fenced-out version; statuses tell them apart.

Versions here are of a 4-weight stand-in model (``tests.unit.service.test_publisher.tiny_snapshot``):
recovery, statuses, rollback and retention read manifests, claims and sha256s, never the weights' meaning.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from stream_learner.cli import app as cli
from stream_learner.service.app import Learner
from stream_learner.service.publisher import Publisher, load_newest_intact, rollback
from stream_learner.service.storage import LocalStore, open_store
from stream_learner.service.versions import (
    ABANDONED,
    CLAIM,
    FENCED,
    INCOMPLETE,
    MANIFEST,
    PUBLISHED,
    REJECTED,
    WEIGHTS,
    CorruptVersion,
    RollbackRefused,
    chain_of,
    prune_versions,
    read_latest,
    read_manifest,
    survey_versions,
    version_dir,
    version_statuses,
)
from tests.support.factories import small_settings
from tests.unit.service.test_publisher import (
    damage,
    fenced,
    model_config_json,
    rejected,
    tiny_publisher,
    tiny_snapshot,
)

CLI = str(Path(__file__).resolve().parents[3] / ".venv" / "bin" / "stream-learner")


def stream_learner(*args: str, config: Path, child: bool = True) -> subprocess.CompletedProcess:
    """The command as an operator runs it: in a child process (≈ 3 s of imports each), or in this one."""
    if child:
        return subprocess.run(
            [CLI, *args, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
    result = CliRunner().invoke(cli, [*args, "-c", str(config)], env={"COLUMNS": "200"})
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def restarted_learner(url: str) -> Learner:
    """A learner's start-up up to and including the restore (no broker needed for that part)."""
    from transformers import AutoConfig

    from stream_learner.core.model import resolve_model_path

    learner = Learner(small_settings(publish={"storage_url": url}))
    learner.store = open_store(url)
    loaded = AutoConfig.from_pretrained(
        resolve_model_path(learner.settings.model.name_or_path), num_hidden_layers=1
    )
    learner.restored = learner._restore(loaded)  # the loaded model's architecture is LATEST's: no ConfigError
    return learner


def its_publisher(learner: Learner) -> Publisher:
    """The publisher ``Learner.start`` builds after the restore."""
    return Publisher.standalone(
        learner.settings,
        learner.store,
        {"config.json": model_config_json(1)},
        parent=learner.restored_version,
        latest=(learner._latest_version, learner._latest_etag),
    )


def test_rollback_new_versions_corrupt_latest_resumes_on_latests_chain(tmp_path: Path, caplog) -> None:
    """Issue 15, acceptance 4: rollback to N, new versions on top, corrupt LATEST → the learner resumes
    from LATEST's parent chain; a fenced-out and a rejected version are shown as such by ``versions
    list`` and refused by ``versions rollback`` unless forced."""
    url = (tmp_path / "store").as_uri()
    store = open_store(url)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"storage_url": url}}))

    pub = tiny_publisher(store)
    for _ in range(3):
        pub.publish_version(tiny_snapshot())  # 1 2 3
    assert rejected(pub) == 4  # the poisoning gate holds it back
    assert pub.publish_version(tiny_snapshot()) == 5  # LATEST, its parent the rejected 4
    assert fenced(store) == 6  # a second learner on the prefix loses the fence

    rolled = stream_learner("versions", "rollback", "2", config=config)
    assert rolled.returncode == 0, rolled.stderr
    assert read_latest(store)[0] == 2

    learner = restarted_learner(url)
    assert learner.restored_version == 2
    pub = its_publisher(learner)
    assert pub.publish_version(tiny_snapshot()) == 7 and pub.publish_version(tiny_snapshot()) == 8
    assert chain_of(store, 8) == [8, 7, 2, 1]

    damage(store, 8)
    with caplog.at_level(logging.WARNING):
        learner = restarted_learner(url)
    assert learner.restored_version == 7 and learner._latest_version == 8
    assert learner.metrics.value("stream_learner_corrupt_versions_total") == 1
    assert (
        f"LATEST names 8, corrupt ({WEIGHTS} does not match the sha256 in its manifest); resuming from its "
        "parent 7" in caplog.messages
    )

    damage(store, 7)  # its parent too: on to 2 — not 5, the newest intact version, on the abandoned branch
    learner = restarted_learner(url)
    assert learner.restored_version == 2
    assert learner.metrics.value("stream_learner_corrupt_versions_total") == 2
    pub = its_publisher(learner)
    assert pub.publish_version(tiny_snapshot()) == 9  # numbered after the corrupt LATEST
    assert read_manifest(store, 9)["parent"] == 2 and chain_of(store, 9) == [9, 2, 1]

    listed = stream_learner("versions", "list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["statuses"] == {
        "1": PUBLISHED,
        "2": PUBLISHED,
        "3": ABANDONED,  # the rollback to 2 left these
        "4": REJECTED,
        "5": ABANDONED,
        "6": FENCED,
        "7": ABANDONED,  # corrupt, and off the chain since 9 went on 2
        "8": ABANDONED,
        "9": PUBLISHED,
    }
    table = stream_learner("versions", "list", config=config, child=False)
    rows = {
        r[1].strip(): r[-2].strip() for r in (ln.split("│") for ln in table.stdout.splitlines()) if len(r) > 2
    }
    assert rows["4"] == "rejected (gate)" and rows["6"] == "fenced" and rows["9"] == "published ◀ LATEST"
    assert rows["5"] == "abandoned (rollback to 2)"

    for version, status, child in (("4", "rejected", True), ("6", "fenced", False)):
        refused = stream_learner("versions", "rollback", version, config=config, child=child)
        assert refused.returncode == 1
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(f"stream-learner: cannot roll back: version {version} is {status} (")
        assert line.endswith("; pass --force to roll back to it anyway")
    assert read_latest(store)[0] == 9
    forced = stream_learner("versions", "rollback", "6", "--force", config=config, child=False)
    assert forced.returncode == 0, forced.stderr
    assert read_latest(store)[0] == 6


# --------------------------------------------------------------------------------- properties
class Crash(BaseException):
    """A SIGKILL at a chosen point of the checkpoint sequence."""


# (operation, a number, a flag): the number picks a rollback's target or a retention's keep (mod 4)
NAMES = ["publish"] * 6 + ["reject"] * 2 + ["fence", "crash_upload", "crash_before_latest"]
NAMES += ["damage_latest"] * 2 + ["blind_latest", "rollback", "rollback", "prune"]
OPS = st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 40), st.booleans()), min_size=10, max_size=30)


class History:
    """A store driven by real publishers, and a model of what it should hold."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LocalStore(root / "store")
        self.parents: dict[int, int | None] = {}
        self.kind: dict[int, str] = {}  # ok | rejected | fenced | incomplete
        self.latest: int | None = None
        self.damaged: set[int] = set()
        self.blind: set[int] = set()  # manifest and claim gone: the parent cannot be known
        self.pub: Publisher | None = None
        self.stuck = False  # no intact version on LATEST's chain: an operator's turn

    # ---------------------------------------------------------------------------- the model
    def present(self) -> set[int]:
        return set(survey_versions(self.store, read_manifests=False))

    def intact(self, v: int) -> bool:
        return (
            v in self.present()
            and v not in self.damaged
            and v not in self.blind
            and self.kind[v] != "incomplete"
        )

    def model_chain(self) -> list[int]:
        chain, v, present = [], self.latest, self.present()
        while v is not None and v in present:
            chain.append(v)
            if v in self.blind:
                break
            v = self.parents[v]
        return chain

    def expected_resume(self) -> int | str | None:
        """The version recovery must load; "guess" when a parent cannot be known; "raise" when none."""
        if self.latest is None:
            return None
        if self.intact(self.latest):
            return self.latest
        v, present = self.latest, self.present()
        while True:
            if v in self.blind:
                self.guess_below = v
                return "guess"
            p = self.parents[v]
            if p is None or p not in present:
                return "raise"
            if self.kind[p] not in ("rejected", "fenced") and self.intact(p):
                return p
            v = p

    # --------------------------------------------------------------------------- operations
    def resume(self) -> None:
        expected = self.expected_resume()
        refused: list[CorruptVersion] = []
        with tempfile.TemporaryDirectory(dir=self.root) as work:
            try:
                found = load_newest_intact(self.store, Path(work), refused.append)
            except CorruptVersion:
                assert expected in ("raise", "guess")
                self.stuck = True
                return
        if found is None:
            assert expected is None
            self.pub = tiny_publisher(self.store)
            return
        v = found[0].version
        if expected == "guess":  # the last resort: sound, if not provably the parent
            assert v < self.guess_below and self.kind[v] == "ok" and self.intact(v), (v, self.guess_below)
            assert "abandoned" not in read_manifest(self.store, v)
        else:
            assert v == expected, (v, expected, self.parents, self.kind, self.damaged)
            assert v in self.model_chain()  # LATEST's chain, always
        assert all(e.version in self.damaged | self.blind for e in refused)
        self.pub = tiny_publisher(self.store, parent=v)

    def ensure_learner(self) -> bool:
        if self.pub is None and not self.stuck:
            self.resume()
        return self.pub is not None

    def run(self, op: tuple) -> None:
        name = op[0]
        if name in ("publish", "reject", "crash_upload", "crash_before_latest") and not self.ensure_learner():
            return
        if name == "publish":
            before = self.pub.parent
            v = self.pub.publish_version(tiny_snapshot())
            self.parents[v], self.kind[v], self.latest = before, "ok", v
        elif name == "reject":
            before = self.pub.parent
            v = rejected(self.pub)
            self.parents[v], self.kind[v] = before, "rejected"
        elif name == "fence" and self.latest is not None:
            v = fenced(self.store)
            self.parents[v], self.kind[v] = self.latest, "fenced"
        elif name == "crash_upload":  # killed after the claim and part of the files
            v = self.pub._claim_version()
            self.store.put(f"{version_dir(v)}/{WEIGHTS}", b"half a file")
            self.parents[v], self.kind[v], self.pub = self.pub.parent, "incomplete", None
        elif name == "crash_before_latest":  # killed between the manifest and LATEST

            def killed(version: int) -> None:
                raise Crash

            before = self.pub.parent
            self.pub._advance_latest = killed
            with pytest.raises(Crash):
                self.pub.publish_version(tiny_snapshot())
            v = self.pub._last_claimed
            self.parents[v], self.kind[v], self.pub = before, "ok", None
        elif name == "damage_latest" and self.latest is not None and self.intact(self.latest):
            damage(self.store, self.latest)
            self.damaged.add(self.latest)
            self.pub = None  # found at the next start
        elif name == "blind_latest" and self.latest is not None and self.latest not in self.blind:
            self.store.delete(f"{version_dir(self.latest)}/{MANIFEST}")
            self.store.delete(f"{version_dir(self.latest)}/{CLAIM}")
            self.blind.add(self.latest)
            self.pub = None
        elif name == "rollback":
            self.rollback(op[1], op[2])
        elif name == "prune":
            self.prune(op[1] % 4)

    def rollback(self, pick: int, force: bool) -> None:
        complete = sorted(v for v in self.present() if self.kind[v] != "incomplete" and v not in self.blind)
        if not complete:
            return
        target = complete[pick % len(complete)]
        if self.kind[target] in ("rejected", "fenced") and not force:
            with pytest.raises(RollbackRefused):
                rollback(self.store, target)
            return
        if target in self.damaged:
            with pytest.raises(CorruptVersion):
                rollback(self.store, target, force=force)
            return
        rollback(self.store, target, force=force)
        self.latest, self.pub, self.stuck = target, None, False

    def prune(self, keep: int) -> None:
        chain = chain_of(self.store, self.latest)
        newest_number = max(self.present(), default=None)
        deleted = prune_versions(self.store, keep)
        assert self.latest not in deleted and newest_number not in deleted
        if keep == 0:
            assert all(self.kind[v] == "incomplete" or v in self.blind for v in deleted)
        else:
            assert not set(chain[:keep]) & set(deleted)
            complete = [n for n, s in version_statuses(self.store).items() if s != INCOMPLETE]
            assert len(complete) <= keep + 2  # the kept, LATEST and the newest number

    # --------------------------------------------------------------------------- invariants
    def check(self) -> None:
        statuses = version_statuses(self.store)
        present = self.present()
        assert self.latest is None or self.latest in present  # retention never deletes LATEST
        chain = self.model_chain()
        assert chain_of(self.store, self.latest) == chain
        expected = {}
        for v in present:
            if self.kind[v] == "incomplete" or v in self.blind:
                expected[v] = INCOMPLETE
            elif self.kind[v] in ("rejected", "fenced"):
                expected[v] = REJECTED if self.kind[v] == "rejected" else FENCED
            else:
                expected[v] = PUBLISHED if v in chain else ABANDONED
        assert statuses == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_histories_recover_on_latests_chain_and_retention_keeps_it(ops: list[tuple]) -> None:
    """Publishes, rejections, fenced-out writers, crashes at two points of the checkpoint sequence,
    rollbacks (forced or not), damaged and manifest-less LATESTs, retention with keep 0–3: recovery
    lands on LATEST's chain (or, when a parent cannot be known, on a sound version), never on a
    rejected, fenced or incomplete one; statuses match the history; retention never deletes LATEST
    nor LATEST's chain within the keep count, and leaves no leftover behind."""
    with tempfile.TemporaryDirectory() as tmp:
        h = History(Path(tmp))
        for op in ops:
            h.run(op)  # while stuck, only an operator's rollback (or retention) does anything
            h.check()
        if h.pub is None and not h.stuck:
            h.resume()
        h.prune(0)
        statuses = version_statuses(h.store)
        complete = [n for n, s in statuses.items() if s != INCOMPLETE]
        if complete:
            leftovers = [
                n for n, s in statuses.items() if s == INCOMPLETE and n < complete[-1] and n != h.latest
            ]
            assert leftovers == []
        h.check()
