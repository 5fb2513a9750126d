"""A small Stable Diffusion 3 pipeline built from configs with a fixed seed: no file, no network.

The same design as the tiny SD model (``ddpo/models/tiny.py``: a shallow VAE, 2-layer CLIP text
encoders on the real CLIP vocabulary) with SD3's structure, so that every flow-matching code path
runs on a CPU in seconds:
- an ``SD3Transformer2DModel`` (MMDiT) of 2 joint blocks, the first with SD3.5's dual attention, RMS
  query/key norms, 2x2 patches over 16 latent channels;
- two CLIP text encoders with projections (their penultimate hidden states, concatenated and padded,
  and their pooled projections, concatenated, condition the transformer), and optionally a 2-layer
  T5 encoder (``with_t5``; its tokenizer is the CLIP tokenizer: the vocabulary matters, not the
  tokenizer's kind); without it diffusers' ``StableDiffusion3Pipeline`` feeds zeros in its place;
- the VAE has SD3's 16 latent channels, no (post-)quantisation convolutions, and SD3's latent
  scaling and shift factors;
- the scheduler is SD3.5's: ``FlowMatchEulerDiscreteScheduler`` with shift 3.
"""

from ddpo.models.tiny import TINY_VAE, clip_text_config, latent_size, seeded_init
from ddpo.models.tokenizer import build_clip_tokenizer

SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # stabilityai/stable-diffusion-3.5-medium
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # its vae/config.json
LATENT_CHANNELS = 16
TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_projection_dim=32,  # = heads x head dim: text tokens join the image tokens' width
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


def build_tiny_flow_pipeline(seed: int = 0, resolution: int = 64, text_dim: int = 32, with_t5: bool = True):
    """Return a ``StableDiffusion3Pipeline`` of tiny random modules (deterministic in ``seed``).

    ``with_t5=False`` leaves ``text_encoder_3`` and ``tokenizer_3`` out (diffusers then uses zeros);
    the other modules are the same either way.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    size = latent_size(resolution)
    joint_dim = 2 * text_dim  # the CLIP encoders' hidden states side by side; T5's width

    def build():
        transformer = SD3Transformer2DModel(
            sample_size=size,
            joint_attention_dim=joint_dim,
            pooled_projection_dim=2 * text_dim,
            pos_embed_max_size=max(size // 2, 8),
            **TINY_TRANSFORMER,
        )
        vae = AutoencoderKL(
            sample_size=resolution,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **{**TINY_VAE, "latent_channels": LATENT_CHANNELS},
            **SD3_VAE_FACTORS,
        )
        text_encoder = CLIPTextModelWithProjection(clip_text_config(text_dim, projection_dim=text_dim))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(text_dim, projection_dim=text_dim))
        t5_config = T5Config(
            vocab_size=49408, d_model=joint_dim, d_kv=16, d_ff=2 * joint_dim, num_layers=2, num_heads=4
        )
        text_encoder_3 = T5EncoderModel(t5_config)  # built either way: the other modules' weights do not depend on it
        return transformer, vae, text_encoder, text_encoder_2, text_encoder_3

    transformer, vae, text_encoder, text_encoder_2, text_encoder_3 = seeded_init(seed, build)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        text_encoder_3=text_encoder_3.eval() if with_t5 else None,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=build_clip_tokenizer() if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
    )
