from ddpo.models.loading import (
    load_stable_diffusion,
    load_stable_diffusion_xl,
    sd15_architecture,
    tiny_model,
    tiny_sdxl_model,
    tiny_shapes_model,
)

__all__ = [
    "load_stable_diffusion",
    "load_stable_diffusion_xl",
    "sd15_architecture",
    "tiny_model",
    "tiny_sdxl_model",
    "tiny_shapes_model",
]
