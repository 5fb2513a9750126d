from ddpo.pipelines.base import DDPOPipeline, Rollout
from ddpo.pipelines.sdxl import StableDiffusionXLDDPOPipeline
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

__all__ = ["DDPOPipeline", "Rollout", "StableDiffusionDDPOPipeline", "StableDiffusionXLDDPOPipeline"]
