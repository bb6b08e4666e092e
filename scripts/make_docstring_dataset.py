#!/usr/bin/env python3
"""Make the second labeled test dataset: docstrings of the CPython standard library.

    .venv/bin/python scripts/make_docstring_dataset.py            # writes the two files below
    .venv/bin/python scripts/make_docstring_dataset.py --check    # rebuilds in memory, compares

Reads the ``.py`` files of the running interpreter's standard library (made with CPython 3.11.7;
another version gives other rows) with :mod:`ast`, importing nothing, and writes

    tests/data/stdlib_docstrings_stream.jsonl     rows {"id", "text", "label", "segment"}
    tests/data/stdlib_docstrings_heldout.jsonl    same fields, other source files

Labels: what the docstring documents, ``function`` (functions and methods), ``class`` or ``module``.
The text is the docstring alone: no name, no signature, no ``def``/``class`` line; the object's own
name is replaced by ``<name>``, signature lines and doctest examples are dropped. Segment: a family of
top-level modules (:data:`FAMILIES`); the stream runs in segment blocks (:data:`ORDER`), shuffled
inside each block, so the vocabulary and the label mix drift. The held-out rows come from other source
files than the stream's (:func:`split`). Files that carry a licence notice of their own are left out
(:func:`has_own_licence`), so everything shipped is under the PSF licence (see tests/data/README.md
and NOTICE). Deterministic: fixed seed, sorted inputs, no set iteration.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import statistics
import sys
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

SEED = 18  # issue 18
MADE_WITH = (3, 11, 7)
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data"
STREAM = "stdlib_docstrings_stream.jsonl"
HELDOUT = "stdlib_docstrings_heldout.jsonl"
LABELS = ("function", "class", "module")

MIN_WORDS = 10  # shorter docstrings are dropped
LONG_WORDS = 40  # every function docstring this long is kept; shorter ones are sampled ...
SHORT_FUNCTIONS = 250  # ... this many of them (MIN_WORDS..LONG_WORDS-1 words), outside ONE_LABEL segments
MAX_CHARS = 6_000  # longer docstrings are dropped (the learner's events stay well under its byte limit)
HELDOUT_SHARE = 0.20  # of each segment's rows, by source file
NEAR_DUP_JACCARD = 0.5  # word-trigram Jaccard at or above which two docstrings count as near-identical
NEAR_DUP_CONTAINMENT = 0.8  # ... or this share of the shorter one's trigrams in the longer one

# fmt: off
# segment -> top-level modules and packages of the standard library
FAMILIES: dict[str, tuple[str, ...]] = {
    "numerics": (
        "_pydecimal", "decimal", "statistics", "fractions", "random", "bisect", "heapq", "hashlib",
        "hmac", "secrets", "base64", "colorsys", "ipaddress", "quopri", "binhex",
    ),
    "mail": ("email", "smtplib", "smtpd", "imaplib", "poplib", "nntplib", "mailbox", "mailcap", "mimetypes"),
    "web": (
        "http", "urllib", "wsgiref", "xmlrpc", "cgi", "cgitb", "webbrowser", "ftplib", "telnetlib", "ssl",
        "socket", "xml", "html", "_markupbase", "json", "plistlib", "xdrlib", "netrc",
    ),
    "concurrency": (
        "asyncio", "concurrent", "threading", "_threading_local", "multiprocessing", "queue",
        "selectors", "sched", "subprocess", "_bootsubprocess", "signal",
    ),
    "datamodel": (
        "typing", "abc", "_py_abc", "collections", "_collections_abc", "numbers", "enum", "dataclasses",
        "contextlib", "contextvars", "weakref", "_weakrefset", "functools", "operator", "copy",
        "copyreg", "types", "graphlib", "pprint", "reprlib", "pickle", "shelve", "dbm", "string",
        "datetime", "calendar", "_strptime", "locale", "gettext", "codecs", "stringprep", "difflib",
        "argparse", "getopt", "configparser", "csv", "struct", "zoneinfo", "_sitebuiltins", "pickletools",
        "_compat_pickle",
    ),
    "files": (
        "os", "posixpath", "ntpath", "nturl2path", "genericpath", "shutil", "pathlib", "glob",
        "fnmatch", "tempfile", "filecmp", "fileinput", "zipfile", "gzip", "bz2", "lzma", "_compression",
        "io", "_pyio", "stat", "pty", "tty", "getpass", "chunk", "wave", "aifc", "sunau", "sndhdr",
        "imghdr", "crypt", "pipes", "shlex", "uuid", "linecache",
    ),
    "devtools": (
        "inspect", "pdb", "bdb", "doctest", "pydoc", "traceback", "code", "codeop", "cmd", "profile",
        "cProfile", "pstats", "timeit", "dis", "opcode", "tokenize", "token", "keyword", "tabnanny",
        "symtable", "tracemalloc", "rlcompleter", "pyclbr", "warnings", "__future__", "ctypes",
    ),
    "packaging": (
        "distutils", "lib2to3", "importlib", "pkgutil", "compileall", "py_compile", "zipimport", "runpy",
        "site", "sysconfig", "modulefinder", "zipapp", "ensurepip", "imp", "_aix_support", "_osx_support",
    ),
    "gui": ("tkinter", "idlelib", "curses"),
}
# the stream's block order (the drift): the first block is the one-class start
ORDER = ("numerics", "mail", "web", "concurrency", "datamodel", "files", "devtools", "packaging", "gui")
# segments that keep one label only: the numeric modules' function docstrings (their few class and
# module docstrings are dropped), so the stream opens with a stretch of one label, stream and held-out
ONE_LABEL = {"numerics": "function"}
# no docstrings worth having, or generated: __hello__, antigravity, this; sre_*: deprecated shims of re
SKIP_MODULES = (
    "__hello__", "antigravity", "this", "sre_compile", "sre_constants", "sre_parse",
    "_sysconfigdata_",
)

SKIP_PREFIXES = (
    "test/", "site-packages/", "dist-packages/", "turtledemo/", "pydoc_data/", "lib-dynload/",
    "config-", "__phello__/", "encodings/",  # encodings: one boilerplate docstring per codec
)
SKIP_PARTS = ("/test/", "/tests/", "/idle_test/")
# fmt: on
CONSTRUCTORS = ("__init__", "__new__")  # they describe the class: dropped rather than called "function"

# a file with a licence grant or a third-party copyright notice of its own is left out, so that
# every row is under the PSF licence alone; "Licensed to PSF under a Contributor Agreement" is PSF's
_GRANT = re.compile(
    r"Permission to use|hereby granted|Redistribution and use|SPDX-License|same terms as Python"
)
_NOTICE = re.compile(r"(?i)copyright\s*(\(c\)|©|\d{4}|by\b)|SPDX-FileCopyrightText|:copyright:|__copyright__")
_PSF_NOTICE = re.compile(r"Python Software Foundation|CNRI")
_CONTRIBUTED = re.compile(r"Licensed to (the )?PSF under a Contributor Agreement")


def has_own_licence(source: str) -> bool:
    if _GRANT.search(source):
        return True
    notices = [line for line in source.splitlines() if _NOTICE.search(line)]
    if all(_PSF_NOTICE.search(line) for line in notices):
        return False
    return not _CONTRIBUTED.search(source)


@dataclass
class Doc:
    path: str  # relative to the stdlib
    qualname: str  # "" for a module
    label: str
    segment: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


# ------------------------------------------------------------------------------------ cleaning
_SIGNATURE = re.compile(r"^\s*[\w.<>]+\s*\(.*\)\s*(->.*)?$")
_DOCTEST = re.compile(r"^\s*>>>")


def _strip_doctests(lines: list[str]) -> list[str]:
    """Drop doctest examples: from a ``>>>`` line through the next blank line."""
    out, inside = [], False
    for line in lines:
        if _DOCTEST.match(line):
            inside = True
        elif inside and not line.strip():
            inside = False
        if not inside:
            out.append(line)
    return out


def _mask(text: str, name: str) -> str:
    """Replace the object's own name by ``<name>`` (a CamelCase class name gives the label away).

    A name that looks like an identifier (an underscore, a digit, a capital or a dot in it) is masked
    wherever it stands as a word; a plain lowercase word (``read``, ``copy``) only where it is written
    as code: called, dotted, quoted, followed by ``module``/``package``/``.py``, or opening the text
    (a module docstring's "codecs -- Python Codec Registry").
    """
    n = re.escape(name)
    if re.search(r"[_\dA-Z.]", name):
        return re.sub(rf"(?<![\w.]){n}(?![\w])", "<name>", text)
    code_like = (
        rf"(?<=[.`'\"]){n}\b|\b{n}(?=\s*\(|[`'\"]|\.\w|\.py\b|\s+(module|package)\b)"
        rf"|(?<=\bimport ){n}\b|(?<=\bfrom ){n}\b|^{n}\b(?!')"
    )
    return re.sub(code_like, "<name>", text)


def clean(doc: str, names: list[str]) -> str:
    lines = _strip_doctests(doc.splitlines())
    while lines and (not lines[0].strip() or _SIGNATURE.match(lines[0])):
        lines.pop(0)  # "name(args) -> result" lines give the kind (and the name) away
    text = "\n".join(line.rstrip() for line in lines).strip()
    for name in names:
        text = _mask(text, name)
    return re.sub(r"\n{3,}", "\n\n", text)


# ---------------------------------------------------------------------------------- extraction
def segment_of(rel: str) -> str | None:
    top = rel.split("/")[0].removesuffix(".py")
    for segment, tops in FAMILIES.items():
        if top in tops:
            return segment
    return None


def source_files(stdlib: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(relative path, source) of every file to read, and the files left out for their licence."""
    files, own_licence = [], []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(SKIP_PREFIXES) or any(p in "/" + rel for p in SKIP_PARTS):
            continue
        top = rel.split("/")[0].removesuffix(".py")
        if Path(rel).name.startswith("test_") or top.startswith(SKIP_MODULES):
            continue
        source = path.read_text(encoding="utf-8")
        (own_licence if has_own_licence(source) else files).append((rel, source))
    own_licence = [rel for rel, _ in own_licence]
    # a package whose __init__ has a licence of its own is left out whole (unittest, logging, ...)
    packages = [rel.rsplit("/", 1)[0] + "/" for rel in own_licence if rel.endswith("/__init__.py")]
    kept = [(rel, src) for rel, src in files if not rel.startswith(tuple(packages))]
    own_licence += [rel for rel, _ in files if rel.startswith(tuple(packages))]
    return kept, sorted(own_licence)


def _module_names(rel: str) -> list[str]:
    dotted = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    names = [dotted]
    if "." in dotted:
        names.append(dotted.rsplit(".", 1)[1])
    return names


def extract(rel: str, source: str, segment: str) -> list[Doc]:
    tree = ast.parse(source, filename=rel)
    docs = []
    doc = ast.get_docstring(tree)
    if doc:
        docs.append(Doc(rel, "", "module", segment, clean(doc, _module_names(rel))))

    def visit(node: ast.AST, owner: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = [*owner, child.name]
                doc = ast.get_docstring(child)
                if doc and child.name not in CONSTRUCTORS:
                    label = "class" if isinstance(child, ast.ClassDef) else "function"
                    docs.append(Doc(rel, ".".join(qual), label, segment, clean(doc, [child.name])))
                visit(child, qual)
            else:
                visit(child, owner)

    visit(tree, [])
    return docs


# ------------------------------------------------------------------------------ duplicates
def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _trigrams(text: str) -> list[str]:
    words = _norm(text).split()
    return sorted({" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))})


def drop_duplicates(docs: list[Doc]) -> tuple[list[Doc], int, int]:
    """Exact duplicates (after lower-casing and dropping punctuation) and near-duplicates collapsed
    to one row; a group of near-identical docstrings with different labels is dropped whole."""
    parent = list(range(len(docs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    shingles = [_trigrams(d.text) for d in docs]
    index: dict[str, list[int]] = defaultdict(list)
    for i, sh in enumerate(shingles):
        for s in sh:
            index[s].append(i)
    overlap: Counter[tuple[int, int]] = Counter()
    for s in sorted(index):
        ids = index[s]
        if len(ids) > 200:  # boilerplate trigram ("return a new"): no evidence
            continue
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                overlap[ids[a], ids[b]] += 1
    exact = {}
    for i, d in enumerate(docs):
        key = _norm(d.text)
        if key in exact:
            parent[find(i)] = find(exact[key])
        else:
            exact[key] = i
    for (i, j), common in sorted(overlap.items()):
        a, b = len(shingles[i]), len(shingles[j])
        if common / (a + b - common) >= NEAR_DUP_JACCARD or common / min(a, b) >= NEAR_DUP_CONTAINMENT:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(docs)):
        groups[find(i)].append(i)
    kept, mixed = [], 0
    for members in sorted(groups.values()):
        if len({docs[i].label for i in members}) > 1:
            mixed += len(members)
            continue
        kept.append(docs[max(members, key=lambda i: (docs[i].words, -i))])  # the longest stays
    kept.sort(key=lambda d: (d.path, d.qualname))
    return kept, len(docs) - len(kept) - mixed, mixed


# ----------------------------------------------------------------------------------- the split
def split(docs: list[Doc], rng: random.Random) -> tuple[list[Doc], list[Doc]]:
    """Per segment, whole source files to the held-out side until it has ~HELDOUT_SHARE of the rows,
    with about the segment's label mix: the best of many random file orders."""
    stream, heldout = [], []
    for segment in ORDER:
        rows = [d for d in docs if d.segment == segment]
        by_file: dict[str, list[Doc]] = defaultdict(list)
        for d in rows:
            by_file[d.path].append(d)
        files = sorted(by_file)
        mix = Counter(d.label for d in rows)
        target = HELDOUT_SHARE * len(rows)
        best, best_cost = None, float("inf")
        for _ in range(3000):
            order = files[:]
            rng.shuffle(order)
            chosen, n = [], 0
            for f in order:
                if n + len(by_file[f]) <= 1.15 * target:
                    chosen.append(f)
                    n += len(by_file[f])
                if n >= 0.95 * target:
                    break
            got = Counter(d.label for f in chosen for d in by_file[f])
            cost = abs(n - target) / target + sum(
                abs(got[lab] / max(1, n) - mix[lab] / len(rows)) for lab in LABELS
            )
            if cost < best_cost:
                best, best_cost = sorted(chosen), cost
        for f in files:
            (heldout if f in best else stream).extend(by_file[f])
    return stream, heldout


# ----------------------------------------------------------------------------------- assembly
def _row_id(d: Doc) -> str:
    return "sd-" + hashlib.sha1(f"{d.path}:{d.qualname}".encode()).hexdigest()[:12]


def build(stdlib: Path) -> tuple[list[dict], list[dict], dict]:
    rng = random.Random(SEED)
    files, own_licence = source_files(stdlib)
    docs, unassigned = [], []
    for rel, source in files:
        segment = segment_of(rel)
        if segment is None:
            unassigned.append(rel)
            continue
        docs.extend(extract(rel, source, segment))
    n_docstrings = len(docs)
    docs = [
        d
        for d in docs
        if d.words >= MIN_WORDS and len(d.text) <= MAX_CHARS and ONE_LABEL.get(d.segment, d.label) == d.label
    ]
    docs, n_dup, n_mixed = drop_duplicates(docs)
    # functions outnumber classes 5 to 1: keep the long ones and a sample of the short ones
    short = [d for d in docs if d.label == "function" and d.words < LONG_WORDS and d.segment not in ONE_LABEL]
    sampled = rng.sample(short, min(SHORT_FUNCTIONS, len(short)))
    dropped = {id(d) for d in short} - {id(d) for d in sampled}
    docs = [d for d in docs if id(d) not in dropped]

    stream_docs, heldout_docs = split(docs, rng)
    out = []
    for part in (stream_docs, heldout_docs):
        rows = []
        for segment in ORDER:  # segment blocks, shuffled inside
            block = [d for d in part if d.segment == segment]
            rng.shuffle(block)
            rows += [
                {"id": _row_id(d), "text": d.text, "label": d.label, "segment": d.segment} for d in block
            ]
        out.append(rows)
    ids = [r["id"] for rows in out for r in rows]
    assert len(set(ids)) == len(ids), "two rows with one id"
    info = {
        "files_read": len(files),
        "files_own_licence": own_licence,
        "files_unassigned": unassigned,
        "docstrings": n_docstrings,
        "duplicates_dropped": n_dup,
        "mixed_label_groups_dropped": n_mixed,
        "short_functions": f"{len(sampled)} of {len(short)}",
    }
    return out[0], out[1], info


def dump(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def report(stream: list[dict], heldout: list[dict], tokens: bool) -> None:
    for name, rows in (("stream", stream), ("held-out", heldout)):
        print(f"{name}: {len(rows)} rows, labels {dict(Counter(r['label'] for r in rows))}")
        for segment in ORDER:
            c = Counter(r["label"] for r in rows if r["segment"] == segment)
            print(f"  {segment:12s} {sum(c.values()):5d}  " + "  ".join(f"{lab} {c[lab]}" for lab in LABELS))
    first = stream[0]["label"]
    run = next((i for i, r in enumerate(stream) if r["label"] != first), len(stream))
    head = dict(Counter(r["label"] for r in stream[:200]))
    print(f"stream starts with {run} '{first}' rows in a row; first 200: {head}")
    words = [len(r["text"].split()) for r in stream + heldout]
    print(f"words: mean {statistics.mean(words):.1f}, median {statistics.median(words)}, max {max(words)}")
    if tokens:
        from stream_learner.core.config import ModelSettings
        from stream_learner.core.model import load_tokenizer

        settings = ModelSettings()
        tok = load_tokenizer(settings)
        for name, rows in (("stream", stream), ("held-out", heldout), ("both", stream + heldout)):
            n = sorted(len(ids) for ids in tok([r["text"] for r in rows], truncation=False)["input_ids"])
            over = sum(x > settings.max_length for x in n) / len(n)
            p95 = n[min(len(n) - 1, int(0.95 * len(n)))]
            print(
                f"tokens ({name}): median {statistics.median(n):.0f}, p95 {p95}, max {n[-1]}, "
                f"over {settings.max_length}: {over:.1%}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    parser.add_argument(
        "--tokens", action="store_true", help="token-length statistics too (MiniLM tokenizer)"
    )
    args = parser.parse_args()
    if sys.version_info[:3] != MADE_WITH and args.stdlib == Path(sysconfig.get_paths()["stdlib"]):
        made = ".".join(map(str, MADE_WITH))
        print(f"note: made with CPython {made}; this is {sys.version.split()[0]}", file=sys.stderr)
    stream, heldout, info = build(args.stdlib)
    for key, value in info.items():
        print(f"{key}: {len(value) if isinstance(value, list) else value}")
    report(stream, heldout, args.tokens)
    files = {STREAM: dump(stream), HELDOUT: dump(heldout)}
    if args.check:
        same = all((args.out / n).is_file() and (args.out / n).read_bytes() == b for n, b in files.items())
        print(("identical to" if same else "DIFFERENT from") + f" the files in {args.out}")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
