"""A small FLUX.1 pipeline built from configs with a fixed seed: no file, no network.

The same design as the tiny SD3 model (``ddpo/models/tiny_flow.py``) with FLUX's structure, so that
every FLUX code path runs on a CPU in seconds:
- a ``FluxTransformer2DModel`` of one double-stream and one single-stream block, 2 heads of 16 with
  rotary axes 4/6/6, over packed 2x2 patches of 16 latent channels (``in_channels`` 64), with
  FLUX.1-dev's distilled guidance embedding (``guidance_embeds``; ``guidance=False`` builds a
  schnell-like model without it);
- a 2-layer CLIP text encoder (its pooled output conditions the transformer) and a 2-layer T5 encoder
  (its hidden states are the text tokens), both on the real CLIP vocabulary and its tokenizer (the
  vocabulary matters, not the tokenizer's kind);
- the VAE has FLUX's 16 latent channels, no (post-)quantisation convolutions, and FLUX's latent
  scaling and shift factors;
- the scheduler is FLUX.1-dev's (``ddpo/assets/flux1_dev/scheduler.json``: dynamic shifting).
"""

import json
from importlib import resources

from ddpo.models.tiny import TINY_VAE, clip_text_config, latent_size, seeded_init
from ddpo.models.tokenizer import build_clip_tokenizer

FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1-dev's vae/config.json
LATENT_CHANNELS = 16
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,  # 2x2 packed patches
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),  # sums to the head dim, as FLUX's 16 + 56 + 56 = 128
)


def flux_config(name: str) -> dict:
    """One of FLUX.1-dev's published configs shipped in ``ddpo/assets/flux1_dev``."""
    folder = resources.files("ddpo.assets").joinpath("flux1_dev")
    return json.loads(folder.joinpath(f"{name}.json").read_text())


def _flux_pipeline(transformer, vae, text_encoder, text_encoder_2):
    """A ``FluxPipeline`` of built modules (eval mode), CLIP tokenizers for both encoders, FLUX.1-dev's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux_config("scheduler")),
    )


def build_tiny_flux_pipeline(seed: int = 0, resolution: int = 64, text_dim: int = 32, guidance: bool = True):
    """Return a ``FluxPipeline`` of tiny random modules (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    latent_size(resolution)  # checks the resolution (a multiple of 8: latents / 4, packed by 2)
    t5_dim = 2 * text_dim

    def build():
        transformer = FluxTransformer2DModel(
            joint_attention_dim=t5_dim,
            pooled_projection_dim=text_dim,
            guidance_embeds=guidance,
            **TINY_FLUX_TRANSFORMER,
        )
        vae = AutoencoderKL(
            sample_size=resolution,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **{**TINY_VAE, "latent_channels": LATENT_CHANNELS},
            **FLUX_VAE_FACTORS,
        )
        text_encoder = CLIPTextModel(clip_text_config(text_dim))
        t5_config = T5Config(vocab_size=49408, d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=2, num_heads=4)
        return transformer, vae, text_encoder, T5EncoderModel(t5_config)

    return _flux_pipeline(*seeded_init(seed, build))


def build_flux_architecture(
    seed: int = 0, resolution: int = 1024, num_layers: int | None = None, num_single_layers: int | None = None
):
    """A ``FluxPipeline`` with FLUX.1-dev's exact transformer and VAE (random weights, no download), for
    benchmarks; small stand-in CLIP and T5 encoders (2 and 1 layers) with the real output widths (pooled
    768, T5 4096).

    ``num_layers`` / ``num_single_layers`` (None: FLUX.1-dev's 19 and 38) build fewer blocks of the real
    width: the full 12B transformer needs about 24 GB in bf16 and 48 GB in float32, more than a laptop
    holds, and its time and memory grow block by block.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from ddpo.errors import ConfigError

    if resolution <= 0 or resolution % 16:
        raise ConfigError(f"model.resolution must be a positive multiple of 16 for FLUX (got {resolution})")
    config = flux_config("transformer")
    for key, value in (("num_layers", num_layers), ("num_single_layers", num_single_layers)):
        if value is not None:
            if value < 0:
                raise ConfigError(f"model.{key} must be >= 0 (got {value}); null = FLUX.1-dev's {config[key]}")
            config[key] = int(value)

    def build():
        transformer = FluxTransformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config({**flux_config("vae"), "sample_size": resolution})
        # FluxPipeline reads CLIP's pooled output (its hidden width: 768 for ViT-L/14) and T5's hidden states
        clip = CLIPTextModel(clip_text_config(config["pooled_projection_dim"]))
        t5 = T5Config(
            vocab_size=49408, d_model=config["joint_attention_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=2
        )
        return transformer, vae, clip, T5EncoderModel(t5)

    return _flux_pipeline(*seeded_init(seed, build))
