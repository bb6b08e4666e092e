"""``python tests/support/zygote_exec.py CMD ARGS…``: CMD run as a child of the session's zygote, in
place of this process (:mod:`tests.support.zygote`). For launchers that start their workers
themselves — torchrun's ranks: each would otherwise be a fresh interpreter spending ≈ 3.5 s of CPU
importing torch and transformers.

This process imports no torch (≈ 0.05 s to start). It passes on the signals a launcher sends (SIGTERM,
SIGINT, SIGHUP), and exits as the child did: its exit code, or the same signal. The child watches
this process and SIGKILLs itself if it dies first — SIGKILL cannot be passed on.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's root

from tests.support.zygote import ForkedProcess

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str]) -> int:
    child = ForkedProcess(
        argv, stdout=1, stderr=2, env=dict(os.environ), cwd=os.getcwd(), watch_pid=os.getpid()
    )
    for sig in FORWARDED:
        signal.signal(sig, lambda received, _frame: child.send_signal(received))
    code = child.wait()  # a signal handled meanwhile does not end the wait (PEP 475)
    if code < 0:  # the child died of a signal: so does this process, as the launcher expects
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
