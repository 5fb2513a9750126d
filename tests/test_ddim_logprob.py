"""The DDIM step's log probability, checked against diffusers' own DDIMScheduler.step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.errors import ConfigError
from ddpo.schedulers.ddim import ddim_step_with_logprob, previous_timestep

NUM_STEPS = 10


def make_scheduler(prediction_type="epsilon", timestep_spacing="leading", num_steps=NUM_STEPS):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def reference_mean_std(scheduler, model_output, t, sample, eta):
    """Mean and std of the DDIM transition, taken from diffusers' step alone."""
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    shifted = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.ones_like(sample)).prev_sample
    return mean, shifted - mean


def gaussian_log_density_mean(x, mean, std):
    """Per-element mean (over all non-batch dims) of log N(x; mean, std^2), in float64."""
    x, mean, std = x.double(), mean.double(), std.double()
    density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(dim=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_matches_diffusers_step(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4, 8, 8)
    # the schedule's steps all agree with diffusers' own `t - 1000 // N` rule under leading spacing
    timesteps = scheduler.timesteps.tolist()
    assert timesteps[-1] == 1 and timesteps[0] == 901
    for t in timesteps:
        sample = torch.randn(shape, generator=gen, dtype=torch.float64)
        model_output = torch.randn(shape, generator=gen, dtype=torch.float64)
        mean, std = reference_mean_std(scheduler, model_output, t, sample, eta)
        assert bool((std > 0).all())
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        prev_sample = mean + std * noise

        ours_prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, torch.tensor(t), sample, eta=eta, prev_sample=prev_sample
        )
        expected = gaussian_log_density_mean(prev_sample, mean, std)

        assert ours_prev.shape == prev_sample.shape
        assert torch.equal(ours_prev, prev_sample), "a given prev_sample must be returned unchanged"
        assert log_prob.shape == (shape[0],)
        assert log_prob.dtype == torch.float32
        torch.testing.assert_close(log_prob.double(), expected, atol=1e-5, rtol=0)


def test_log_prob_is_sensitive_to_the_mean():
    """The comparison above can fail: a shifted prev_sample scores lower than the drawn one."""
    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(1)
    shape = (2, 4, 8, 8)
    t = int(scheduler.timesteps[3])
    sample = torch.randn(shape, generator=gen)
    model_output = torch.randn(shape, generator=gen)
    mean, std = reference_mean_std(scheduler, model_output, t, sample, 1.0)
    _, at_mean = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=mean)
    _, shifted = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=mean + std)
    # exactly half a nat per element separates x = mean from x = mean + std
    torch.testing.assert_close(at_mean - shifted, torch.full((2,), 0.5), atol=1e-4, rtol=0)


def test_drawn_sample_is_scored_consistently():
    """Without prev_sample the step draws one and returns its log density under the same Gaussian."""
    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, 8, 8)
    t = int(scheduler.timesteps[4])
    sample = torch.randn(shape, generator=gen)
    model_output = torch.randn(shape, generator=gen)
    drawn, log_prob = ddim_step_with_logprob(
        scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    again, _ = ddim_step_with_logprob(
        scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(drawn, again)
    _, rescored = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=drawn)
    assert torch.equal(log_prob, rescored)
    mean, std = reference_mean_std(scheduler, model_output, t, sample, 1.0)
    torch.testing.assert_close(log_prob.double(), gaussian_log_density_mean(drawn, mean, std), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_previous_timestep_follows_the_actual_schedule(spacing):
    num_steps = 3  # 1000 is not a multiple of 3: the naive rule and the schedule disagree
    scheduler = make_scheduler(timestep_spacing=spacing, num_steps=num_steps)
    schedule = scheduler.timesteps
    expected = torch.cat([schedule[1:], schedule.new_tensor([-1])])

    assert torch.equal(previous_timestep(scheduler, schedule), expected)
    for t, nxt in zip(schedule, expected):
        assert previous_timestep(scheduler, t).item() == nxt.item()
    naive = schedule - 1000 // num_steps
    assert not torch.equal(naive, expected), f"{spacing}: naive rule {naive} happens to match {expected}"

    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        previous_timestep(scheduler, torch.tensor([int(schedule[0]) - 1]))


def test_step_uses_alpha_of_the_scheduled_previous_timestep():
    """The step's mean and std use the schedule's next timestep, not t - 1000 // N.

    Trailing spacing (999, 666, 332) differs from the naive rule by one timestep, which moves the
    log probability by ~1e-4..1e-3 here: far above the tolerance.
    """
    scheduler = make_scheduler(timestep_spacing="trailing", num_steps=3)
    pairs = [(int(a), int(b)) for a, b in zip(scheduler.timesteps[:-1], scheduler.timesteps[1:])]
    t, prev_t = next((a, b) for a, b in pairs if b != a - 1000 // 3)
    gen = torch.Generator().manual_seed(4)
    shape = (2, 4, 4, 4)
    sample = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    alphas = scheduler.alphas_cumprod.double()
    a_t, a_prev = alphas[t], alphas[prev_t]
    std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    pred_x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = a_prev.sqrt() * pred_x0 + (1 - a_prev - std**2).sqrt() * eps
    prev_sample = mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)

    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, sample, eta=1.0, prev_sample=prev_sample)
    expected = gaussian_log_density_mean(prev_sample, mean, std.expand(shape))
    torch.testing.assert_close(log_prob.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_non_positive_eta_is_rejected(eta):
    scheduler = make_scheduler()
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ConfigError, match="eta"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, eta=eta)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_element_timesteps_match_separate_calls(prediction_type):
    scheduler = make_scheduler(prediction_type)
    gen = torch.Generator().manual_seed(5)
    picks = [0, 4, 9, 2]
    timesteps = scheduler.timesteps[picks]
    assert len(set(timesteps.tolist())) == len(picks)
    shape = (len(picks), 4, 8, 8)
    sample = torch.randn(shape, generator=gen)
    model_output = torch.randn(shape, generator=gen)
    prev_sample = torch.randn(shape, generator=gen)

    _, batched = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta=1.0, prev_sample=prev_sample)
    separate = torch.cat(
        [
            ddim_step_with_logprob(
                scheduler,
                model_output[i : i + 1],
                timesteps[i],
                sample[i : i + 1],
                eta=1.0,
                prev_sample=prev_sample[i : i + 1],
            )[1]
            for i in range(len(picks))
        ]
    )
    torch.testing.assert_close(batched, separate, atol=1e-6, rtol=1e-6)
    # the per-element results really depend on the timestep (so a shared timestep would be caught)
    _, shared = ddim_step_with_logprob(scheduler, model_output, timesteps[0], sample, eta=1.0, prev_sample=prev_sample)
    assert not torch.allclose(batched[1:], shared[1:], atol=1e-3)


def test_deterministic_last_step_is_rejected():
    """set_alpha_to_one=True gives the last step zero variance: no log probability exists there."""
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=True,
        steps_offset=1,
        clip_sample=False,
    )
    scheduler.set_timesteps(NUM_STEPS)
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ConfigError, match="set_alpha_to_one"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[-1], x, eta=1.0)
