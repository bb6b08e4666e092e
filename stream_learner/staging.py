"""Local staging directories, and the removal of those a killed learner left behind.

A learner stages files on local disk: a version's files before they are uploaded (the publisher), a
version downloaded to resume from (start-up). A ``TemporaryDirectory`` removes its directory on every
way out of Python — not on SIGKILL or an OOM kill, and each left behind holds a version's files
(≈ 3 × the model: weights and AdamW's two moments). Each directory's name therefore carries its process
id, and every learner, when it starts, removes those whose process is gone.

>>> with staging_dir("publish") as path:
...     Path(path).name.startswith(f"stream-learner-publish-{os.getpid()}-")
True
>>> root = Path(tempfile.mkdtemp())
>>> (root / f"stream-learner-publish-{os.getpid()}-x1").mkdir()  # this process: alive
>>> (root / "stream-learner-publish-999999999-x2").mkdir()  # above any pid_max: no such process
>>> remove_stale_staging_dirs(root), [p.name.rsplit("-", 1)[1] for p in root.iterdir()]
(1, ['x1'])
>>> shutil.rmtree(root)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "stream-learner-"
_NAME = re.compile(rf"{PREFIX}[a-z]+-(\d+)-")


def staging_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A new directory in the system's temporary directory, named ``stream-learner-<kind>-<pid>-…``."""
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{kind}-{os.getpid()}-")


def remove_stale_staging_dirs(root: Path | None = None) -> int:
    """Remove the staging directories under ``root`` (default: the system's temporary directory) whose
    process no longer runs; returns how many. Directories of live processes, of other users' processes
    and of other names are left alone."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed, freed = 0, 0
    for path in root.glob(f"{PREFIX}*-*-*"):
        found = _NAME.match(path.name)
        if not found or not path.is_dir() or _alive(int(found.group(1))):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed, freed = removed + 1, freed + size
    if removed:
        log.info("removed %d staging directories of killed learners (%.0f MB)", removed, freed / 1e6)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
