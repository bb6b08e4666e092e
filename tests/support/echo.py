"""``python -m tests.support.echo CODE``: prints what a child process was started with, as JSON, and
exits with CODE (a negative CODE: killed by that signal; ``pause``: waits for a signal). The zygote's
tests run it (test_zygote.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import torch

if __name__ == "__main__":
    seen = {
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": os.environ.get("SL_TESTS_ECHO"),
        "tmpdir": tempfile.gettempdir(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(seen), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if sys.argv[1] == "pause":
        signal.pause()
    code = int(sys.argv[1])
    if code < 0:
        os.kill(os.getpid(), -code)
        signal.pause()
    sys.exit(code)
