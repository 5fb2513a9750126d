"""Preemption: the signal is answered at the end of the epoch with a checkpoint, then the job is
requeued and resumes; every epoch is in metrics.jsonl exactly once.

The guard is tested in this process; the whole path runs under submitit's local executor (which
requeues a job in place) and, marked slow, on a one-node SLURM cluster started by
scripts/local_slurm.sh.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddpo.preemption import PreemptionGuard, preemption_signal
from tests.conftest import ROOT
from tests.scale_out import children, epochs, kill_tree, multirun, subprocess_env, wait_for

CPU = SimpleNamespace(num_processes=1, device="cpu")
SIG = signal.SIGUSR2


@pytest.fixture
def previous_handler():
    """A recording USR2 handler standing in for submitit's; restored afterwards."""
    calls = []
    old = signal.signal(SIG, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(SIG, old)


def _deliver(signum=SIG):
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread


def test_signal_is_deferred_to_the_epoch_boundary(previous_handler):
    guard = PreemptionGuard(grace_s=60).install()
    try:
        assert not guard.requested(CPU)
        _deliver()
        assert previous_handler == [], "the previous handler must wait for the checkpoint"
        assert guard.requested(CPU)
        with pytest.raises(SystemExit):
            guard.hand_over()
        assert previous_handler == [SIG], "after the checkpoint the previous handler (submitit's requeue) runs"
        assert signal.getsignal(SIG) is not guard._handle, "the guard is gone after handing over"
    finally:
        guard.uninstall()


def test_uninstall_restores_the_previous_handler(previous_handler):
    before = signal.getsignal(SIG)
    with PreemptionGuard(grace_s=60) as guard:
        assert signal.getsignal(SIG) == guard._handle
    assert signal.getsignal(SIG) is before
    _deliver()
    assert previous_handler == [SIG]


def test_epoch_that_outlasts_the_grace_period_hands_over_anyway(previous_handler):
    with PreemptionGuard(grace_s=0.3):
        _deliver()
        assert previous_handler == []
        deadline = time.monotonic() + 10
        while not previous_handler and time.monotonic() < deadline:
            time.sleep(0.05)  # an epoch that does not end
    assert previous_handler == [SIG], "the job must still be requeued before SLURM kills it"


def test_ignored_signal_stays_ignored():
    old = signal.signal(SIG, signal.SIG_IGN)
    try:
        with PreemptionGuard(grace_s=60):
            assert signal.getsignal(SIG) == signal.SIG_IGN
    finally:
        signal.signal(SIG, old)


def test_signal_follows_submitit_setting(monkeypatch):
    assert preemption_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption_signal() == signal.SIGUSR1


# -- the whole path ------------------------------------------------------------------------------
NUM_EPOCHS = 8
# save_freq larger than where the signal lands, so that resuming needs the preemption checkpoint
PREEMPTIBLE = [
    "model=tiny",
    "logger=none",
    "mixed_precision=no",
    "sample.num_steps=4",
    "sample.batch_size=2",
    "sample.num_batches_per_epoch=2",
    "train.batch_size=2",
    f"num_epochs={NUM_EPOCHS}",
    "save_freq=5",
]


def assert_resumed_once(run_dir):
    log = (Path(run_dir) / "train.log").read_text()
    assert epochs(run_dir) == list(range(NUM_EPOCHS)), f"every epoch exactly once:\n{log[-3000:]}"
    assert "checkpoint saved after SIGUSR2" in log, log[-3000:]
    assert log.count("resumed from") == 1, log[-3000:]


def _job_ids(sweep, count: int, pattern: str):
    """The ids of the sweep's jobs (``.submitit/<job id>/``) once there are ``count``, in job order."""
    root = Path(sweep) / ".submitit"
    found = (
        sorted(p.name for p in root.glob("*") if p.is_dir() and re.fullmatch(pattern, p.name)) if root.is_dir() else []
    )
    return sorted(found, key=lambda name: [int(part) for part in name.split("_")]) if len(found) >= count else None


def _global_rank(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"SUBMITIT_LOCAL_GLOBALID=")).split(b"=")[1])


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param([], id="ddpo"),
        # slow (CI's budget): the same protocol with another algorithm's state
        pytest.param(
            ["algorithm=grpo", "algorithm.group_size=4", "algorithm.kl_coef=1.0"], id="grpo-kl", marks=pytest.mark.slow
        ),
    ],
)
def test_two_task_local_job_checkpoints_when_one_rank_is_signalled_and_resumes(tmp_path, algorithm):
    """Only rank 1 gets the signal: the ranks agree at the epoch end, both save, rank 0 requeues."""
    sweep = tmp_path / "sweep"
    launcher = multirun(
        sweep,
        [
            "launcher=local",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.tasks_per_node=2",
            *PREEMPTIBLE,
            *algorithm,
        ],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        wait=False,
    )
    try:
        wait_for(lambda: len(epochs(sweep / "0")) >= 2, 240, "2 epochs of the job", process=launcher)
        assert len(epochs(sweep / "0")) <= NUM_EPOCHS - 3, "the job ran too fast to be preempted in the middle"
        controller = int(_job_ids(sweep, 1, r"\d+")[0])  # a local job's id is its controller's pid
        tasks = {_global_rank(pid): pid for pid in children(controller)}
        assert sorted(tasks) == [0, 1]
        os.kill(tasks[1], SIG)
        launcher.wait(timeout=240)
    finally:
        kill_tree(launcher)
    assert launcher.returncode == 0, (tmp_path / "sweep.launcher.log").read_text()[-3000:]
    assert_resumed_once(sweep / "0")
    log = (sweep / "0" / "train.log").read_text()
    assert log.count("world size 2;") == 2, "the run and its resumption had 2 processes"
    checkpoint = sorted((sweep / "0" / "checkpoints").iterdir())[0]
    assert (checkpoint / "random_states_1.pkl").exists()


# -- on a SLURM cluster ----------------------------------------------------------------------------
LOCAL_SLURM = ROOT / "scripts" / "local_slurm.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running SLURM cluster: this machine's, or the one-node cluster of scripts/local_slurm.sh."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get, slurmctld/slurmd as root)")
    if not shutil.which("bash"):
        pytest.skip("no bash")
    already_up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not already_up:
        started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=900)
        if started.returncode == 2:
            pytest.skip(started.stderr.strip() or "scripts/local_slurm.sh cannot run here")
        assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not already_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_slurm_sweep_jobs_resume_after_preemption_and_requeue(tmp_path, slurm_cluster):
    sweep = tmp_path / "sweep"
    launcher = multirun(
        sweep,
        [
            "launcher=slurm",
            "reward=jpeg_compressibility,jpeg_incompressibility",
            *PREEMPTIBLE,
            # what a CPU-only one-node cluster has
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.mem_gb=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20",
        ],
        wait=False,
    )
    job_ids = None
    try:
        # array task ids <array>_<k> (the folder named <array> alone holds the submission)
        job_ids = wait_for(lambda: _job_ids(sweep, 2, r"\d+_\d+"), 120, "the job array", process=launcher)
        for job_id, run in zip(job_ids, ("0", "1")):
            wait_for(lambda run=run: len(epochs(sweep / run)) >= 2, 300, f"2 epochs of job {run}", process=launcher)
            done = len(epochs(sweep / run))
            assert done <= NUM_EPOCHS - 3, "the job ran too fast to be preempted in the middle"
            # what SLURM does before a time limit or on preemption: USR2 to every task of the job
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        launcher.wait(timeout=600)
    finally:
        kill_tree(launcher)
        if job_ids:  # nothing left of this sweep on the cluster (a no-op when it finished)
            subprocess.run(["scancel", job_ids[0].split("_")[0]], capture_output=True)
    assert launcher.returncode == 0, (tmp_path / "sweep.launcher.log").read_text()[-3000:]
    for run in ("0", "1"):
        assert_resumed_once(sweep / run)


@pytest.mark.slow
def test_slurm_two_task_job_is_one_run_with_world_size_2(tmp_path, slurm_cluster):
    sweep = tmp_path / "sweep"
    result = multirun(
        sweep,
        [
            "launcher=slurm",
            *(o for o in PREEMPTIBLE if not o.startswith("num_epochs=")),
            "num_epochs=2",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.mem_gb=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20",
        ],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    assert "world size 2;" in log and "rank 1 of 2" in log, log[-3000:]
    assert epochs(sweep / "0") == [0, 1]
