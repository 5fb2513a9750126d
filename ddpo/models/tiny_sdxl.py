"""A small Stable Diffusion XL pipeline built from configs with a fixed seed: no file, no network.

The same design as the tiny SD model (``ddpo/models/tiny.py``: a shallow VAE, a small UNet with
cross-attention at the inner level only, 2-layer CLIP text encoders on the real CLIP vocabulary),
with SDXL's structure, so that every SDXL code path runs on a CPU in seconds:
- two text encoders, the second a ``CLIPTextModelWithProjection`` whose projected output is the
  pooled prompt embedding; the UNet attends to both encoders' penultimate hidden states, concatenated;
- a UNet with ``addition_embed_type="text_time"`` (pooled embedding + the six size/crop time ids);
- the VAE carries SDXL's latent scaling factor and ``force_upcast``;
- the scheduler is SDXL's: Euler, with the hub config's DDIM-relevant keys (no x0 clipping, final
  alpha not forced to one).
"""

from ddpo.models.tiny import TINY_UNET, TINY_VAE, clip_text_config, latent_size, seeded_init
from ddpo.models.tokenizer import build_clip_tokenizer

SDXL_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_VAE_SCALING_FACTOR = 0.13025
TIME_ID_DIM = 8  # addition_time_embed_dim: each of the 6 time ids is embedded in 8 sinusoidal features


def build_tiny_sdxl_pipeline(seed: int = 0, resolution: int = 64, text_dim: int = 32, text_dim_2: int = 32):
    """Return a ``StableDiffusionXLPipeline`` of tiny random modules (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    size = latent_size(resolution)

    def build():
        unet = UNet2DConditionModel(
            sample_size=size,
            cross_attention_dim=text_dim + text_dim_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_ID_DIM,
            projection_class_embeddings_input_dim=6 * TIME_ID_DIM + text_dim_2,
            **TINY_UNET,
        )
        vae = AutoencoderKL(
            sample_size=resolution, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True, **TINY_VAE
        )
        text_encoder = CLIPTextModel(clip_text_config(text_dim))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(text_dim_2, projection_dim=text_dim_2))
        return unet, vae, text_encoder, text_encoder_2

    unet, vae, text_encoder, text_encoder_2 = seeded_init(seed, build)
    return StableDiffusionXLPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
