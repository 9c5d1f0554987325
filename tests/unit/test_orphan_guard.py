"""The guard that ends an engine's helper processes when their owner dies, with real processes:
an owner process starts a helper (a stand-in for vLLM's engine core: a plain child process) and
the guard; the owner is then killed on purpose (the fault injected) or ends the helper itself."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

OWNER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from slimserve.serve.engine import orphan_guard

    before = orphan_guard.descendants()
    helper = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    guard = orphan_guard.guard_new_children(before)
    print(json.dumps({"helper": helper.pid, "guard": guard.pid}), flush=True)
    for line in sys.stdin:  # "end": end the helper as a clean shutdown would
        helper.terminate()
        helper.wait()
        print("ended", flush=True)
    time.sleep(60)
    """
)
SLEEPER = "import time; time.sleep(60)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_ended(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _ended(pid):
            return True
        time.sleep(0.1)
    return False


def _start_owner(helper_code: str) -> tuple[subprocess.Popen, dict[str, int]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, helper_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return owner, json.loads(owner.stdout.readline())


def test_a_killed_owner_leaves_no_helper_behind() -> None:
    owner, pids = _start_owner(SLEEPER)
    time.sleep(1.0)  # the guard is watching
    assert not _ended(pids["helper"]) and not _ended(pids["guard"])
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert _wait_ended(pids["helper"], 5.0)
    assert _wait_ended(pids["guard"], 5.0)


def test_a_helper_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    owner, pids = _start_owner(STUBBORN)
    time.sleep(1.0)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert not _wait_ended(pids["helper"], 2.0)  # SIGTERM ignored
    assert _wait_ended(pids["helper"], 8.0)  # then SIGKILL
    assert _wait_ended(pids["guard"], 3.0)


def test_the_guard_leaves_when_the_helpers_end_and_the_owner_lives_on() -> None:
    owner, pids = _start_owner(SLEEPER)
    try:
        owner.stdin.write("end\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "ended"
        assert _wait_ended(pids["guard"], 5.0)
        assert owner.poll() is None
    finally:
        owner.kill()
        owner.wait()
