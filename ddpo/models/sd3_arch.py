"""Stable Diffusion 3.5 Medium's transformer and VAE with random weights, from configs shipped as package data."""

from ddpo.errors import ConfigError
from ddpo.models.tiny import clip_text_config, seeded_init
from ddpo.models.tokenizer import build_clip_tokenizer

STAND_IN_WIDTH = 64  # the stand-in CLIP encoders' hidden width (their projections have the real widths)
CLIP_PROJECTIONS = (768, 1280)  # CLIP ViT-L/14 and OpenCLIP bigG/14: pooled 768 + 1280 = 2048


def build_sd3_architecture(seed: int = 0, resolution: int = 512):
    """A ``StableDiffusion3Pipeline`` with SD3.5 Medium's exact transformer and VAE (random weights, no
    download), for benchmarks; small stand-in CLIP encoders with the real output widths and no T5."""
    import json
    from importlib import resources

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    if resolution <= 0 or resolution % 16:
        raise ConfigError(f"model.resolution must be a positive multiple of 16 for SD3 (got {resolution})")
    folder = resources.files("ddpo.assets").joinpath("sd35m")

    def config(name: str) -> dict:
        return json.loads(folder.joinpath(f"{name}.json").read_text())

    def build():
        transformer = SD3Transformer2DModel.from_config({**config("transformer"), "sample_size": resolution // 8})
        vae = AutoencoderKL.from_config({**config("vae"), "sample_size": resolution})
        encoders = [
            CLIPTextModelWithProjection(clip_text_config(STAND_IN_WIDTH, projection_dim=width))
            for width in CLIP_PROJECTIONS
        ]
        return transformer, vae, *encoders

    transformer, vae, text_encoder, text_encoder_2 = seeded_init(seed, build)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        text_encoder_3=None,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config("scheduler")),
    )
