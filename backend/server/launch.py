"""Run a module at a lower priority: `python -m backend.server.launch NICE MODULE [ARGS...]`.

The server starts its training and preprocessing children through this (rather than a `preexec_fn`,
which is unsafe in a process with threads), so they cannot starve interactive decodes. On Linux the
child also asks for SIGTERM when the server dies (even by `kill -9`): the trainer then writes its
checkpoint and exits, so a restarted server can resume the run instead of finding it locked."""
from __future__ import annotations

import os
import runpy
import signal
import sys


def _die_with_parent() -> None:
    parent = os.environ.get("IMFACE_SERVER_PID")
    if not sys.platform.startswith("linux") or not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the server died before prctl: behave as if signalled
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    nice, module = int(sys.argv[1]), sys.argv[2]
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    _die_with_parent()
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
