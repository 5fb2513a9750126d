"""Several processes, one run: torch.distributed from a submitit job, and one output directory.

A multi-process run starts in one of two ways; both end in the same accelerate state:

- ``accelerate launch --num_processes N train.py ...`` (or torchrun): the launcher exports RANK,
  WORLD_SIZE, MASTER_ADDR, ... for every process.
- a submitit job with several tasks (``launcher=slurm hydra.launcher.tasks_per_node=N``, one task
  per GPU): SLURM, or submitit's local controller, starts the N tasks, and ``init_from_submitit``
  exports the same variables from the job's environment before accelerate starts. Such a job is
  never wrapped in torchrun or ``accelerate launch``.

Every process runs Hydra's ``@hydra.main``, so each has its own Hydra output directory and log
file; ``share_main_output`` makes the other ranks follow rank 0's.
"""

import logging
import os
import shutil

_DIST_VARIABLES = ("RANK", "WORLD_SIZE")


def any_rank(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (collective: call it on every rank)."""
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.gather(value).max()
    return bool(value.item())


def init_from_submitit() -> bool:
    """Inside a submitit job with more than one task, export torch.distributed's ``env://`` variables.

    Returns whether it did. Does nothing outside submitit, in a one-task job, or where a launcher
    already set RANK and WORLD_SIZE. On a machine without CUDA it also forces accelerate onto the
    CPU (gloo), since accelerate otherwise starts each task as a 1-process run.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or all(v in os.environ for v in _DIST_VARIABLES):
        return False
    import submitit

    try:
        job = submitit.JobEnvironment()
    except Exception:  # not inside a running submitit job after all
        return False
    if job.num_tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES is left alone: accelerate picks GPU (local rank % visible GPUs), which is
    # right whether SLURM shows each task all of the node's GPUs or only its own.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    logging.getLogger(__name__).info(
        "torch.distributed from the submitit job: rank %s of %s, master %s:%s",
        os.environ["RANK"],
        os.environ["WORLD_SIZE"],
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    return True


def share_main_output(own_dir: str, run_dir: str, process_index: int) -> None:
    """Ranks > 0: log warnings and errors only, into rank 0's log; drop their own Hydra directory.

    ``own_dir`` is the Hydra output directory of this process, ``run_dir`` rank 0's (where the run
    writes). Under ``accelerate launch`` the two differ (``${now:}`` is resolved by each process),
    and the other ranks' directory, holding only ``.hydra/`` and an empty log, is removed.
    """
    if process_index == 0:
        return
    own_dir, run_dir = os.path.abspath(own_dir), os.path.abspath(run_dir)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and own_dir != run_dir
            and os.path.dirname(handler.baseFilename) == own_dir
        ):
            moved = logging.FileHandler(os.path.join(run_dir, os.path.basename(handler.baseFilename)), delay=True)
            moved.setFormatter(handler.formatter)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
            handler = moved
        handler.setLevel(max(handler.level, logging.WARNING))
    if own_dir != run_dir:
        _remove_hydra_only_dir(own_dir)


def _remove_hydra_only_dir(path: str) -> None:
    """Remove ``path`` if it holds nothing but Hydra's ``.hydra/`` and empty ``*.log`` files."""
    try:
        entries = os.listdir(path)
    except OSError:
        return
    for name in entries:
        full = os.path.join(path, name)
        if name == ".hydra" and os.path.isdir(full):
            continue
        if name.endswith(".log") and os.path.isfile(full) and os.path.getsize(full) == 0:
            continue
        return
    shutil.rmtree(path, ignore_errors=True)
