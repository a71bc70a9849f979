"""How many CPU threads torch uses: the cores actually free, not all of them.

On a shared CPU, torch's default (one thread per core) oversubscribes: two torch processes with two threads each on
two cores ran ten times slower than with one each (docs/benchmarks.md). So the commands that compute (train, sample,
quickstart) start by counting the cores this process may use (its affinity) minus those busy with other work (the
tasks running right now besides this one, the median of a few looks 20 ms apart), shared among the processes of one
``accelerate launch``, at least one, and say so in one line. When this process may use only some of the host's cores
(a container's cpuset, taskset), the host-wide count says nothing about those cores and they are all taken. Not the
load average: it counts this process's own recent work (the previous command of a script, the test run itself) as
another job and halved the threads. ``OMP_NUM_THREADS`` set by the user wins and is left alone.

A resumed training run is the exception (:func:`resume_threads`): it trains on the thread count its checkpoint was
written with, because torch splits its reductions by thread and another count changes the last bits of the losses.
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def running_others() -> int:
    """Processes running right now besides this one ("running/total" of /proc/loadavg; 0 where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0


def free_cores() -> tuple[int, int, float]:
    """(free cores ≥ 1 for this process, usable cores, busy cores) of this process's CPU affinity; processes started
    together by ``accelerate launch`` (LOCAL_WORLD_SIZE) share the free cores."""
    cores = _usable_cores()
    # the running count is the whole host's: it says how busy our cores are only when they are all the host's cores
    # (in a container or under taskset limited to some cores, the others' work is elsewhere: take ours as free)
    host = os.cpu_count() or cores
    busy = float(statistics.median(_looks(running_others, 5, 0.02))) if cores >= host else 0.0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(cores, round(cores - busy)) // local_processes), cores, busy


def _usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's cpuset, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _looks(read, n: int, pause_s: float) -> list[int]:
    values = []
    for i in range(n):
        values.append(read())
        if i < n - 1:
            time.sleep(pause_s)
    return values


def configure_cpu_threads(echo=None) -> int:
    """Set torch's intra-op threads to the free cores (unless ``OMP_NUM_THREADS`` is set) and say so through
    ``echo(line)`` (default: stderr). Returns the thread count in use. Call before heavy work starts."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        threads, line = torch.get_num_threads(), f"torch CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    else:
        threads, cores, busy = free_cores()
        torch.set_num_threads(threads)
        line = (f"torch CPU threads: {threads} of {cores} cores ({busy:.1f} busy with other work; set "
                f"OMP_NUM_THREADS to choose)")
    (echo or _stderr)(line)
    return threads


def resume_threads(recorded: int | None, echo=None) -> int:
    """Set torch's intra-op threads to ``recorded``, the count a resumed run's checkpoint was trained with, so that the
    resume is exact: torch splits its reductions among threads, and another count changed the losses of a tiny NASDM
    in the 7th decimal from the 4th step (docs/architecture.md, "Exact resume"). ``OMP_NUM_THREADS`` set by the user
    wins, and more threads than this process's usable cores are not taken; both are said through ``echo(line)``
    (default: stderr), with the cost. ``recorded`` None (a checkpoint from before the count was kept) changes nothing.
    ``accelerate launch`` sets ``OMP_NUM_THREADS`` for its processes, so they keep its count. Returns the thread count
    in use."""
    import torch

    now = torch.get_num_threads()
    if recorded is None or recorded == now:
        return now
    say = echo or _stderr
    inexact = (f"the run trained on {recorded}, so the losses after the resume may differ from an uninterrupted "
               f"run's in their last digits")
    cores = _usable_cores()
    if os.environ.get("OMP_NUM_THREADS"):
        say(f"torch CPU threads: {now} (OMP_NUM_THREADS); {inexact} (OMP_NUM_THREADS={recorded} makes the resume "
            "exact)")
    elif recorded > cores:
        say(f"torch CPU threads: {now}, this process may use only {cores} cores; {inexact}")
    else:
        torch.set_num_threads(recorded)
        say(f"torch CPU threads: {recorded}, the run's own, so that the resume is exact (set OMP_NUM_THREADS to "
            "choose)")
        return recorded
    return now
