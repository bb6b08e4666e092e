"""Local staging directories, and the removal of those a killed learner left behind.

A learner stages files on local disk: a version's files before they are uploaded (the publisher), a
version downloaded to resume from (start-up). A ``TemporaryDirectory`` removes its directory on every
way out of Python — not on SIGKILL or an OOM kill, and each left behind holds a version's files
(≈ 3 × the model: weights and AdamW's two moments). Every learner, when it starts, removes those.

Which directories are still in use is told by a lock, not by a process id: in Kubernetes the learner
is PID 1 of every container, so a killed predecessor's pid always looks alive (it is the sweeper's
own). Each staging directory holds a lock file, ``.lock``, on which its process keeps an exclusive
``flock`` for the directory's whole life, through an open file descriptor. The kernel releases the
lock when the process dies, however it dies. The sweep tries a non-blocking ``flock`` on each: if it
gets the lock, no process holds the directory any more and it is removed (with the lock held, so no
one else sweeps it at the same time); if not, it is in use and stays. A directory is made under a
name the sweep ignores and renamed to its final name only once its lock is held, so the sweep never
sees one of ours unlocked. A staging directory without a lock file (an older learner's) is not in
use either: it is removed too.

>>> with staging_dir("publish") as path:
...     Path(path).name.startswith(f"stream-learner-publish-{os.getpid()}-")
True
>>> root = Path(tempfile.mkdtemp())
>>> live = staging_dir("publish", root)  # held: its lock is ours while ``live`` is open
>>> (root / f"stream-learner-publish-{os.getpid()}-x2").mkdir()  # our own pid, but nobody's lock
>>> remove_stale_staging_dirs(root), [p.name for p in root.iterdir()] == [Path(live.name).name]
(1, True)
>>> live.cleanup(); remove_stale_staging_dirs(root), list(root.iterdir())
(0, [])
>>> shutil.rmtree(root)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "stream-learner-"
LOCK = ".lock"  # inside each staging directory; a dotfile, never uploaded (the publisher skips it)
_NAME = re.compile(rf"{PREFIX}[a-z]+-\d+-")


class StagingDir:
    """A staging directory, locked by this process until :meth:`cleanup` (or garbage collection).

    Used like ``tempfile.TemporaryDirectory``: ``.name`` is its path, and ``with`` yields it and
    removes the directory on the way out.
    """

    def __init__(self, kind: str, root: Path | None = None) -> None:
        root = Path(tempfile.gettempdir()) if root is None else Path(root)
        # made under a name the sweep ignores (a leading dot), locked, then renamed: never seen unlocked
        making = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{kind}-", dir=root))
        try:
            fd = os.open(making / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            shutil.rmtree(making, ignore_errors=True)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else has it
            path = root / f"{PREFIX}{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            os.rename(making, path)
        except BaseException:
            os.close(fd)
            shutil.rmtree(making, ignore_errors=True)
            raise
        self.name = str(path)
        # one finalizer for both, in this order: the directory goes while the lock still holds it
        self._finalizer = weakref.finalize(self, _remove_and_unlock, self.name, fd)

    def cleanup(self) -> None:
        self._finalizer()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<StagingDir {self.name!r}>"


def _remove_and_unlock(path: str, fd: int) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def staging_dir(kind: str, root: Path | None = None) -> StagingDir:
    """A new, locked directory in ``root`` (default: the system's temporary directory), named
    ``stream-learner-<kind>-<pid>-…`` (the pid is for people; liveness is the lock)."""
    return StagingDir(kind, root)


def remove_stale_staging_dirs(root: Path | None = None) -> int:
    """Remove the staging directories under ``root`` (default: the system's temporary directory) that
    no process holds (their lock is free, or they have none); returns how many. Directories in use,
    of other users and of other names are left alone."""
    root = Path(tempfile.gettempdir()) if root is None else Path(root)
    removed, freed = 0, 0
    for path in root.glob(f"{PREFIX}*-*-*"):
        if not _NAME.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        with _lock_if_free(path) as free:
            if not free:
                continue
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed, freed = removed + 1, freed + size
    if removed:
        log.info("removed %d staging directories of killed learners (%.0f MB)", removed, freed / 1e6)
    return removed


def _size(path: Path) -> int:
    """Bytes of the files under ``path``; files and directories that vanish meanwhile count 0 (the
    directory may be another process's, being removed by it right now: its lock file goes first)."""
    total = 0
    for parent, _dirs, files in os.walk(path):  # os.walk ignores directories that vanish
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(parent, name))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


@contextlib.contextmanager
def _lock_if_free(path: Path):
    """Yield True, holding ``path``'s lock, if no process holds it (or it has no lock file); else False."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield True  # no lock file: not a directory any live learner of this version holds
        return
    except OSError:  # another user's directory, or not a lock we could take
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield False  # held: its process is alive
            return
        yield True
    finally:
        os.close(fd)
