"""The forward (noising) process of each model family, as pure functions of the schedule.

What forward-process RL (DiffusionNFT, AWM) and pretraining need: noise a clean latent x0 at a time
t, the network's regression target there, and the clean latent a network output implies. For every
parametrisation here x0 is affine in the network output at fixed (x_t, t):

- epsilon (DDPM: SD 1.x/2.x, SDXL): x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[t];
  x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a);
- v-prediction (SD 2.x 768, Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1 - a) x0; x0 = sqrt(a) x_t - sqrt(1 - a) v_hat;
- flow matching (rectified flow: SD3, FLUX): x_t = (1 - s) x0 + s eps, velocity target eps - x0 at
  sigma s (the model's timestep is 1000 s); x0 = x_t - s v_hat.

So a loss on x0 predictions, and mixtures of two policies' predictions with weights that sum to
one (DiffusionNFT's implicit policies), mean the same thing in every family.
"""

from __future__ import annotations

import torch


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (N,) shaped to broadcast over a batch of latents (N, ...), in float32."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


class EpsilonProcess:
    """DDPM's forward process for an epsilon- or v-predicting network; ``t``: integer timesteps."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: epsilon or v_prediction")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.prediction_type = prediction_type

    def _scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = _column(self.alphas_cumprod.to(t.device)[t.long()], like)
        return alpha.sqrt(), (1 - alpha).sqrt()

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._scales(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._scales(t, x0)
        return signal * noise - sigma * x0

    def noise_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.alphas_cumprod.to(t.device)[t.long()]).sqrt()

    def output_scale(self, t: torch.Tensor) -> torch.Tensor:
        """d x0 / d output per sample (N,): sigma / alpha for epsilon, sigma for v."""
        alpha = self.alphas_cumprod.to(t.device)[t.long()]
        sigma = (1 - alpha).sqrt()
        return sigma / alpha.sqrt() if self.prediction_type == "epsilon" else sigma

    def x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._scales(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * output) / signal
        return signal * x_t - sigma * output


class FlowProcess:
    """Rectified flow's forward process; ``t``: sigmas in [0, 1] (1 is pure noise)."""

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _column(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def noise_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - _column(t, x_t) * output
