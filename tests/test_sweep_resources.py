"""launcher=local gives each job its own GPUs and a share of the cores (ddpo/resources.py); SLURM jobs
honour cpus_per_task. GPUs are faked: slots are planned from a list of indices, and a job's
CUDA_VISIBLE_DEVICES is only an environment variable until torch reads it."""

import os
import re

import pytest
import submitit

from ddpo.errors import ConfigError
from ddpo.resources import Slot, job_threads, limit_threads, plan_slots, run_in_slots, submit_in_slot
from tests.conftest import ROOT, TINY
from tests.scale_out import failure_report, multirun, subprocess_env


def test_four_jobs_on_four_gpus_each_get_their_own_gpu():
    slots = plan_slots(4, gpus=[0, 1, 2, 3], gpus_per_node=1, cores=16)
    assert [slot.gpus for slot in slots] == [(0,), (1,), (2,), (3,)]
    assert {slot.threads for slot in slots} == {4}  # 16 cores for 4 jobs at once


def test_gpus_per_node_splits_the_gpus_the_sweep_may_use():
    assert [s.gpus for s in plan_slots(4, [0, 1, 2, 3], gpus_per_node=2, cores=8)] == [(0, 1), (2, 3)]
    # CUDA_VISIBLE_DEVICES=2,3 before the sweep: the jobs get GPUs 2 and 3, not 0 and 1
    assert [s.gpus for s in plan_slots(2, [2, 3], gpus_per_node=1, cores=8)] == [(2,), (3,)]
    assert [s.gpus for s in plan_slots(1, [0, 1, 2, 3], gpus_per_node=1, cores=8)] == [(0,)]
    with pytest.raises(ConfigError, match="gpus_per_node=2, but this machine shows 1 GPU"):
        plan_slots(2, [0], gpus_per_node=2, cores=8)


def test_cpu_only_machine_splits_the_cores_between_jobs_running_at_once():
    assert plan_slots(2, gpus=[], gpus_per_node=1, cores=2) == [Slot((), 1), Slot((), 1)]
    assert plan_slots(1, gpus=[], gpus_per_node=1, cores=2) == [Slot((), 2)]
    assert plan_slots(4, gpus=[], gpus_per_node=1, cores=2) == [Slot((), 1)] * 2  # no more jobs than cores
    assert plan_slots(3, gpus=[0, 1], gpus_per_node=None, cores=8) == [Slot((), 2)] * 3  # GPUs not asked for
    assert plan_slots(1, gpus=[], gpus_per_node=1, cores=2, tasks_per_node=2) == [Slot((), 1)]  # 2 processes


def test_cpus_per_task_is_honoured():
    assert plan_slots(8, gpus=[], gpus_per_node=1, cores=8, cpus_per_task=2) == [Slot((), 2)] * 4
    assert plan_slots(2, gpus=[], gpus_per_node=1, cores=2, cpus_per_task=2) == [Slot((), 2)]  # one at a time
    assert {s.threads for s in plan_slots(4, [0, 1, 2, 3], gpus_per_node=1, cores=16, cpus_per_task=3)} == {3}


class _FakeJob:
    """A submitted job that is done after ``polls`` calls of done()."""

    def __init__(self, slot, polls):
        self.slot, self.polls = slot, polls

    def done(self):
        self.polls -= 1
        return self.polls < 0


def test_jobs_wait_for_a_free_slot_and_never_share_a_gpu():
    slots = plan_slots(4, gpus=[0, 1], gpus_per_node=1, cores=4)
    started = []

    def start(slot, job):
        running = [j for j in started if j.polls >= 0]
        assert len(running) < 2, "a third job started while both GPUs were busy"
        assert slot.gpus not in [j.slot.gpus for j in running], "two jobs at once on one GPU"
        started.append(_FakeJob(slot, polls=3))
        return started[-1]

    assert run_in_slots(slots, range(4), start, poll_s=0) == started
    assert [job.slot.gpus for job in started[:2]] == [(0,), (1,)]
    assert len(started) == 4 and {job.slot.gpus for job in started[2:]} <= {(0,), (1,)}


def _job_environment():
    names = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")
    return {name: os.environ.get(name) for name in names}


def test_a_submitted_job_sees_its_slots_gpus_and_threads(tmp_path):
    """A real submitit local job: CUDA_VISIBLE_DEVICES and the thread variables are set in its process."""
    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(timeout_min=2)
    before = dict(os.environ)
    # the job unpickles _job_environment from this module: pythonpath lets it import tests/
    on_gpu_3 = submit_in_slot(executor, Slot(gpus=(3,), threads=5), _job_environment, pythonpath=str(ROOT))
    on_cpu = submit_in_slot(executor, Slot(gpus=(), threads=1), _job_environment, pythonpath=str(ROOT))
    assert dict(os.environ) == before, "the launcher's own environment must not change"
    got = on_gpu_3.result()
    assert got.pop("PYTHONPATH").split(os.pathsep)[0] == str(ROOT)
    assert got == {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}
    got = on_cpu.result()
    assert (got["CUDA_VISIBLE_DEVICES"], got["OMP_NUM_THREADS"], got["MKL_NUM_THREADS"]) == ("", "1", "1")


def test_job_threads_come_from_the_local_launcher_or_slurm():
    local = {"SUBMITIT_EXECUTOR": "local", "OMP_NUM_THREADS": "3"}
    assert job_threads(local) == (3, "OMP_NUM_THREADS from launcher=local")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "64"}
    assert job_threads(slurm) == (8, "SLURM_CPUS_PER_TASK")
    assert job_threads({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "6"}) == (6, "SLURM_CPUS_PER_TASK")  # plain sbatch
    assert job_threads({"OMP_NUM_THREADS": "3"}) is None  # a run outside a job: torch reads OMP_NUM_THREADS itself
    assert job_threads({}) is None


def test_limit_threads_in_a_slurm_job_sets_torch_and_openmp(caplog):
    import torch

    environ = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "7",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_PROCID": "0",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="ddpo.resources"):
            assert limit_threads(environ) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1"
    assert "job resources: GPUs 0, 1 torch thread(s) per process (SLURM_CPUS_PER_TASK)" in caplog.text


def test_two_job_local_sweep_splits_the_cores(tmp_path):
    sweep = tmp_path / "sweep"
    # no GPU visible (as on this CPU-only machine, and on any other): the preset's gpus_per_node=1 runs on the CPU
    result = multirun(
        sweep,
        ["launcher=local", *TINY, "seed=0,1", "hydra.launcher.timeout_min=10"],
        env=subprocess_env(CUDA_VISIBLE_DEVICES=""),
        timeout=400,
    )
    assert result.returncode == 0, failure_report(result, sweep)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # 1 on a 2-core machine
    assert "(2 job(s), at most 2 at once)" in result.stdout + result.stderr
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        found = re.findall(r"job resources: GPUs (.*), (\d+) torch thread\(s\) per process", log)
        assert found == [("none (CPU)", str(threads))], log[-2000:]
