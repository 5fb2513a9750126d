"""The algorithm group: GRPO's groups and advantages, the KL to the reference, one-file extensions."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ddpo.algorithms import GRPO, gaussian_kl
from ddpo.config import build
from ddpo.errors import ConfigError
from ddpo.trainer import compute_advantages, sample_epoch
from tests.conftest import TINY, compose, read_metrics, run_cli, run_in_process


def grpo(**kwargs):
    return GRPO(**{"clip_range": 1e-4, "adv_clip_max": 5.0, "group_size": 3, **kwargs})


def test_grpo_advantages_follow_the_formula_on_a_reward_table():
    rewards = np.array([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])
    prompts = ["a"] * 3 + ["b"] * 3
    expected_a = (np.array([1.0, 2.0, 6.0]) - 3.0) / (np.std([1.0, 2.0, 6.0]) + 1e-4)
    np.testing.assert_allclose(grpo().advantages(rewards, prompts), np.r_[expected_a, 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(grpo(scale_by_std=False).advantages(rewards, prompts), [-2, -1, 3, 0, 0, 0])
    clipped = grpo(adv_clip_max=1.0).advantages(rewards, prompts)
    np.testing.assert_allclose(clipped, np.r_[expected_a[:2], 1.0, 0, 0, 0], rtol=1e-12)  # 1.39 clipped to 1
    with pytest.raises(RuntimeError, match="different prompts"):
        grpo().advantages(rewards, ["a", "a", "b", "b", "b", "b"])


def test_grpo_refuses_groups_that_do_not_fit():
    with pytest.raises(ConfigError, match="group_size=3 does not divide the 4 samples"):
        grpo().check_plan(4)
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        grpo(group_size=1)


@pytest.mark.parametrize(
    "shared_noise,family",
    [(False, []), (True, []), (True, ["model=tiny_flow", "pipeline=flow_sde", "pipeline.max_sequence_length=8"])],
    ids=["own-noise", "shared-noise", "shared-noise-flow"],
)
def test_grpo_epoch_samples_each_prompt_for_a_whole_group(tmp_path, shared_noise, family):
    overrides = [
        *TINY,
        *family,
        "algorithm=grpo",
        "algorithm.group_size=2",
        f"algorithm.shared_noise={shared_noise}",
        "sample.num_batches_per_epoch=3",
    ]
    run, comps = build(compose(overrides), str(tmp_path))
    with ThreadPoolExecutor(max_workers=1) as executor:
        samples = sample_epoch(comps, run, 0, executor)
    prompts = samples.prompts
    assert len(prompts) == 6
    assert all(prompts[i] == prompts[i + 1] for i in range(0, 6, 2))  # groups span sampling batches (1 of 3)
    first_latents = samples.batch.steps["latents"][:, 0]
    same = [torch.equal(first_latents[i], first_latents[i + 1]) for i in range(0, 6, 2)]
    assert all(same) if shared_noise else not any(same)
    # the step noise is each sample's own: shared initial noise must not make a group's samples identical
    # (identical samples would give every advantage 0 and train nothing)
    final = samples.batch.steps["next_latents"][:, -1]
    assert not any(torch.equal(final[i], final[i + 1]) for i in range(0, 6, 2))
    advantages, rewards, _, _ = compute_advantages(comps, samples)
    pairs = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    expected = (pairs - pairs.mean(1, keepdims=True)) / (pairs.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(advantages.numpy(), np.clip(expected.reshape(-1), -5, 5), rtol=1e-5, atol=1e-6)


def test_grpo_prints_its_groups_in_the_batch_arithmetic(tmp_path):
    result = run_cli(tmp_path, [*TINY, "num_epochs=1", "algorithm=grpo", "algorithm.group_size=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 prompts x 2 samples (GRPO groups)" in (tmp_path / "train.log").read_text()


def test_gaussian_kl_is_the_closed_form():
    mean, ref, std = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.tensor([0.5, 0.125]))


def parameter_count(pipeline) -> int:
    modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "_reference", None))
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@pytest.mark.parametrize("use_lora", [True, False])
def test_kl_to_the_reference_is_zero_before_training(tmp_path, use_lora):
    """At the first step the policy is the reference: kl_ref is 0; under LoRA no weights are copied for it."""
    overrides = [*TINY, f"use_lora={use_lora}", "algorithm.kl_coef=1.0"]
    run, comps = build(compose(overrides), str(tmp_path))
    pipeline = comps.pipeline
    before = parameter_count(pipeline)
    pipeline.keep_reference()
    copied = parameter_count(pipeline) - before
    if use_lora:
        assert copied == 0, "the LoRA reference copied weights"
    else:  # a frozen copy of the UNet: its memory cost
        assert copied == sum(p.numel() for p in pipeline.unet.parameters())
    with ThreadPoolExecutor(max_workers=1) as executor:
        samples = sample_epoch(comps, run, 0, executor)
    advantages, *_ = compute_advantages(comps, samples)
    rows, steps = torch.arange(4), torch.arange(3).expand(4, -1)
    loss, stats = comps.algorithm.loss(
        pipeline, samples.batch.transitions(rows, steps), advantages.repeat_interleave(3)
    )
    assert stats["kl_ref"].item() < 1e-8
    # the check can fail: moved weights give a positive KL
    with torch.no_grad():
        for p in pipeline.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    _, moved = comps.algorithm.loss(pipeline, samples.batch.transitions(rows, steps), advantages.repeat_interleave(3))
    assert moved["kl_ref"].item() > 1e-6


@pytest.mark.slow  # CI's budget (30 s); the KL's closed form and its gradient are tested fast
def test_a_large_kl_coef_keeps_the_policy_near_the_reference(tmp_path):
    """KL per element is about (mean shift / std)^2 / 2, while the policy gradient scales with 1 / std:
    at a mean shift of 0.1 std the KL gradient is ~10x weaker than the advantage's, so "large" is ~100."""
    common = [*TINY, "num_epochs=10", "train.learning_rate=3e-3", "algorithm.track_kl_ref=true"]
    run_in_process(tmp_path / "free", [*common, "algorithm.kl_coef=0"])
    run_in_process(tmp_path / "tied", [*common, "algorithm.kl_coef=100"])
    free = [r["kl_ref"] for r in read_metrics(tmp_path / "free")]
    tied = [r["kl_ref"] for r in read_metrics(tmp_path / "tied")]
    assert free[-1] > 0
    # Adam's first steps have the same size whatever the loss: compare from epoch 2 on
    assert sum(tied[2:]) * 5 <= sum(free[2:]), (tied, free)


def test_an_algorithm_defined_outside_ddpo_is_one_module_and_one_yaml(tmp_path):
    """tests/fixtures/external holds a module and a YAML; hydra.searchpath adds its conf/ to the groups."""
    from pathlib import Path

    external = Path(__file__).parent / "fixtures" / "external" / "conf"
    result = run_cli(tmp_path, [*TINY, "num_epochs=1", f"hydra.searchpath=[file://{external}]", "algorithm=rloo"])
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_metrics(tmp_path)
    assert record["num_samples"] == 4 and np.isfinite(record["loss"])
    assert "LeaveOneOut" in (tmp_path / ".hydra" / "config.yaml").read_text()


def test_a_forward_process_algorithm_defined_outside_ddpo_is_one_module_and_one_yaml(tmp_path):
    """CONTRIBUTING's example: a FINAL-rollout algorithm (reward-weighted regression), from outside ddpo/."""
    from pathlib import Path

    external = Path(__file__).parent / "fixtures" / "external" / "conf"
    overrides = [*TINY, "num_epochs=2", f"hydra.searchpath=[file://{external}]", "algorithm=weighted_regression"]
    result = run_cli(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(np.isfinite(r["loss"]) and r["mse"] > 0 and r["grad_norm"] > 0 for r in records)
    log = (tmp_path / "train.log").read_text()
    assert "epoch 2/2" in log and "loss " in log  # the log line is the algorithm's (no PPO-only keys)
