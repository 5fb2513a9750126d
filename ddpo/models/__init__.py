from ddpo.models.loading import (
    load_stable_diffusion,
    load_stable_diffusion_3,
    load_stable_diffusion_xl,
    sd3_architecture,
    sd15_architecture,
    tiny_flow_model,
    tiny_model,
    tiny_sdxl_model,
    tiny_shapes_flow_model,
    tiny_shapes_model,
    tiny_testbed_model,
)

__all__ = [
    "load_stable_diffusion",
    "load_stable_diffusion_3",
    "load_stable_diffusion_xl",
    "sd3_architecture",
    "sd15_architecture",
    "tiny_flow_model",
    "tiny_model",
    "tiny_sdxl_model",
    "tiny_shapes_flow_model",
    "tiny_shapes_model",
    "tiny_testbed_model",
]
