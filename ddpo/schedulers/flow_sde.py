"""Flow-matching steps with log probabilities: the Euler ODE step and its marginal-preserving SDE.

Rectified flow (SD3, FLUX) interpolates data and noise along straight lines,

    x_t = (1 - t) x0 + t eps,    t in [0, 1], t = 1 pure noise,

and the model predicts the velocity v(x, t) = E[eps - x0 | x_t = x]. Sampling integrates the ODE
dx = v dt from t = 1 down to t = 0; its Euler step is ``x + v dt`` with dt = t_next - t < 0, what
diffusers' ``FlowMatchEulerDiscreteScheduler.step`` does.

The SDE with the same marginals (Flow-GRPO, Liu et al. 2025). Since x = (1 - t) E[x0|x] + t E[eps|x]
and v = E[eps|x] - E[x0|x], we get E[eps|x] = x + (1 - t) v, and the score of the marginal is

    grad log p_t(x) = -E[eps | x_t = x] / t = -(x + (1 - t) v) / t.

For any sigma_t >= 0, dx = [v + sigma_t^2/2 grad log p_t] dt + sigma_t dW (t increasing) has the
ODE's Fokker-Planck equation (the added drift and diffusion terms cancel), and its time reversal,
integrated from t = 1 down to t = 0, is dx = [v - sigma_t^2/2 grad log p_t] dt + sigma_t dW. Its
Euler-Maruyama step, with dt = t_next - t < 0:

    x_next = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t sqrt(|dt|) z,    z ~ N(0, I),

a Gaussian with that mean and std sigma_t sqrt(|dt|). With sigma_t = 0 it is the Euler ODE step.

The noise scale (``flow_noise_scale``): Flow-GRPO's sigma_t = a sqrt(t / (1 - t)) (``flow_grpo``,
a = ``noise_level``, 0.7 in Flow-GRPO), or DanceGRPO's constant sigma_t = a (``constant``). At t = 1
the Flow-GRPO scale is infinite; as in Flow-GRPO (which replaces sigma = 1 by the schedule's next
value, ``sigmas[1]``, in the denominator), the first step uses sqrt(1 / (1 - t_next)). The drift's
1/t is never singular: the step from t = 0 is never taken.

Every function here is pure (no scheduler state), so the same code computes a transition's log
probability while sampling and again, with gradients, while training.
"""

import math

import torch

from ddpo.errors import ConfigError
from ddpo.schedulers.ddim import draw_noise

SIGMA_SCHEDULES = ("flow_grpo", "constant")


def _column(values, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample tensor (B,) as float32 shaped to broadcast over ``like`` (B, ...)."""
    values = torch.as_tensor(values, device=like.device, dtype=torch.float32)
    if values.ndim == 0:
        values = values.expand(like.shape[0])
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def flow_noise_scale(t, t_next, noise_level: float, schedule: str = "flow_grpo") -> torch.Tensor:
    """sigma_t of the SDE step from ``t`` to ``t_next`` (tensors of equal shape, or scalars), float32.

    ``flow_grpo``: noise_level * sqrt(t / (1 - t)), with t = 1 in the denominator replaced by
    ``t_next`` (the step that starts from pure noise); ``constant``: noise_level.
    """
    if schedule not in SIGMA_SCHEDULES:
        raise ConfigError(f"pipeline.sigma_schedule must be one of {', '.join(SIGMA_SCHEDULES)} (got {schedule!r})")
    if not noise_level >= 0:
        raise ConfigError(f"pipeline.noise_level must be >= 0 (got {noise_level})")
    t = torch.as_tensor(t, dtype=torch.float32)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=t.device)
    if schedule == "constant":
        return torch.full_like(t, float(noise_level))
    denominator = 1 - torch.where(t >= 1, t_next, t)
    return noise_level * torch.sqrt(t / denominator)


def flow_ode_step(velocity: torch.Tensor, sample: torch.Tensor, t, t_next) -> torch.Tensor:
    """The Euler step of the flow ODE, x + v (t_next - t), in float32 (diffusers' FlowMatchEuler step)."""
    dt = _column(t_next, sample) - _column(t, sample)
    return sample.float() + velocity.float() * dt


def flow_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    t,
    t_next,
    noise_scale,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
):
    """One step of the marginal-preserving SDE from ``t`` to ``t_next`` < ``t`` (see the module docstring).

    ``t``, ``t_next`` and ``noise_scale`` (sigma_t, from ``flow_noise_scale``) are scalars or one
    value per batch element. When ``prev_sample`` is given it is scored, not drawn (stored
    transitions, re-evaluated in training); otherwise it is drawn with ``generator`` (one per batch
    element: ``draw_noise``).

    Returns ``(prev_sample, log_prob, mean, std)``, all float32: ``log_prob`` (B,) is the per-element
    mean of the Gaussian log density (the reduction of the DDIM step and of the PPO clip range),
    ``mean`` is shaped like the sample and ``std`` = sigma_t sqrt(|dt|) is one value per element.
    A row with std 0 (noise scale 0: the ODE step) is a point mass; its log_prob is 0 by convention.
    """
    x = sample.float()
    v = velocity.float()
    t_col, t_next_col = _column(t, x), _column(t_next, x)
    dt = t_next_col - t_col
    scale = _column(noise_scale, x)
    drift = v + scale**2 / (2 * t_col) * (x + (1 - t_col) * v)
    mean = x + drift * dt
    std = scale * torch.sqrt(dt.abs())
    if prev_sample is None:
        prev_sample = mean + std * draw_noise(x.shape, generator, x.device, torch.float32)
    diff = prev_sample.detach().float() - mean
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    log_density = -(diff**2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_density = torch.where(positive, log_density, torch.zeros_like(log_density))
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    return prev_sample.float(), log_prob, mean, std.reshape(-1)
