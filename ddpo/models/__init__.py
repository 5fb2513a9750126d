from ddpo.models.loading import load_stable_diffusion, tiny_model

__all__ = ["load_stable_diffusion", "tiny_model"]
