from ddpo.pipelines.base import DDPOPipeline, SampleBatch
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

__all__ = ["DDPOPipeline", "SampleBatch", "StableDiffusionDDPOPipeline"]
