"""Stable Diffusion 1.5's architecture with random weights, from configs shipped as package data."""

from ddpo.models.tiny import build_clip_tokenizer, seeded_init


def build_sd15_architecture(seed: int = 0, resolution: int = 512):
    """Stable Diffusion 1.5's exact architecture with random weights (no download), for benchmarks."""
    import json
    from importlib import resources

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = resources.files("ddpo.assets").joinpath("sd15")

    def config(name: str) -> dict:
        return json.loads(folder.joinpath(f"{name}.json").read_text())

    def build():
        unet = UNet2DConditionModel.from_config({**config("unet"), "sample_size": resolution // 8})
        vae = AutoencoderKL.from_config({**config("vae"), "sample_size": resolution})
        text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
        return unet, vae, text_encoder

    unet, vae, text_encoder = seeded_init(seed, build)
    return StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        scheduler=DDIMScheduler.from_config(config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
