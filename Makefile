# The two commands of the README. Each sets everything up first (idempotent, fast when done).
.PHONY: setup demo test test-fast test-slow lint

setup:
	EXTRAS=dev ./scripts/setup.sh

demo: setup
	.venv/bin/stream-learner demo

test: setup
	.venv/bin/ruff check stream_learner tests
	.venv/bin/ruff format --check stream_learner tests
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check stream_learner tests
	.venv/bin/ruff format --check stream_learner tests
