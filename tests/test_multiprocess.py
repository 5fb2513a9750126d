"""Two processes on the CPU give the run that one process gives with the same global batch.

Samples are drawn by their index in the epoch (ddpo/trainer.py: sample k of process p is sample
p * n + k), so 2 processes x 1 batch of 2 see exactly the prompts and noise of 1 process x 2 batches
of 2. Epoch 0 is the same arithmetic in both runs (same weights, same per-sample batches of 2), so
its rewards match exactly. With one optimizer step per epoch the averaged gradient of the two
half-batches equals the full-batch gradient up to float reassociation (last bits), so later epochs
and the trained weights match to float tolerance; a process that trained on its own half of the
samples (rewards, advantages or gradients not synchronised) would differ by about the whole update.
The reward is smooth in the pixels (mean brightness), so float-level weight differences stay
float-level reward differences (a JPEG size can jump by a byte). Both ways of starting 2 processes are
run: ``accelerate launch`` (CPU forced) and a 2-task submitit job.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_cli
from tests.scale_out import epochs, failure_report, free_port, multirun, subprocess_env

# full fine-tuning (its starting weights are fixed by the tiny model's seed), no per-prompt tracking
# (so every sample counts), one optimizer step per epoch, a checkpoint after every epoch
COMMON = [
    "model=tiny",
    "logger=none",
    "mixed_precision=no",
    "use_lora=false",
    "sample.num_steps=3",
    "sample.batch_size=2",
    "num_epochs=2",
    "save_freq=1",
    "per_prompt_stat_tracking.enabled=false",
    "reward._target_=tests.fixtures.smooth_rewards.MeanBrightness",
]
ONE_PROCESS = [*COMMON, "sample.num_batches_per_epoch=2", "train.batch_size=4"]
PER_PROCESS_OF_TWO = [*COMMON, "sample.num_batches_per_epoch=1", "train.batch_size=2"]
# the same number of threads in every process makes the float arithmetic the same
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 300  # a hang at a checkpoint save ends the test here


def unet_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a).sqrt().item()


# GRPO with one group of 4 spanning both processes: its advantages need every process's rewards
# NFT too: its forward-process noise follows each sample's seed, not the process's random state
# DRaFT samples and steps batch by batch: one optimizer step over both processes' batches is one
# process's two batches accumulated; its gradients are averaged over processes by the loop itself
ALGORITHMS = {
    "ddpo": [],
    "grpo": ["algorithm=grpo", "algorithm.group_size=4"],
    "nft": ["algorithm=nft", "algorithm.group_size=4"],
    "draft": ["algorithm=draft", "algorithm.grad_steps=2"],
}
ONE_PROCESS_ONLY = {
    "draft": ["train.gradient_accumulation_steps=2", "train.batch_size=2"]
}  # what one process needs besides


# only ddpo's two runs are in the fast suite, to keep it inside CI's budget; grpo, nft and draft run with -m slow
@pytest.fixture(
    scope="module", params=[k if k == "ddpo" else pytest.param(k, marks=pytest.mark.slow) for k in ALGORITHMS]
)
def algorithm(request):
    return ALGORITHMS[request.param]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, algorithm):
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    name = next(key for key, value in ALGORITHMS.items() if value == algorithm)
    overrides = [*ONE_PROCESS, *algorithm, *ONE_PROCESS_ONLY.get(name, [])]
    result = run_cli(run_dir, overrides, env=ENV, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 1;" in (run_dir / "train.log").read_text()
    return run_dir


@pytest.fixture(scope="module")
def initial_weights():
    from ddpo.models import tiny_model

    return {k: v.detach().float().clone() for k, v in tiny_model().unet.state_dict().items()}


def assert_same_run(two_dir, one_dir, initial):
    log = (two_dir / "train.log").read_text()
    assert "world size 2;" in log, f"the run did not have 2 processes:\n{log}"
    for checkpoint in sorted((two_dir / "checkpoints").iterdir()):
        assert (checkpoint / "random_states_1.pkl").exists(), "rank 1 did not take part in save_state"
    assert epochs(two_dir) == epochs(one_dir) == [0, 1]
    for two, one in zip(read_metrics(two_dir), read_metrics(one_dir)):
        assert two["num_samples"] == one["num_samples"] == 4
        assert two["global_step"] == one["global_step"]
        for key in ("reward_mean", "reward_std"):
            if one["epoch"] == 0:  # identical arithmetic: identical numbers
                assert two[key] == one[key], key
            else:  # weights equal to float32 rounding (~1e-7 relative): brightness equal to ~1e-6
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    one_weights, two_weights = unet_weights(one_dir), unet_weights(two_dir)
    update = distance(one_weights, initial)
    assert update > 0
    # a process training on its own half of the samples would differ by about the update itself
    assert distance(two_weights, one_weights) < 1e-2 * update


def test_accelerate_launch_two_cpu_processes_match_one_process(tmp_path, algorithm, one_process_run, initial_weights):
    # each rank resolves ${now:} itself: the ranks' directories differ, and the run must use rank 0's
    runs = tmp_path / "runs"
    # ACCELERATE_USE_CPU + --multi_gpu is what starts a real 2-process gloo run without GPUs
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "train.py"),
        *PER_PROCESS_OF_TWO,
        *algorithm,
        f"hydra.run.dir={runs}/${{now:%H-%M-%S-%f}}",
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(ACCELERATE_USE_CPU="true", **ENV),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    run_dirs = list(runs.iterdir())
    assert len(run_dirs) == 1, f"rank 1 left its own Hydra directory: {run_dirs}"
    assert_same_run(run_dirs[0], one_process_run, initial_weights)
    log = (run_dirs[0] / "train.log").read_text()
    assert log.count("world size 2;") == 1, "only rank 0 logs"
    if algorithm[:1] in (["algorithm=grpo"], ["algorithm=nft"]):  # one group across both processes
        assert "1 prompts x 4 samples (" in log


def test_two_task_submitit_job_matches_one_process(tmp_path, algorithm, one_process_run, initial_weights):
    sweep = tmp_path / "sweep"
    result = multirun(
        sweep,
        [
            "launcher=local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            *PER_PROCESS_OF_TWO,
            *algorithm,
        ],
        env=subprocess_env(**ENV),
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, failure_report(result, sweep)
    assert_same_run(sweep / "0", one_process_run, initial_weights)
    assert len(list(sweep.glob(".submitit/*/*_1_log.err"))) == 1, "the job did not have a second task"
