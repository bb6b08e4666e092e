# The two commands of the README. Each sets everything up first (idempotent, fast when done).
.PHONY: setup demo test test-fast test-slow lint lock

# four workers (pytest-xdist) on two cores: with two, a third of the run's CPU time went unused while the
# end-to-end tests waited on a broker, a child process or a learner (measured: 2 → 360 s, 3 → 294 s,
# 4 → 274 s on an idle 2-core Xeon; docs/testing.md)
# Every import writes its .pyc, once: set-up compiles only what a learner imports (scripts/setup.sh,
# BYTECODE), and with the machine's PYTHONDONTWRITEBYTECODE each of the suite's ~100 processes would
# compile the rest from source again (hypothesis, boto3, torch's inductor…).
unexport PYTHONDONTWRITEBYTECODE

PYTEST = .venv/bin/python -m pytest -q -n 4 --dist worksteal --durations=15

setup:
	EXTRAS=dev ./scripts/setup.sh

demo: setup
	.venv/bin/stream-learner demo

test: setup
	.venv/bin/ruff check stream_learner tests
	.venv/bin/ruff format --check stream_learner tests
	.venv/bin/lint-imports --no-logo
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

lint: setup
	.venv/bin/ruff check stream_learner tests
	.venv/bin/ruff format --check stream_learner tests
	.venv/bin/lint-imports --no-logo

# constraints.txt, the lock, anew: the newest versions pyproject.toml allows, resolved in a fresh venv
# (and scripts/learner-modules.txt, the files set-up byte-compiles, at those versions);
# `make test` then installs it into .venv and checks it (commit it only if that passes)
lock:
	./scripts/lock.sh
