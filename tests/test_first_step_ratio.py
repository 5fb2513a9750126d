"""At the first PPO step the recomputed log probability equals the stored one (ratio 1, KL 0)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ddpo.config import build
from ddpo.seeds import shuffle_seed
from ddpo.trainer import compute_advantages, sample_epoch
from tests.conftest import TINY, compose, read_metrics, run_in_process


def first_step_losses(tmp_path, overrides, base=TINY):
    """The algorithm's loss on every micro-batch of the first training batch, as train_epoch computes it.

    Returns ([(loss, stats, log prob, stored log prob, advantages), ...], components).
    """
    run, comps = build(compose([*base, "mixed_precision=no", *overrides]), str(tmp_path))
    with ThreadPoolExecutor(max_workers=1) as executor:
        samples = sample_epoch(comps, run, 0, executor)
    advantages, *_ = compute_advantages(comps, samples)

    accelerator, pipeline, t = comps.accelerator, comps.pipeline, run.train
    model = accelerator.prepare(pipeline.trainable_module())
    pipeline.use_wrapped(model)
    model.train()

    batch = samples.batch
    n, num_steps = batch.log_probs.shape
    trained = comps.plan.trained_timesteps
    generator = torch.Generator().manual_seed(shuffle_seed(run.seed, 0, accelerator.process_index))
    order = torch.randperm(n, generator=generator)
    step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(n)])[:, :trained]
    rows = order[: t.batch_size]
    results = []
    for start in range(0, trained, t.timesteps_per_call):
        steps = step_order[rows, start : start + t.timesteps_per_call]
        rows_batch = batch.transitions(rows, steps)
        adv = advantages[rows].repeat_interleave(steps.shape[1])
        loss, stats = comps.algorithm.loss(pipeline, rows_batch, adv)
        log_prob, _, _ = pipeline.log_prob(rows_batch)
        results.append((loss, stats, log_prob, rows_batch["log_probs"], adv))
    return results, comps


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["use_lora=true", "train.cfg=true"], id="lora-cfg"),
        pytest.param(["use_lora=false", "train.cfg=true"], id="full-cfg"),
        pytest.param(["use_lora=true", "train.cfg=true", "train.timesteps_per_call=3"], id="lora-cfg-3-per-call"),
        pytest.param(["use_lora=false", "train.cfg=false", "sample.guidance_scale=1.0"], id="full-no-guidance"),
        pytest.param(
            ["use_lora=true", "algorithm=grpo", "algorithm.group_size=2", "algorithm.branch_window=[0,2]"],
            id="lora-grpo-branched",
        ),
        pytest.param(["use_lora=true", "pipeline.train_window=[1,3]"], id="lora-train-window"),
    ],
)
def test_first_step_ratio_is_one(tmp_path, overrides):
    results, _ = first_step_losses(tmp_path, overrides)
    assert results
    for loss, stats, log_prob, stored, adv in results:
        ratio = torch.exp(log_prob - stored)
        assert torch.all(torch.abs(ratio - 1) < 1e-5), f"ratio {ratio.tolist()}"
        assert stats["ratio_dev_max"].item() < 1e-5
        assert stats["approx_kl"].item() < 1e-8
        assert stats["clipfrac"].item() == 0.0
        # with ratio 1 the clipped PPO loss is minus the mean advantage
        torch.testing.assert_close(loss.detach(), -adv.mean(), atol=1e-5, rtol=1e-5)
        assert loss.requires_grad


def test_training_without_guidance_changes_the_log_prob(tmp_path):
    """The check above can fail: scoring a guided sample without guidance gives ratio != 1."""
    results, _ = first_step_losses(tmp_path, ["use_lora=true", "train.cfg=false", "sample.guidance_scale=5.0"])
    deviation = max(torch.abs(torch.exp(lp - stored) - 1).max().item() for _, _, lp, stored, _ in results)
    assert deviation > 1e-3


def test_run_with_zero_learning_rate_reports_zero_kl(tmp_path):
    """Through the whole loop (accelerate-prepared model): weights that do not move give ratio 1."""
    run_in_process(tmp_path, TINY + ["use_lora=true", "train.learning_rate=0.0", "num_epochs=1"])
    (record,) = read_metrics(tmp_path)
    assert record["approx_kl"] < 1e-8
    assert record["ratio_dev_max"] < 1e-5
    assert record["clipfrac"] == 0.0
