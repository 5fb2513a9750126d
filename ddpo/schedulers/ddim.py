"""DDIM step that also returns the log probability of the transition.

A pure function of the scheduler's configuration and its current schedule, so the same code
computes the log probability while sampling and again, with gradients, while training.
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor  # per denoising step: imported once, not per call

from ddpo.errors import ConfigError


def previous_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep that follows ``timestep`` in the scheduler's actual schedule, -1 after the last.

    Reading it from ``scheduler.timesteps`` honours timestep_spacing and steps_offset; the usual
    ``t - num_train_timesteps // num_inference_steps`` is wrong for "trailing" and "linspace".
    """
    schedule = scheduler.timesteps.to(timestep.device)
    following = torch.cat([schedule[1:], schedule.new_tensor([-1])])
    index = (schedule[None, :] == timestep.reshape(-1, 1)).int().argmax(dim=1)
    if not bool((schedule[index] == timestep.reshape(-1)).all()):
        raise ValueError(f"timestep {timestep.tolist()} is not in the scheduler's schedule")
    return following[index].reshape(timestep.shape)


class _ScheduleTables:
    """Per-device lookup tables for one schedule, so a step needs no host synchronisation."""

    def __init__(self, scheduler, device):
        schedule = scheduler.timesteps.detach().to("cpu", torch.long)
        n = scheduler.config.num_train_timesteps
        prev_of = torch.full((n,), -1, dtype=torch.long)
        prev_of[schedule] = torch.cat([schedule[1:], schedule.new_tensor([-1])])
        alphas = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        final = torch.tensor([float(scheduler.final_alpha_cumprod)], dtype=torch.float64)
        # index 0 holds the "after the last step" alpha; timestep t lives at t + 1
        alpha_of = torch.cat([final, alphas])
        alpha_t, alpha_prev = alpha_of[schedule + 1], alpha_of[prev_of[schedule] + 1]
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        if bool((variance <= 0).any()):
            raise ConfigError(
                "the last DDIM step of this schedule has zero variance (it ends at t=0 with "
                "set_alpha_to_one=True, or with linspace spacing or steps_offset=0), so it has no log "
                "probability; use set_alpha_to_one=False with steps_offset >= 1, or trailing spacing"
            )
        self.prev_of = prev_of.to(device)
        self.alpha_of = alpha_of.to(device)


def _tables(scheduler, device) -> _ScheduleTables:
    # the schedule is a function of the (frozen) config and the number of steps
    cache = scheduler.__dict__.setdefault("_ddpo_tables", {})
    key = (str(device), scheduler.num_inference_steps)
    if key not in cache:
        cache[key] = _ScheduleTables(scheduler, device)
    return cache[key]


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def draw_noise(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` from one generator, or from one generator per row.

    diffusers' ``randn_tensor`` (drawn on the generators' device, then moved), with the check that a
    list holds one generator per row: randn_tensor would silently draw a shorter batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        generator = list(generator)
        if len(generator) == 1:  # randn_tensor takes a one-item list as the single generator: the same draw
            generator = generator[0]
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_gaussian: bool = False,
):
    """One DDIM step x_t -> x_{t-1} with noise scale ``eta`` (> 0).

    ``generator`` may be a list, one generator per batch element: each element's noise then does
    not depend on the batch it is drawn in (``draw_noise``).

    Returns ``(prev_sample, log_prob)``, or with ``return_gaussian`` ``(prev_sample, log_prob, mean,
    std)``: the transition's Gaussian (mean like the sample, std one per batch element), what a KL
    between two policies needs. When ``prev_sample`` is given it is not drawn but scored:
    that is how stored transitions are re-evaluated during training. ``log_prob`` is the mean over
    all non-batch elements of the Gaussian log density (the reduction DDPO's clip range assumes).
    ``timestep`` is a scalar or one timestep per batch element, each a step of the scheduler's
    current schedule (``set_timesteps``). Nothing here waits for the device.
    """
    if eta <= 0:
        raise ConfigError(
            f"sample.eta must be > 0 (got {eta}): with eta = 0 DDIM is deterministic and a "
            "transition has no log probability to optimise"
        )
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    tables = _tables(scheduler, sample.device)
    alpha_t = tables.alpha_of[timestep + 1]
    alpha_prev = tables.alpha_of[tables.prev_of[timestep] + 1]
    beta_t = 1 - alpha_t

    prediction_type = config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - _broadcast(beta_t.sqrt(), sample) * model_output) / _broadcast(alpha_t.sqrt(), sample)
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = _broadcast(alpha_t.sqrt(), sample) * sample - _broadcast(beta_t.sqrt(), sample) * model_output
        pred_eps = _broadcast(alpha_t.sqrt(), sample) * model_output + _broadcast(beta_t.sqrt(), sample) * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - _broadcast(alpha_t.sqrt(), sample) * pred_x0) / _broadcast(beta_t.sqrt(), sample)
    else:
        raise ConfigError(f"unsupported scheduler prediction_type {prediction_type!r}")

    if getattr(config, "thresholding", False):
        raise ConfigError("DDIM thresholding is not supported by the log-prob step; set thresholding=False")
    if config.clip_sample:
        limit = config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)  # > 0: checked in _tables
    std = eta * variance.clamp(min=0).sqrt()

    direction = _broadcast((1 - alpha_prev - std**2).clamp(min=0).sqrt(), sample) * pred_eps
    mean = _broadcast(alpha_prev.sqrt(), sample) * pred_x0 + direction
    std_b = _broadcast(std, sample)

    if prev_sample is None:
        prev_sample = mean + std_b * draw_noise(sample.shape, generator, sample.device, sample.dtype)

    # computed in float32 at least: bf16 log densities are too coarse for a 1e-4 clip range
    diff = prev_sample.detach().float() - mean.float()
    std_f = std_b.float()
    log_density = -(diff**2) / (2 * std_f**2) - torch.log(std_f) - 0.5 * math.log(2 * math.pi)
    log_prob = log_density.mean(dim=tuple(range(1, sample.ndim)))
    if return_gaussian:
        return prev_sample.type(sample.dtype), log_prob, mean, std.float()
    return prev_sample.type(sample.dtype), log_prob
