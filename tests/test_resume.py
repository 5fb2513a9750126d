"""Resuming: a run continues where its last checkpoint left it, exactly as if never stopped.

The loop derives all its noise from (seed, epoch, rank), and checkpoints hold the trained weights,
the optimizer, the epoch, the global step and the per-prompt reward buffers. So a stopped and
resumed run must reproduce an uninterrupted run's numbers. Two prompts and min_count=2 make the
advantages depend on the restored reward buffers from the second epoch on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from ddpo.checkpointing import TrainingState
from tests.conftest import TINY, read_metrics, run_in_process
from tests.fixtures.bad_rewards import SimulatedKill

TWO_PROMPTS = os.path.join(os.path.dirname(__file__), "fixtures", "two_prompts.txt")
RUN = [
    *TINY,
    "prompt=from_file",
    f"prompt.path={TWO_PROMPTS}",
    "per_prompt_stat_tracking.min_count=2",
    "per_prompt_stat_tracking.buffer_size=3",
]
N = 4  # epochs of the reference run


@pytest.fixture(scope="module")
def offline_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, offline_env):
    """An uninterrupted N-epoch run that keeps its 2 newest checkpoints."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(run_dir, [*RUN, f"num_epochs={N}", "checkpoints_total_limit=2"])
    return run_dir


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, offline_env):
    """The same run stopped (cleanly) after 2 of the N epochs."""
    run_dir = tmp_path_factory.mktemp("half") / "run"
    run_in_process(run_dir, [*RUN, "num_epochs=2"])
    return run_dir


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under ``directory`` (but the run's lock file)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, directory)] = (
                    os.stat(path).st_mtime_ns,
                    hashlib.sha256(handle.read()).hexdigest(),
                )
    return found


def assert_same_epochs(records, reference_records):
    """Per-epoch numbers of a resumed run equal those of the uninterrupted run (float tolerance)."""
    by_epoch = {r["epoch"]: r for r in reference_records}
    for record in records:
        ref = by_epoch[record["epoch"]]
        for key in ("global_step", "num_samples"):
            assert record[key] == ref[key], (record["epoch"], key)
        keys = (
            "reward_mean",
            "reward_std",
            "loss",
            "clipfrac",
            "approx_kl",
            "grad_norm",
            "x0_error",
            "old_distance",
            "mse",
            "kl_ema",
        )
        for key in (k for k in keys if k in ref or k in record):
            assert record[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), (record["epoch"], key)


def test_checkpoints_total_limit_keeps_newest(reference):
    records = read_metrics(reference)
    assert [r["epoch"] for r in records] == list(range(N))
    assert [r["global_step"] for r in records] == [2, 4, 6, 8]
    names = sorted(os.listdir(reference / "checkpoints"))
    assert names == [f"checkpoint_{N - 1:05d}", f"checkpoint_{N:05d}"]  # save_freq=1, limit 2
    states = [json.loads((reference / "checkpoints" / n / "ddpo_state.json").read_text()) for n in names]
    assert [(s["epochs_completed"], s["global_step"]) for s in states] == [(3, 6), (4, 8)]


def test_more_epochs_continue_the_same_run(reference, half_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(half_run, run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]

    run_in_process(run_dir, [*RUN, f"num_epochs={N}"])

    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(N)), "an epoch is missing or repeated"
    steps = [r["global_step"] for r in records]
    assert steps == sorted(steps) and len(set(steps)) == N
    assert_same_epochs(records, read_metrics(reference))
    # the tracker buffers were restored: the last checkpoints hold the same buffers as the reference's
    ours = json.loads((run_dir / "checkpoints" / f"checkpoint_{N:05d}" / "ddpo_state.json").read_text())
    ref = json.loads((reference / "checkpoints" / f"checkpoint_{N:05d}" / "ddpo_state.json").read_text())
    assert ours == ref and ours["algorithm"]["stat_tracker"]["buffers"]


def test_killed_after_a_checkpoint_resumes_without_gaps(reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # checkpoints after epochs 2 and 4; epoch index 2 is recorded, then the run dies in epoch 3
    # (reward calls 0-5 are epochs 0-2, two sampling batches each)
    killed = [
        *RUN,
        f"num_epochs={N}",
        "save_freq=2",
        "reward._target_=tests.fixtures.bad_rewards.FailOnCall",
        "+reward.fail_on_call=6",
    ]
    with pytest.raises(SimulatedKill):
        run_in_process(run_dir, killed)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["checkpoint_00002"]
    saved = json.loads((run_dir / "checkpoints" / "checkpoint_00002" / "ddpo_state.json").read_text())
    assert saved["epochs_completed"] == 2 and saved["global_step"] == 4
    assert saved["algorithm"]["stat_tracker"]["buffers"], "the checkpoint holds no reward buffers"

    restored = []
    original_load = TrainingState.load_state_dict

    def spy(self, state):
        original_load(self, state)
        restored.append((self.epochs_completed, self.global_step, self.algorithm.tracker.state_dict()))

    monkeypatch.setattr(TrainingState, "load_state_dict", spy)
    # the same reward values without the simulated kill: a changed config, allowed and recorded
    run_in_process(run_dir, [*RUN, f"num_epochs={N}", "save_freq=2", "resume_with_changes=true"])
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 2]
    assert history[1]["changes"]["reward._target_"]["to"] == "ddpo.rewards.jpeg.JpegCompressibility"

    assert len(restored) == 1
    epochs_completed, global_step, tracker_state = restored[0]
    assert (epochs_completed, global_step) == (2, 4)
    assert tracker_state["buffers"] == saved["algorithm"]["stat_tracker"]["buffers"]

    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(N)), "an epoch is missing or repeated"
    assert [r["global_step"] for r in records] == [2, 4, 6, 8]
    assert_same_epochs(records, read_metrics(reference))


def test_finished_run_started_again_changes_nothing(reference, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # copy2: modification times are kept
    before = snapshot(run_dir)
    last_reward = read_metrics(run_dir)[-1]["reward_mean"]

    with caplog.at_level(logging.INFO, logger="ddpo"):
        result, _ = run_in_process(run_dir, [*RUN, f"num_epochs={N}", "checkpoints_total_limit=2"])

    assert any("already complete" in r.getMessage() for r in caplog.records), caplog.text
    assert result == pytest.approx(last_reward)
    assert snapshot(run_dir) == before, "a finished run was modified by starting it again"


def test_resume_from_another_run_directory(reference, half_run, tmp_path):
    before = snapshot(half_run)
    run_dir = tmp_path / "run"

    run_in_process(run_dir, [*RUN, f"num_epochs={N}", f"resume_from={half_run}"])

    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [2, 3], "did not start from the other run's last checkpoint"
    assert [r["global_step"] for r in records] == [6, 8]
    assert_same_epochs(records, read_metrics(reference))
    assert snapshot(half_run) == before, "resume_from modified the run it started from"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["checkpoint_00003", "checkpoint_00004"]


def test_full_finetuning_resumes_from_its_diffusers_checkpoint(tmp_path):
    """Full fine-tuning checkpoints hold only ``unet/`` (diffusers format); resuming from it is exact."""
    full = [*RUN, "use_lora=false"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_in_process(whole, [*full, "num_epochs=2"])
    run_in_process(stopped, [*full, "num_epochs=1"])
    assert (stopped / "checkpoints" / "checkpoint_00001" / "unet").is_dir()
    assert not (stopped / "checkpoints" / "checkpoint_00001" / "trained_weights.safetensors").exists()
    run_in_process(stopped, [*full, "num_epochs=2"])
    assert_same_epochs(read_metrics(stopped), read_metrics(whole))
    from safetensors.torch import load_file

    name = "final/unet/diffusion_pytorch_model.safetensors"
    ours, ref = load_file(stopped / name), load_file(whole / name)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(["algorithm=grpo", "algorithm.group_size=2"], id="grpo"),
        # after a resume the reference is still the base model (not the resumed weights): kl_ref matches
        pytest.param(["use_lora=false", "algorithm.kl_coef=100"], id="kl-full-finetuning"),
        pytest.param(["algorithm.kl_coef=100"], id="kl-lora"),
        # the old policy (and its schedule's count) is restored exactly, under LoRA and full fine-tuning
        pytest.param(["algorithm=nft", "algorithm.group_size=2", "algorithm.old_decay_rate=0.1"], id="nft-lora"),
        pytest.param(["algorithm=awm", "algorithm.group_size=2", "algorithm.ema_decay_rate=0.1"], id="awm-lora"),
        pytest.param(
            ["algorithm=nft", "algorithm.group_size=2", "algorithm.kl_coef=0.1", "use_lora=false"], id="nft-full-kl"
        ),
        # the EMA of the weights (train.ema_decay) is restored exactly too
        pytest.param(
            ["algorithm=nft", "algorithm.group_size=2", "algorithm.old_decay_rate=0.1", "train.ema_decay=0.9"],
            id="nft-ema",
            marks=pytest.mark.slow,  # three more runs: outside the fast suite's CI budget (run with -m slow)
        ),
    ],
)
def test_new_algorithms_resume_exactly(tmp_path, algorithm):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_in_process(whole, [*RUN, *algorithm, "num_epochs=3"])
    run_in_process(stopped, [*RUN, *algorithm, "num_epochs=1"])
    run_in_process(stopped, [*RUN, *algorithm, "num_epochs=3"])
    assert_same_epochs(read_metrics(stopped), read_metrics(whole))
    if "kl" in str(algorithm):
        for ours, ref in zip(read_metrics(stopped), read_metrics(whole)):
            assert ours["kl_ref"] == pytest.approx(ref["kl_ref"], rel=1e-5, abs=1e-12)
    if algorithm[0] in ("algorithm=nft", "algorithm=awm"):
        from safetensors.torch import load_file

        last = Path("checkpoints") / "checkpoint_00003"
        for name in ("old_policy.safetensors", "trained_weights.safetensors", "ema.safetensors"):
            if not (whole / last / name).exists():  # full fine-tuning: the weights are the diffusers folder
                assert name != "ema.safetensors" or "train.ema_decay=0.9" not in algorithm
                continue
            ours, ref = load_file(stopped / last / name), load_file(whole / last / name)
            assert ours.keys() == ref.keys() and ours
            for key in ref:
                torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
        decays = [r.get("old_decay", r.get("ema_decay")) for r in read_metrics(stopped)]
        if "use_lora=false" not in algorithm:  # 2 optimizer steps per epoch, rate 0.1
            assert decays == pytest.approx([0.2, 0.3, 0.3] if algorithm[0] == "algorithm=awm" else [0.2, 0.4, 0.5])
