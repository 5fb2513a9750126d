"""Scoring several timesteps per UNet call gives the same loss, gradients and update as one per call."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ddpo.checkpointing import TrainingState
from ddpo.config import build
from ddpo.trainer import compute_advantages, sample_epoch, train_epoch
from tests.conftest import TINY, compose

BASE = TINY + ["use_lora=false", "sample.num_steps=3", "per_prompt_stat_tracking.enabled=false"]


def build_run(tmp_path, overrides=()):
    """Fresh components; the scheduler is set to the sampling schedule, as sample_epoch leaves it."""
    run, comps = build(compose(BASE + list(overrides)), str(tmp_path))
    comps.pipeline.scheduler.set_timesteps(run.sample.num_steps, device=comps.accelerator.device)
    return run, comps


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One epoch of samples and advantages from the tiny model (shared by the tests below)."""
    run, comps = build_run(tmp_path_factory.mktemp("sample"))
    with ThreadPoolExecutor(max_workers=1) as executor:
        samples = sample_epoch(comps, run, 0, executor)
    advantages, *_ = compute_advantages(comps, samples)
    assert advantages.abs().max() > 0
    return samples.batch, advantages


def weighted_loss_and_grads(comps, samples, advantages, rows, steps, per_call):
    """Backward of the loss of (rows x steps) in groups of ``per_call`` timesteps, weighted as train_epoch does."""
    pipeline = comps.pipeline
    params = pipeline.trainable_parameters()
    for p in params:
        p.grad = None
    trained = steps.shape[1]
    total = torch.zeros(())
    for start in range(0, trained, per_call):
        part = steps[:, start : start + per_call]
        batch = samples.transitions(rows, part)
        adv = advantages[rows].repeat_interleave(part.shape[1])
        loss, _ = comps.algorithm.loss(pipeline, batch, adv)
        weight = part.shape[1] / trained
        (loss * weight).backward()
        total = total + loss.detach() * weight
    return total, {id(p): p.grad.clone() for p in params}


def perturb_(pipeline, seed=0, scale=1e-3):
    """Move the weights off the sampling policy so ratios differ from 1 and clipping is active."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipeline.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.abs().mean() + 1e-3))


@pytest.mark.parametrize("perturbed", [False, True], ids=["at-sampling-policy", "off-policy"])
def test_grouped_timesteps_give_same_loss_and_gradients(tmp_path, sampled, perturbed):
    samples, advantages = sampled
    run, comps = build_run(tmp_path)
    pipeline = comps.pipeline
    pipeline.trainable_module().train()
    if perturbed:
        perturb_(pipeline)

    rows = torch.tensor([2, 0, 3])
    # each row trains its timesteps in its own random order, as in train_epoch
    steps = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(i)) for i in range(len(rows))])

    one_loss, one_grads = weighted_loss_and_grads(comps, samples, advantages, rows, steps, per_call=1)
    all_loss, all_grads = weighted_loss_and_grads(comps, samples, advantages, rows, steps, per_call=3)
    two_loss, two_grads = weighted_loss_and_grads(comps, samples, advantages, rows, steps, per_call=2)

    torch.testing.assert_close(all_loss, one_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(two_loss, one_loss, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum().item() for g in one_grads.values()) > 0
    for key, grad in one_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(all_grads[key], grad, rtol=1e-4, atol=1e-6 + 1e-4 * scale)
        torch.testing.assert_close(two_grads[key], grad, rtol=1e-4, atol=1e-6 + 1e-4 * scale)

    # a wrong weighting (each call's mean loss at full weight) would not match: the check can fail
    wrong = sum(
        comps.algorithm.loss(pipeline, samples.transitions(rows, steps[:, j : j + 1]), advantages[rows])[0].detach()
        for j in range(3)
    )
    assert not torch.allclose(wrong, one_loss, rtol=1e-3)


def snapshot(pipeline):
    return {name: p.detach().clone() for name, p in pipeline.trained_state_dict().items()}


def train_one_epoch(tmp_path, samples, advantages, per_call):
    run, comps = build_run(tmp_path, [f"train.timesteps_per_call={per_call}"])
    accelerator, pipeline = comps.accelerator, comps.pipeline
    before = snapshot(pipeline)
    # plain SGD: its update is linear in the gradient, so equal gradients give equal weights. AdamW's
    # first update is lr * sign(grad) and flips on gradients that are float noise around zero.
    optimizer = torch.optim.SGD(pipeline.trainable_parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(pipeline.trainable_module(), optimizer)
    pipeline.use_wrapped(model)
    state = TrainingState()
    stats = train_epoch(comps, run, 0, samples, advantages, optimizer, model, state)
    return before, snapshot(pipeline), stats, state


def test_train_epoch_same_weights_for_any_timesteps_per_call(tmp_path, sampled):
    samples, advantages = sampled
    start_1, after_1, stats_1, state_1 = train_one_epoch(tmp_path / "one", samples, advantages, per_call=1)
    start_3, after_3, stats_3, state_3 = train_one_epoch(tmp_path / "three", samples, advantages, per_call=3)

    for name in start_1:
        assert torch.equal(start_1[name], start_3[name]), "rebuilt components must start from the same weights"
    assert state_1.global_step == state_3.global_step == 2  # 4 samples / batch 2, one step per batch
    delta_1 = {k: after_1[k] - start_1[k] for k in after_1}
    delta_3 = {k: after_3[k] - start_3[k] for k in after_3}
    largest = max(d.abs().max().item() for d in delta_1.values())
    assert largest > 1e-4, "training did not move the weights"
    for name in delta_1:
        torch.testing.assert_close(delta_3[name], delta_1[name], rtol=1e-3, atol=1e-4 * largest, msg=name)
    # per-transition means do not depend on grouping (ratio_dev_max is a mean of per-call maxima: it does)
    for key in ("loss", "approx_kl", "clipfrac", "grad_norm"):
        assert stats_3[key] == pytest.approx(stats_1[key], rel=1e-3, abs=1e-6), key
