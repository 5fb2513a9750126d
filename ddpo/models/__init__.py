from ddpo.models.loading import load_stable_diffusion, sd15_architecture, tiny_model

__all__ = ["load_stable_diffusion", "sd15_architecture", "tiny_model"]
