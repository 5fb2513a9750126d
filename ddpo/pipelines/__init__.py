from ddpo.pipelines.base import DDPOPipeline, Rollout
from ddpo.pipelines.flow import FlowMatchingDDPOPipeline
from ddpo.pipelines.sdxl import StableDiffusionXLDDPOPipeline
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

__all__ = [
    "DDPOPipeline",
    "FlowMatchingDDPOPipeline",
    "Rollout",
    "StableDiffusionDDPOPipeline",
    "StableDiffusionXLDDPOPipeline",
]
