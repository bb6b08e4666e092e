"""Byte-code for what a learner imports, compiled on every core (scripts/setup.sh, ``BYTECODE=imported``).

A fresh venv has no ``.pyc``; where ``PYTHONDONTWRITEBYTECODE`` is set, as on these machines, no
import writes one, and every learner and test process compiled torch again. Importing what a learner
imports once, with writing allowed, compiles exactly that — 2,862 files — but on one core: 11.4 s
(2-core Xeon, 2026-12-07). Compiling the same files from a list on both cores takes 3.6 s.

``record LIST``
    import what a learner imports (its model's modeling code included: transformers imports it
    lazily) and write the files of the modules it loaded from site-packages, relative to it, sorted,
    one per line. ``make lock`` runs it (scripts/lock.sh), in the lock's venv.
``compile LIST``
    compile those files on every core. A file the list names but this venv lacks is skipped: a stale
    list costs time, never correctness — what it misses is compiled at its first import.
``import``
    compile by importing, on one core (no list needed).

Run with the venv's interpreter; ``HF_HUB_OFFLINE=1`` (the bundled model is local).
"""

from __future__ import annotations

import compileall
import os
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def import_learner() -> None:
    """What a learner imports before it trains, its model's modeling code included."""
    import stream_learner.cli
    import stream_learner.service.app  # noqa: F401
    from stream_learner.core.config import ModelSettings
    from stream_learner.core.model import load_model, load_tokenizer

    load_tokenizer(ModelSettings())
    load_model(ModelSettings())


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def record(out: Path) -> int:
    import_learner()
    site = site_packages()
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py"):
            resolved = Path(path).resolve()
            if resolved.is_relative_to(site):
                files.add(resolved.relative_to(site).as_posix())
    header = (
        "# The files a learner imports from site-packages, relative to it, at the lock's versions: what\n"
        "# scripts/setup.sh byte-compiles on every core. Made by `make lock` (scripts/bytecode.py record).\n"
    )
    out.write_text(header + "".join(f"{f}\n" for f in sorted(files)))
    return len(files)


def _compile(paths: list[str]) -> int:
    return sum(bool(compileall.compile_file(p, quiet=2)) for p in paths)


def compile_listed(listing: Path) -> tuple[int, int]:
    """Compile the files ``listing`` names that exist here, on every core; (compiled, listed)."""
    site = site_packages()
    names = [
        line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    paths = [str(site / n) for n in names if (site / n).is_file()]
    workers = max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_compile, [paths[i::workers] for i in range(workers)]))
    return done, len(names)


def main(argv: list[str]) -> int:
    if argv[:1] == ["import"] and len(argv) == 1:
        import_learner()
        return 0
    if len(argv) != 2 or argv[0] not in ("record", "compile"):
        print("usage: bytecode.py record LIST | compile LIST | import", file=sys.stderr)
        return 2
    started = time.monotonic()
    if argv[0] == "record":
        print(f"bytecode: {record(Path(argv[1]))} files a learner imports, listed in {argv[1]}")
    else:
        done, listed = compile_listed(Path(argv[1]))
        seconds = time.monotonic() - started
        print(f"bytecode: {done} of {listed} listed files compiled (or up to date) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
