"""Ends an engine's helper processes when the process that started them dies.

vLLM runs its engine core (and that one its worker) in processes of their own. They exit when
vLLM is shut down, but not when the replica that started them is killed (SIGKILL, the OOM killer,
`ray stop --force`): two were found running, holding ~2 GB, twenty minutes after their replica
had gone. (The torch engine's own process exits when its pipe closes.)

`guard_new_children` starts a small watcher process over the owner's new descendants. When the
owner is gone (the watcher's parent changes), it terminates them (SIGTERM, SIGKILL after a grace
period) and exits; it also exits on its own once they have all ended.

    python -m slimserve.serve.engine.orphan_guard OWNER_PID HELPER_PID [HELPER_PID ...]
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time

import psutil

from ..logs import configure_logging

log = logging.getLogger(__name__)

POLL_S = 0.5
GRACE_S = 5.0


def descendants() -> set[int]:
    """This process's descendants, by pid."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def guard_new_children(before: set[int]) -> subprocess.Popen | None:
    """A watcher over this process's descendants not in `before`; None when there are none."""
    helpers = sorted(descendants() - before)
    if not helpers:
        return None
    command = [sys.executable, "-m", __name__, str(os.getpid()), *map(str, helpers)]
    log.info("guarding helper processes %s of pid %d", helpers, os.getpid())
    # Its own session: a Ctrl-C to the owner's terminal leaves it to do its job.
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
    return living


def watch(owner: int, pids: list[int]) -> None:
    """Until the helpers end: when `owner` (this process's parent) is gone, end them."""
    helpers = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone
            helpers.append(psutil.Process(pid))  # pins the start time: no pid reuse confusion
    while helpers := _alive(helpers):
        if os.getppid() != owner:
            log.warning("owner %d is gone: ending its helper processes %s", owner, pids)
            for process in helpers:
                process.terminate()
            _, stubborn = psutil.wait_procs(helpers, timeout=GRACE_S)
            for process in stubborn:
                process.kill()
            return
        time.sleep(POLL_S)


def main() -> None:
    configure_logging()
    owner, *pids = (int(arg) for arg in sys.argv[1:])
    watch(owner, pids)


if __name__ == "__main__":
    main()
