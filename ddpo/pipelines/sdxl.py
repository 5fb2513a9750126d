"""DDPO on Stable Diffusion XL components from diffusers (base model: two text encoders, added conditioning).

What differs from SD 1.x/2.x (``StableDiffusionDDPOPipeline``, whose structure, LoRA set-up, mixed
precision, attention switches, reference policy and full fine-tuning export this class inherits):

- conditioning: both text encoders' penultimate hidden states, concatenated (``prompt_embeds``), the
  second encoder's projected output (``pooled_prompt_embeds``) and the six micro-conditioning ids
  (``add_time_ids``: original size, crop top-left, target size; here (H, W, 0, 0, H, W)), as diffusers'
  ``StableDiffusionXLPipeline`` computes them by default;
- guidance: the negative is what that pipeline uses with no negative prompt: zeros for both the
  embeddings and the pooled embedding when the model's ``force_zeros_for_empty_prompt`` is set (SDXL
  base), otherwise the empty prompt encoded; the negative shares the prompt's time ids;
- decoding: the SDXL VAE's scaling (and ``latents_mean``/``latents_std`` if the VAE has them); a VAE with
  ``force_upcast`` stays in float32 under fp16 (SDXL's VAE overflows in fp16);
- LoRA export: ``StableDiffusionXLPipeline.save_lora_weights``, what ``StableDiffusionXLPipeline.load_lora_weights``
  reads.
"""

import os

import torch

from ddpo.errors import ConfigError
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

# DDIM keys an SDXL scheduler config may lack (an Euler scheduler made in code): SDXL's own values, not
# DDIM's defaults (x0 clipped to [-1, 1], a last step with alpha 1 and so no variance)
SDXL_DDIM_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


class StableDiffusionXLDDPOPipeline(StableDiffusionDDPOPipeline):
    """Wraps a diffusers ``StableDiffusionXLPipeline``; the scheduler is replaced by DDIM.

    Only the UNet is trained (LoRA on its attention projections, or all of it), as for SD.
    """

    accepts = ("StableDiffusionXLPipeline",)
    option = "sdxl"

    def __init__(self, components, *, mixed_precision: str = "no", **kwargs):
        from diffusers import DDIMScheduler

        from ddpo.pipelines.fit import mismatch, model_class

        why = mismatch(type(self), model_class(components))
        if why is not None:
            raise ConfigError(f"the model {why}")
        vae = components.vae
        # SDXL's VAE overflows in fp16: keep it in float32 (its own weights, not fp16-rounded ones)
        self.vae_upcast = mixed_precision == "fp16" and bool(vae.config.get("force_upcast", False))
        vae_state = dict(vae.state_dict()) if self.vae_upcast else None  # references, not copies
        super().__init__(components, mixed_precision=mixed_precision, **kwargs)
        if vae_state is not None:
            self.vae.to(dtype=torch.float32)
            self.vae.load_state_dict(vae_state)

        source = components.scheduler.config
        missing = {key: value for key, value in SDXL_DDIM_DEFAULTS.items() if key not in source}
        if missing:
            self.scheduler = DDIMScheduler.from_config(source, **missing)

        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer_2 = components.tokenizer_2
        self.text_encoder_2.requires_grad_(False).eval().to(self.device)
        if self.dtype != torch.float32:
            self.text_encoder_2.to(dtype=self.dtype)
        self.force_zeros_for_empty_prompt = bool(components.config.get("force_zeros_for_empty_prompt", True))

        unet_config = self.unet.config
        expected = self.unet.add_embedding.linear_1.in_features
        given = 6 * unet_config.addition_time_embed_dim + self.text_encoder_2.config.projection_dim
        if given != expected:
            raise ConfigError(
                f"this SDXL UNet expects {expected} added-conditioning features but 6 time ids and "
                f"text_encoder_2's projection give {given}: the model's components do not fit together"
            )

    # -- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def _embed_xl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, 77, D1 + D2), pooled_prompt_embeds (B, P)), as diffusers' encode_prompt."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # the second encoder's projected pooled output (text_embeds)
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, batch_size: int) -> torch.Tensor:
        """(original height, width, crop top, left, target height, width) for every sample."""
        size = self.resolution
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device)
        return ids.expand(batch_size, -1)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = self._embed_xl(prompts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "add_time_ids": self.time_ids(len(prompts))}

    def negative_conditioning(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) of the unconditional branch."""
        if self._negative_embeds is None:
            embeds, pooled = self._embed_xl([""])
            if self.force_zeros_for_empty_prompt:
                embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            self._negative_embeds = (embeds, pooled)
        embeds, pooled = self._negative_embeds
        return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    # -- the policy --------------------------------------------------------------------------
    CONDITIONING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")

    def unet_conditioning(self, conditioning, cfg):
        """SDXL's UNet also takes the pooled embeddings and the time ids (negatives first with CFG)."""
        embeds = conditioning["prompt_embeds"]
        pooled = conditioning["pooled_prompt_embeds"]
        time_ids = conditioning["add_time_ids"]
        if cfg:
            negative, negative_pooled = self.negative_conditioning(len(embeds))
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = latents.float()
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device).view(shape)
            std = torch.tensor(std, device=latents.device).view(shape)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        if self.vae_upcast:
            context = torch.autocast(self.device.type, enabled=False)
        else:
            context = self._autocast()
        with context:
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def export(self, directory: str) -> list[str]:
        if not self.use_lora:
            return super().export(directory)  # unet/, for UNet2DConditionModel.from_pretrained
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        os.makedirs(directory, exist_ok=True)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
        return [os.path.join(directory, "pytorch_lora_weights.safetensors")]
