"""A small Stable Diffusion pipeline built from configs with a fixed seed: no file, no network.

Built so that DDPO's learning is visible within minutes on a CPU:
- the VAE is shallow (one layer per level, no attention), so a decoded image is a
  near-local function of the latent and its JPEG size follows the latent's texture instead of
  being dominated by the random decoder's own patterns;
- the UNet is small (16x16 latents, cross-attention at the inner level only, where it is cheap)
  but is the same class and call signature as Stable Diffusion's, so LoRA targets the same
  projections;
- the text encoder is a 2-layer CLIP on the real CLIP vocabulary, so any prompt tokenises.
"""

import torch

from ddpo.errors import ConfigError
from ddpo.models.tokenizer import build_clip_tokenizer


def seeded_init(seed: int, build):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


# what the tiny SD and tiny SDXL models share (ddpo/models/tiny_sdxl.py adds SDXL's parts)
TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,
)


def clip_text_config(text_dim: int, **extra):
    """A 2-layer CLIP text encoder config on the real CLIP vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=text_dim,
        intermediate_size=4 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def latent_size(resolution: int) -> int:
    """The tiny models' latent side (the VAE downsamples by 4), after checking ``model.resolution``."""
    if resolution <= 0 or resolution % 8:
        raise ConfigError(f"model.resolution must be a positive multiple of 8 for the tiny model (got {resolution})")
    return resolution // 4


def build_tiny_pipeline(seed: int = 0, resolution: int = 64, text_dim: int = 32, prediction_type: str = "epsilon"):
    """Return a ``StableDiffusionPipeline`` of tiny random modules (deterministic in ``seed``).

    ``prediction_type`` is the scheduler's: ``epsilon`` (SD 1.x) or ``v_prediction`` (SD 2.x at 768 px);
    the random weights do not depend on it.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type must be epsilon or v_prediction (got {prediction_type!r})")
    size = latent_size(resolution)

    def build():
        unet = UNet2DConditionModel(sample_size=size, cross_attention_dim=text_dim, **TINY_UNET)
        vae = AutoencoderKL(sample_size=resolution, **TINY_VAE)
        text_encoder = CLIPTextModel(clip_text_config(text_dim))
        return unet, vae, text_encoder

    unet, vae, text_encoder = seeded_init(seed, build)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe
