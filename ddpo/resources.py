"""What each job of a sweep gets: GPUs of its own and its share of the CPU cores.

``launcher=local`` (``hydra_plugins/ddpo_launcher``) runs a sweep's jobs in slots. On a machine
with GPUs a slot is ``gpus_per_node`` GPUs that no other slot has; without GPUs a slot is a share
of the cores. A job starts when a slot is free, so no more jobs run at once than there are slots.
The launcher gives each job's process its slot's CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS /
MKL_NUM_THREADS before it starts (so before CUDA or OpenMP initialise); ``limit_threads``, the
first thing a job does, applies the thread count to torch and logs what the job got. In a SLURM
job it takes the count from SLURM_CPUS_PER_TASK instead.
"""

import logging
import os
import time
from dataclasses import dataclass

from ddpo.errors import ConfigError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    gpus: tuple[int, ...]  # the job's CUDA_VISIBLE_DEVICES; () runs it on the CPU
    threads: int  # torch / OpenMP threads of each process of the job


def plan_slots(num_jobs: int, gpus, gpus_per_node, cores: int, cpus_per_task=None, tasks_per_node=1) -> list[Slot]:
    """The slots of a local sweep of ``num_jobs`` jobs: one job runs in each at a time.

    ``gpus`` are the indices of the GPUs the sweep may use. With GPUs and ``gpus_per_node`` > 0,
    slot k holds GPUs k*n .. k*n+n-1; otherwise jobs run on the CPU, as many at once as each
    process can have ``cpus_per_task`` cores (one if unset). The ``cores`` are split evenly between
    the processes running at once unless ``cpus_per_task`` says how many each process gets.
    """
    tasks = max(1, tasks_per_node or 1)
    if gpus and gpus_per_node:
        if gpus_per_node > len(gpus):
            raise ConfigError(
                f"hydra.launcher.gpus_per_node={gpus_per_node}, but this machine shows {len(gpus)} GPU(s)"
            )
        count = max(1, min(num_jobs, len(gpus) // gpus_per_node))
        devices = [tuple(gpus[k * gpus_per_node : (k + 1) * gpus_per_node]) for k in range(count)]
    else:
        count = max(1, min(num_jobs, cores // ((cpus_per_task or 1) * tasks)))
        devices = [()] * count
    threads = cpus_per_task or max(1, cores // (count * tasks))
    return [Slot(gpus=device, threads=threads) for device in devices]


def visible_gpus(environ=os.environ) -> list[int]:
    """Indices of the GPUs this process may hand out: CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    import torch  # counts through NVML where it can; the launcher's process never uses a GPU itself

    count = torch.cuda.device_count()
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    names = [name.strip() for name in listed.split(",") if name.strip()][:count]
    if not all(name.isdigit() for name in names):
        raise ConfigError(f"launcher=local needs CUDA_VISIBLE_DEVICES as GPU indices (got {listed!r})")
    return [int(name) for name in names]


def run_in_slots(slots: list[Slot], jobs, start, poll_s: float = 1.0) -> list:
    """``start(slot, job)`` for every job in order, one job per slot at a time; returns what start returned.

    ``start`` returns a handle with ``done()``; a job waits until some slot's previous job is done.
    Returns once the last job has started (the last ones may still run).
    """
    started, running = [], {}  # running: slot index -> handle of its job
    for job in jobs:
        while (free := next((k for k in range(len(slots)) if k not in running or running[k].done()), None)) is None:
            time.sleep(poll_s)
        running[free] = start(slots[free], job)
        started.append(running[free])
    return started


def submit_in_slot(executor, slot: Slot, fn, *args, pythonpath: str | None = None):
    """Submit ``fn(*args)`` to a submitit LocalExecutor as a job on ``slot``'s GPUs and threads.

    ``pythonpath`` goes first on the job's PYTHONPATH: the job's process starts in this process's
    working directory, from where it could not import ddpo otherwise.
    """
    # submitit sets the job's CUDA_VISIBLE_DEVICES to visible_gpus[:gpus_per_node] ("" with none)
    executor.update_parameters(gpus_per_node=len(slot.gpus), visible_gpus=slot.gpus)
    exported = {name: str(slot.threads) for name in THREAD_VARIABLES}
    if pythonpath:
        exported["PYTHONPATH"] = os.pathsep.join(filter(None, (pythonpath, os.environ.get("PYTHONPATH"))))
    saved = {name: os.environ.get(name) for name in exported}
    os.environ.update(exported)  # the job's process inherits this process's environment
    try:
        return executor.submit(fn, *args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def job_threads(environ=os.environ) -> tuple[int, str] | None:
    """Threads per process of this job and the variable that says so; None leaves torch's default."""
    if environ.get("SUBMITIT_EXECUTOR") == "local" and environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS from launcher=local"
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    return None


def limit_threads(environ=os.environ) -> int | None:
    """First thing in a sweep or SLURM job: torch and OpenMP get this job's threads; one log line says what."""
    found = job_threads(environ)
    if found is None:
        return None
    threads, source = found
    # read when torch loads: they also cover OpenMP/MKL if torch is not imported yet in this process
    environ.update({name: str(threads) for name in THREAD_VARIABLES})
    import torch

    torch.set_num_threads(threads)
    rank = environ.get("RANK") or environ.get("SUBMITIT_LOCAL_GLOBALID") or environ.get("SLURM_PROCID") or "0"
    if rank == "0":  # one line per job, not per process
        gpus = environ.get("CUDA_VISIBLE_DEVICES")
        log.info(
            "job resources: GPUs %s, %d torch thread(s) per process (%s)",
            "all" if gpus is None else gpus or "none (CPU)",
            threads,
            source,
        )
    return threads
