"""Serving processes kept off the cores an engine binds its compute to, with real processes: a
"replica" or "driver" process starts children standing in for vLLM's worker (a process that
binds itself to a core), its scheduler or our engine process (plain children), and Ray's
processes; each run happens in a process of its own, so this test's process keeps its cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from slimserve.serve import cpu_placement
from slimserve.serve.cpu_placement import ENGINE_CPUS_ENV, format_cpus, parse_cpus

CPUS = frozenset(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(len(CPUS) < 2, reason="placement needs two cores")
BOUND = frozenset({min(CPUS)})  # where the stand-in for vLLM's worker binds itself
FREE = CPUS - BOUND

# A child that binds itself to sys.argv[1] (vLLM's worker: its OpenMP threads), or stays put.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    if len(sys.argv) > 1:
        os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[1].split(",")})
    print("ready", flush=True)
    time.sleep(60)
    """
)

COMMON = textwrap.dedent(
    """
    import json, os, subprocess, sys, threading, time
    from slimserve.serve import cpu_placement

    CHILD, BOUND = sys.argv[1], sys.argv[2]

    def child(*args):
        process = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"ready"
        return process

    def threads_cpus(pid):
        # the CPU lists of a process's threads, as the kernel reports them
        found = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("Cpus_allowed_list:"):
                        found.add(line.split()[1])
        return sorted(found)

    # a second thread, started before the move, must move too
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """
)

REPLICA = COMMON + textwrap.dedent(
    """
    worker = child(BOUND) if BOUND else None
    scheduler = child()
    cpu_placement.keep_replica_off_bound_cores("v")
    report = {"replica": threads_cpus(os.getpid()), "scheduler": threads_cpus(scheduler.pid)}
    if worker:
        report["worker"] = threads_cpus(worker.pid)
    print(json.dumps(report), flush=True)
    for process in (worker, scheduler):
        if process:
            process.kill()
    """
)

# The driver starts a Ray stand-in and a variant replica; the replica starts its engine process
# (which stays on every core), then moves itself unless told not to.
DRIVER = COMMON + textwrap.dedent(
    """
    from slimserve.serve.cpu_placement import format_cpus, parse_cpus
    ray_process = child()
    replica_code = (
        "import os, subprocess, sys, time\\n"
        "engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
        "print(engine.pid, flush=True)\\n"
        "if sys.argv[1]: os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})\\n"
        "print('moved', flush=True)\\n"
        "time.sleep(60)\\n"
    )
    replica = subprocess.Popen(
        [sys.executable, "-c", replica_code, sys.argv[3]], stdout=subprocess.PIPE
    )
    engine_pid = int(replica.stdout.readline())
    assert replica.stdout.readline().strip() == b"moved"
    cpus = parse_cpus(os.environ["SLIMSERVE_ENGINE_CPUS"])
    cpu_placement.keep_ray_off_bound_cores(cpus, lambda process: process.pid == replica.pid)
    print(json.dumps({
        "driver": threads_cpus(os.getpid()),
        "ray": threads_cpus(ray_process.pid),
        "replica": threads_cpus(replica.pid),
        "engine": threads_cpus(engine_pid),
    }), flush=True)
    for pid in (engine_pid, replica.pid, ray_process.pid):
        os.kill(pid, 9)
    """
)


def _run(code: str, *args: str, engine_cpus: str | None) -> dict[str, list[str]]:
    env = {key: value for key, value in os.environ.items() if key != ENGINE_CPUS_ENV}
    if engine_cpus is not None:
        env[ENGINE_CPUS_ENV] = engine_cpus
    done = subprocess.run(
        [sys.executable, "-c", code, CHILD, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpus(report: list[str]) -> list[frozenset[int]]:
    return [parse_cpus(listed) for listed in report]


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,4,6-7", {0, 1, 4, 6, 7}), (" 2 , 5-5", {2, 5})],
)
def test_cpu_lists_parse_as_linux_writes_them(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus
    assert parse_cpus(format_cpus(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "-2", "1,,2", "0-x"])
def test_a_bad_cpu_list_is_an_error_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=ENGINE_CPUS_ENV):
        parse_cpus(text)


@needs_two_cores
def test_a_replica_whose_engine_bound_itself_moves_with_the_engines_other_processes() -> None:
    report = _run(REPLICA, format_cpus(BOUND), engine_cpus=format_cpus(CPUS))
    assert _cpus(report["worker"]) == [BOUND]  # the compute stays where it bound itself
    assert _cpus(report["replica"]) == [FREE]  # every thread of the replica
    assert _cpus(report["scheduler"]) == [FREE]


@needs_two_cores
def test_nothing_moves_where_no_engine_process_bound_itself() -> None:
    """The torch engine binds nothing: its replica and processes keep every core."""
    report = _run(REPLICA, "", engine_cpus=format_cpus(CPUS))
    assert _cpus(report["replica"]) == [CPUS]
    assert _cpus(report["scheduler"]) == [CPUS]


@needs_two_cores
def test_nothing_moves_outside_slimserve_serve() -> None:
    """Without the engines' cores named (an engine in a benchmark's or a test's process), a
    replica leaves its processes where they are, bound engine or not."""
    report = _run(REPLICA, format_cpus(BOUND), engine_cpus=None)
    assert _cpus(report["replica"]) == [CPUS]
    assert _cpus(report["scheduler"]) == [CPUS]


@needs_two_cores
def test_ray_processes_join_the_replicas_that_moved_and_engines_keep_every_core() -> None:
    report = _run(DRIVER, format_cpus(BOUND), format_cpus(FREE), engine_cpus=format_cpus(CPUS))
    assert _cpus(report["driver"]) == [FREE]
    assert _cpus(report["ray"]) == [FREE]
    assert _cpus(report["replica"]) == [FREE]  # as it placed itself
    assert _cpus(report["engine"]) == [CPUS]  # a variant's engine process is not Ray's


@needs_two_cores
def test_ray_processes_stay_where_no_replica_moved() -> None:
    report = _run(DRIVER, format_cpus(BOUND), "", engine_cpus=format_cpus(CPUS))
    assert {name: _cpus(cpus) for name, cpus in report.items()} == {
        name: [CPUS] for name in ("driver", "ray", "replica", "engine")
    }


@needs_two_cores
def test_a_replica_claims_the_engines_cores_back() -> None:
    """A replica forked from a process on the serving cores computes on the node's cores."""
    code = (
        "import os\n"
        "from slimserve.serve import cpu_placement\n"
        f"os.sched_setaffinity(0, {set(FREE)!r})\n"
        "cpu_placement.claim_engine_cpus()\n"
        "print(sorted(os.sched_getaffinity(0)))\n"
    )
    env = {**os.environ, ENGINE_CPUS_ENV: format_cpus(CPUS)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(done.stdout) == sorted(CPUS)


def test_publish_keeps_a_value_already_set(monkeypatch) -> None:
    monkeypatch.setenv(ENGINE_CPUS_ENV, format_cpus(BOUND))
    assert cpu_placement.publish_engine_cpus() == BOUND
    monkeypatch.delenv(ENGINE_CPUS_ENV)
    assert cpu_placement.publish_engine_cpus() == CPUS
    assert os.environ[ENGINE_CPUS_ENV] == format_cpus(CPUS)


def test_a_refused_move_is_logged_not_raised(caplog) -> None:
    """Cores the process may not have (none exists with this number) leave it where it was."""
    before = os.sched_getaffinity(0)
    with caplog.at_level("WARNING", logger="slimserve.serve.cpu_placement"):
        cpu_placement.move_process(os.getpid(), frozenset({max(CPUS) + 4096}))
    assert os.sched_getaffinity(0) == before
    assert "stays where it runs" in caplog.text
