"""FLUX.1 (dev, schnell) from diffusers: rectified flow sampled with Flow-GRPO's SDE, as the SD3 family.

FLUX is a flow-matching transformer like SD3, so everything that makes SD3 trainable here is shared,
not copied (``ddpo/pipelines/flow.py``: the SDE and ODE steps with their log probabilities, the SDE
window, branching, the forward process of NFT/AWM, the differentiable tail of DRaFT, the reference
for KL, export of full fine-tuning). What FLUX does differently, and this class adds:

- **packed latents**: the VAE's 16-channel latents are cut into 2x2 patches and packed into a
  sequence of 64-wide tokens (``FluxPipeline._pack_latents``), with per-token image ids for the
  rotary position embedding. The chain keeps the VAE's layout (B, 16, H, W), so the stored
  transitions, the SDE and the forward process are the SD3 family's; only the transformer's call
  packs its input and unpacks its output.
- **conditioning**: T5's hidden states (``max_sequence_length`` tokens; FLUX.1-dev uses 512,
  schnell 256) and CLIP's pooled output, from diffusers' ``FluxPipeline.encode_prompt``; the text
  ids are zeros, as diffusers sets them.
- **distilled guidance**: FLUX.1-dev was distilled to take the guidance scale as an input
  (``guidance_embeds``), so ``guidance_scale`` (3.5, diffusers' default) is fed to the transformer
  and no unconditional pass runs. True classifier-free guidance (``true_cfg_scale`` > 1; the
  negative is the empty prompt) is available, as in diffusers' ``FluxPipeline``, but off. schnell
  has no guidance input: the scale is ignored.
- **the schedule**: diffusers' FLUX sigmas, ``linspace(1, 1 / n, n)``, shifted by the resolution-
  dependent ``mu`` (``calculate_shift`` of the packed sequence length) when the scheduler uses
  dynamic shifting (dev), unshifted otherwise (schnell), or by a fixed ``shift`` if one is given
  (DanceGRPO's FLUX runs: 3); the transformer takes sigma as its timestep.

LoRA goes on the attention projections of both kinds of block (see ``LORA_TARGET_MODULES``). Export:
``FluxPipeline.save_lora_weights`` with the adapter's config, which ``FluxPipeline.load_lora_weights``
reads; a full fine-tune is ``transformer/`` (``FluxTransformer2DModel.from_pretrained``).
"""

import os

import numpy as np
import torch

from ddpo.errors import ConfigError
from ddpo.pipelines.flow import FlowMatchingDDPOPipeline, _Schedule

# LoRA: the flow family's targets (ddpo/pipelines/flow.py), which in FLUX are the attention projections of
# the double-stream blocks (image: to_q/k/v, to_out.0; text: add_*_proj, to_add_out) and of the
# single-stream blocks (their attn.to_q/k/v): the set diffusers' train_dreambooth_lora_flux.py adapts by
# default for attention.
PACK = 2  # FLUX packs 2x2 latent patches into one token


def with_fixed_shift(scheduler, shift: float | None):
    """The scheduler with a fixed ``shift`` instead of FLUX.1-dev's resolution-dependent one (DanceGRPO's 3 at
    every resolution), or itself when ``shift`` is None or already fixed at that value."""
    if shift is None or (not scheduler.config.get("use_dynamic_shifting") and scheduler.config.get("shift") == shift):
        return scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, use_dynamic_shifting=False, shift=shift)


class FluxDDPOPipeline(FlowMatchingDDPOPipeline):
    """Wraps a diffusers ``FluxPipeline``; its Euler steps become Flow-GRPO's SDE steps with log probabilities."""

    accepts = ("FluxPipeline",)
    option = "flux"
    trained_folder, trained_class = "transformer", "FluxTransformer2DModel"
    CONDITIONING_KEYS = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(
        self,
        components,
        *,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        max_sequence_length: int = 512,
        resolution: int | None = None,
        shift: float | None = None,
        lora_targets: list[str] | None = None,
        **kwargs,
    ):
        if not guidance_scale >= 0:  # NaN included
            raise ConfigError(f"pipeline.guidance_scale must be >= 0 (got {guidance_scale})")
        if shift is not None and not shift > 0:
            raise ConfigError(f"pipeline.shift must be > 0 or null (the scheduler's own shift; got {shift})")
        self.shift = shift
        if lora_targets is not None:  # e.g. DanceGRPO's image-stream-only targets
            if isinstance(lora_targets, str) or not lora_targets or not all(isinstance(t, str) for t in lora_targets):
                raise ConfigError(
                    f"pipeline.lora_targets must be a non-empty list of module names (got {lora_targets!r})"
                )
            self.lora_targets = [str(t) for t in lora_targets]
        self.distilled_guidance = float(guidance_scale)
        self._image_ids = None
        # the SD3 family's guidance is true CFG above 1: FLUX's is true_cfg_scale (off by default)
        super().__init__(
            components,
            guidance_scale=true_cfg_scale,
            max_sequence_length=max_sequence_length,
            resolution=resolution or 1024,  # diffusers' FluxPipeline default (128 x 8)
            **kwargs,
        )
        self.guidance_embeds = bool(self.transformer.config.get("guidance_embeds", False))

    # -- the family's structure ----------------------------------------------------------------
    @staticmethod
    def text_encoders_of(components) -> list:
        return [e for e in (components.text_encoder, components.text_encoder_2) if e is not None]

    @property
    def patch_size(self) -> int:
        return PACK  # the transformer's own patch size is 1: the 2x2 patches are packed outside it

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // (PACK * PACK)

    def _schedule(self, num_steps: int) -> _Schedule:
        """diffusers' FluxPipeline schedule: sigmas linspace(1, 1/n, n), shifted by mu (dynamic shifting), or
        by a fixed ``shift`` when one is given (DanceGRPO: shift 3 at every resolution)."""
        self.scheduler = with_fixed_shift(self.scheduler, self.shift)
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        return _Schedule(
            self.scheduler,
            num_steps,
            self.device,
            self.noise_level,
            self.sigma_schedule,
            self._dynamic_shift(),
            sigmas=sigmas,
        )

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.sd.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    # -- the transformer's call ------------------------------------------------------------------
    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """The packed tokens' position ids (row, column), as diffusers' FluxPipeline makes them."""
        if self._image_ids is None or self._image_ids.shape[0] != (height // PACK) * (width // PACK):
            from diffusers import FluxPipeline

            self._image_ids = FluxPipeline._prepare_latent_image_ids(
                1, height // PACK, width // PACK, self.device, torch.float32
            )
        return self._image_ids

    def denoiser_inputs(self, latents, timesteps, conditioning, cfg: bool) -> dict:
        """The transformer's keyword arguments: the SD3 family's (negatives first with true CFG), with the
        latents packed, their image ids, zero text ids, sigma as the timestep and the distilled guidance."""
        from diffusers import FluxPipeline

        inputs = super().denoiser_inputs(latents, timesteps, conditioning, cfg)
        latents = inputs["hidden_states"]
        batch, channels, height, width = latents.shape
        embeds = inputs["encoder_hidden_states"]
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), self.distilled_guidance, device=latents.device, dtype=torch.float32)
        return {
            "hidden_states": FluxPipeline._pack_latents(latents, batch, channels, height, width),
            "timestep": inputs["timestep"] / 1000,  # the transformer takes sigma (it scales it by 1000 itself)
            "guidance": guidance,
            "encoder_hidden_states": embeds,
            "pooled_projections": inputs["pooled_projections"],
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=torch.float32),
            "img_ids": self.image_ids(height, width),
        }

    def unpacked(self, output: torch.Tensor) -> torch.Tensor:
        """Packed tokens (B, L, 4C) back to the VAE's latent layout (B, C, H, W)."""
        batch, _, width4 = output.shape
        side = self.resolution // self.vae_scale_factor
        channels = width4 // (PACK * PACK)
        output = output.view(batch, side // PACK, side // PACK, channels, PACK, PACK)
        return output.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, side, side)

    # -- export ------------------------------------------------------------------------------
    def export(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        if self.use_lora:
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            FluxPipeline.save_lora_weights(
                directory,
                transformer_lora_layers=get_peft_model_state_dict(self.transformer),
                # the adapter's config travels with the weights: load_lora_weights then uses this alpha
                transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
            return [os.path.join(directory, "pytorch_lora_weights.safetensors")]
        return self.export_full(directory)
