"""The flow-matching SDE step (ddpo/schedulers/flow_sde.py): the ODE at noise 0, its Gaussian, its marginals.

Pure tensor math, a few seconds in all. The pipeline that uses the step is tested in tests/test_flow.py.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.errors import ConfigError
from ddpo.schedulers.flow_sde import flow_noise_scale, flow_ode_step, flow_sde_step


def sd3_scheduler(num_steps=10, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


# -- the step against diffusers and against an independent Gaussian ------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_euler_step(shift):
    """With sigma_t = 0 the SDE step is FlowMatchEulerDiscreteScheduler.step, on every step of the schedule."""
    scheduler = sd3_scheduler(shift=shift)
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(0)
    shape = (3, 16, 8, 8)
    for i, timestep in enumerate(scheduler.timesteps):
        sample = torch.randn(shape, generator=gen)
        velocity = torch.randn(shape, generator=gen)
        expected = scheduler.step(velocity, timestep, sample, return_dict=False)[0]
        scale = flow_noise_scale(sigmas[i], sigmas[i + 1], noise_level=0.0)
        ours, log_prob, mean, std = flow_sde_step(
            velocity, sample, sigmas[i], sigmas[i + 1], scale, generator=[torch.Generator()] * 3
        )
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            flow_ode_step(velocity, sample, sigmas[i], sigmas[i + 1]), expected, rtol=0, atol=1e-5
        )
        assert bool((std == 0).all()) and bool((log_prob == 0).all())  # a point mass, by convention


@pytest.mark.parametrize("schedule,noise_level", [("flow_grpo", 0.7), ("flow_grpo", 1.2), ("constant", 0.3)])
def test_log_prob_is_the_gaussian_density_of_mean_and_std(schedule, noise_level):
    scheduler = sd3_scheduler()
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(1)
    shape = (4, 16, 8, 8)
    for i in range(len(scheduler.timesteps)):
        t = sigmas[i].expand(4)
        t_next = sigmas[i + 1].expand(4)
        sample = torch.randn(shape, generator=gen)
        velocity = torch.randn(shape, generator=gen)
        scale = flow_noise_scale(t, t_next, noise_level, schedule)
        drawn, log_prob, mean, std = flow_sde_step(
            velocity, sample, t, t_next, scale, generator=[torch.Generator().manual_seed(k) for k in range(4)]
        )
        # the mean and std from the formula, written out independently (float64)
        x, v = sample.double(), velocity.double()
        tt, dt = float(sigmas[i]), float(sigmas[i + 1] - sigmas[i])
        s = float(scale[0])
        expected_mean = x + (v + s**2 / (2 * tt) * (x + (1 - tt) * v)) * dt
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std.double(), torch.full((4,), s * math.sqrt(-dt), dtype=torch.float64))
        normal = torch.distributions.Normal(mean.double(), std.double().reshape(-1, 1, 1, 1))
        expected = normal.log_prob(drawn.double()).flatten(1).mean(dim=1)
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
        # scoring the drawn sample again gives the same log prob (how training re-evaluates it)
        _, again, _, _ = flow_sde_step(velocity, sample, t, t_next, scale, prev_sample=drawn)
        torch.testing.assert_close(again, log_prob, rtol=0, atol=0)


def test_noise_scale_at_t_one_uses_the_next_sigma():
    """Flow-GRPO's sigma_t = a sqrt(t / (1 - t)), finite at the first step (t = 1): 1 - t_next in the denominator."""
    sigmas = sd3_scheduler().sigmas
    assert float(sigmas[0]) == 1.0
    first = flow_noise_scale(sigmas[0], sigmas[1], 0.7)
    assert torch.isfinite(first)
    torch.testing.assert_close(first, 0.7 * torch.sqrt(1 / (1 - sigmas[1])))
    later = flow_noise_scale(sigmas[3], sigmas[4], 0.7)
    torch.testing.assert_close(later, 0.7 * torch.sqrt(sigmas[3] / (1 - sigmas[3])))
    assert float(flow_noise_scale(sigmas[3], sigmas[4], 0.5, "constant")) == 0.5
    with pytest.raises(ConfigError, match="sigma_schedule"):
        flow_noise_scale(sigmas[0], sigmas[1], 0.7, "dance")
    with pytest.raises(ConfigError, match="noise_level"):
        flow_noise_scale(sigmas[0], sigmas[1], -0.1)


# -- marginal preservation on a toy with an exact velocity ---------------------------------------------
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-2.0, 1.5], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.6], dtype=torch.float64)


def mixture_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for x0 ~ sum_k w_k N(m_k, s_k^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps.

    Given the component k, (x0, eps, x_t) are jointly Gaussian: x_t ~ N((1 - t) m_k, V_k) with
    V_k = (1 - t)^2 s_k^2 + t^2, Cov(x0, x_t) = (1 - t) s_k^2, Cov(eps, x_t) = t, so
    E[x0 | x, k] = m_k + (1 - t) s_k^2 (x - (1 - t) m_k) / V_k and E[eps | x, k] = t (x - (1 - t) m_k) / V_k;
    the component's posterior weight is proportional to w_k N(x; (1 - t) m_k, V_k).
    """
    x = x[:, None]
    centre = (1 - t) * MEANS
    variance = (1 - t) ** 2 * STDS**2 + t**2
    residual = x - centre
    log_weight = torch.log(WEIGHTS) - 0.5 * residual**2 / variance - 0.5 * torch.log(variance)
    posterior = torch.softmax(log_weight, dim=1)
    x0 = MEANS + (1 - t) * STDS**2 * residual / variance
    eps = t * residual / variance
    return (posterior * (eps - x0)).sum(dim=1)


def mixture_moments(t: float) -> tuple[float, float]:
    """Mean and variance of x_t (exact)."""
    mean = float((WEIGHTS * (1 - t) * MEANS).sum())
    second = float((WEIGHTS * ((1 - t) ** 2 * (STDS**2 + MEANS**2) + t**2)).sum())
    return mean, second - mean**2


def integrate(sigmas, noise_level, schedule, n, seed, checkpoints):
    """Samples at each checkpoint time, integrating from t = 1 (pure noise) down with the SDE (or the ODE)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    found = {}
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = mixture_velocity(x, t)
        if noise_level == 0:
            x = flow_ode_step(v[:, None], x[:, None].float(), t, t_next)[:, 0].double()
        else:
            scale = flow_noise_scale(torch.tensor(t), torch.tensor(t_next), noise_level, schedule)
            mean = flow_sde_step(v[:, None], x[:, None], t, t_next, scale, prev_sample=x[:, None].float())[2]
            std = float(scale) * math.sqrt(t - t_next)
            # float64 noise on the float32 mean: the toy needs no more precision than the step gives
            x = mean[:, 0].double() + std * torch.randn(n, generator=gen, dtype=torch.float64)
        for c in checkpoints:
            if abs(t_next - c) < 1e-9:
                found[c] = x.clone()
    return found


@pytest.mark.parametrize(
    "schedule,noise_level", [("flow_grpo", 0.7), ("flow_grpo", 1.0), ("constant", 0.5)], ids=["a0.7", "a1.0", "const"]
)
def test_sde_preserves_the_ode_marginals(schedule, noise_level):
    """SDE samples at several t have the mean and variance of the ODE's samples and of the exact marginal."""
    steps = 400
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    checkpoints = [0.75, 0.5, 0.25, 0.0]
    n = 10_000
    sde = integrate(sigmas, noise_level, schedule, n, seed=0, checkpoints=checkpoints)
    ode = integrate(sigmas, 0.0, schedule, n, seed=0, checkpoints=checkpoints)
    for c in checkpoints:
        exact_mean, exact_var = mixture_moments(c)
        mean_se = math.sqrt(exact_var / n)
        var_se = exact_var * math.sqrt(2 / n) * 1.5  # a mixture's variance estimate varies more than a Gaussian's
        for name, samples in (("sde", sde[c]), ("ode", ode[c])):
            assert abs(samples.mean().item() - exact_mean) < 4 * mean_se, (name, c, samples.mean().item(), exact_mean)
            assert abs(samples.var().item() - exact_var) < 4 * var_se, (name, c, samples.var().item(), exact_var)
        assert abs(sde[c].mean().item() - ode[c].mean().item()) < 5 * mean_se
        assert abs(sde[c].var().item() - ode[c].var().item()) < 5 * var_se
    # the SDE really is stochastic: its samples are not the ODE's transported noise
    assert (sde[0.0] - ode[0.0]).abs().mean().item() > 0.1
    # at t = 0 both reach the data: the mass of each component
    for name, samples in (("sde", sde[0.0]), ("ode", ode[0.0])):
        share = (samples > 0).double().mean().item()
        assert abs(share - 0.7) < 0.03, (name, share)
