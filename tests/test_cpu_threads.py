"""The torch thread count is the free cores: busy cores (load or running processes) and accelerate's local processes
share the CPU; OMP_NUM_THREADS set by the user is left alone."""

from __future__ import annotations

import pytest
import torch

from histosynth import cpu_threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("looks,local,expected", [
    ([0, 0, 0, 0, 0], None, 2),   # idle: both cores
    ([1, 1, 0, 1, 1], None, 1),   # another job on one core
    ([0, 3, 0, 0, 2], None, 2),   # short blips (a shell, a cron job) are not jobs
    ([3, 3, 3, 3, 3], None, 1),   # all busy: still one
    ([0, 0, 0, 0, 0], "2", 1),    # two processes of one accelerate launch share the two cores
])
def test_threads_are_the_free_cores(two_cores, looks, local, expected):
    seen = iter(looks)
    two_cores.setattr(cpu_threads, "running_others", lambda: next(seen))
    two_cores.setattr(cpu_threads.os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # our own past work: ignored
    if local:
        two_cores.setenv("LOCAL_WORLD_SIZE", local)
    lines = []
    assert cpu_threads.configure_cpu_threads(lines.append) == expected == torch.get_num_threads()
    busy = sorted(looks)[2]
    assert lines == [f"torch CPU threads: {expected} of 2 cores ({busy:.1f} busy with other work; set "
                     "OMP_NUM_THREADS to choose)"]


def test_running_others_excludes_this_process(monkeypatch, tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.93 1.10 0.61 3/412 12345\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(loadavg if f == "/proc/loadavg" else f, *a, **k))
    assert cpu_threads.running_others() == 2


def test_omp_num_threads_wins(two_cores):
    two_cores.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    two_cores.setattr(cpu_threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    lines = []
    assert cpu_threads.configure_cpu_threads(lines.append) == 1 and lines == ["torch CPU threads: 1 (OMP_NUM_THREADS)"]


def test_a_process_limited_to_some_cores_of_a_busy_host_takes_its_cores(two_cores):
    """In a container (cpuset) on a 64-core host, the host's 30 running tasks run elsewhere: both of ours are free."""
    two_cores.setattr(cpu_threads.os, "cpu_count", lambda: 64)
    two_cores.setattr(cpu_threads, "running_others", lambda: 30)
    assert cpu_threads.configure_cpu_threads(lambda line: None) == 2


@pytest.mark.parametrize("recorded,omp,cores,expected,said", [
    (2, None, 2, 2, "torch CPU threads: 2, the run's own, so that the resume is exact (set OMP_NUM_THREADS to choose)"),
    (1, None, 2, 1, None),  # already the run's count: nothing to say
    (None, None, 2, 1, None),  # a checkpoint from before the count was kept
    (2, "1", 2, 1, "torch CPU threads: 1 (OMP_NUM_THREADS); the run trained on 2, so the losses after the resume may "
                   "differ from an uninterrupted run's in their last digits (OMP_NUM_THREADS=2 makes the resume "
                   "exact)"),
    (4, None, 2, 1, "torch CPU threads: 1, this process may use only 2 cores; the run trained on 4, so the losses "
                    "after the resume may differ from an uninterrupted run's in their last digits"),
    (4, None, 4, 4, "torch CPU threads: 4, the run's own, so that the resume is exact (set OMP_NUM_THREADS to choose)"),
])
def test_a_resume_trains_on_the_run_s_thread_count(two_cores, recorded, omp, cores, expected, said):
    torch.set_num_threads(1)
    two_cores.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(cores)))
    if omp:
        two_cores.setenv("OMP_NUM_THREADS", omp)
    lines = []
    assert cpu_threads.resume_threads(recorded, lines.append) == expected == torch.get_num_threads()
    assert lines == ([said] if said else [])
