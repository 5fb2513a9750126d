from ddpo.pipelines.base import DDPOPipeline, Rollout
from ddpo.pipelines.flow import FlowMatchingDDPOPipeline
from ddpo.pipelines.flux import FluxDDPOPipeline
from ddpo.pipelines.sdxl import StableDiffusionXLDDPOPipeline
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

__all__ = [
    "DDPOPipeline",
    "FlowMatchingDDPOPipeline",
    "FluxDDPOPipeline",
    "Rollout",
    "StableDiffusionDDPOPipeline",
    "StableDiffusionXLDDPOPipeline",
]
