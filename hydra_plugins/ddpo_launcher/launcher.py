"""launcher=local: a sweep's jobs as local submitit processes, each in a slot of its own GPUs and cores.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace package; this directory is
part of it because train.py's directory, the repository root, is on sys.path (keep
``hydra_plugins/`` without an ``__init__.py``). The jobs themselves run the submitit plugin's
LocalLauncher, so a job's process needs nothing from here; it gets the repository root on its
PYTHONPATH, so that it imports ddpo whatever directory the sweep was started from.
"""

import logging
import os
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]  # holds ddpo/ and rewards/, which every job imports


class SlottedLocalLauncher(LocalLauncher):
    """submitit's LocalLauncher, except that job k runs in a slot of its own (``ddpo/resources.py``).

    submitit starts every job at once and shows each the same GPUs (0..gpus_per_node-1); here a
    job gets its own GPUs and a share of the cores, and waits while every slot is busy.
    """

    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        from ddpo.resources import plan_slots, run_in_slots, submit_in_slot, visible_gpus

        params = self.params
        gpus_per_node = params.get("gpus_per_node")
        slots = plan_slots(
            len(job_overrides),
            visible_gpus() if gpus_per_node else [],
            gpus_per_node,
            len(os.sched_getaffinity(0)),
            params.get("cpus_per_task"),
            params.get("tasks_per_node"),
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "Submitit 'local' sweep output dir : %s (%d job(s), at most %d at once)",
            sweep_dir,
            len(job_overrides),
            len(slots),
        )

        executor = submitit.LocalExecutor(folder=params["submitit_folder"])
        executor.update_parameters(
            **{
                key: params[key]
                for key in ("timeout_min", "tasks_per_node", "nodes", "stderr_to_stdout")
                if params.get(key) is not None
            }
        )
        # what each job unpickles and runs: the plugin's own class, importable wherever the job runs
        runner = LocalLauncher(**params)
        runner.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)

        def start(slot, job):
            overrides, num, singletons = job
            log.info(
                "\t#%d : %s (GPUs %s, %d thread(s) per process)",
                num,
                " ".join(filter_overrides(overrides)),
                ",".join(map(str, slot.gpus)) or "none",
                slot.threads,
            )
            return submit_in_slot(
                executor,
                slot,
                runner,
                list(overrides),
                "hydra.sweep.dir",
                num,
                f"job_id_for_{num}",
                singletons,
                pythonpath=str(REPO_ROOT),
            )

        jobs = [(overrides, initial_job_idx + k, Singleton.get_state()) for k, overrides in enumerate(job_overrides)]
        return [job.results()[0] for job in run_in_slots(slots, jobs, start)]
