"""CLIP score: ``scale`` * cos(image, prompt) with a transformers CLIPModel of your choice.

With ``scale: 100`` this is the common "CLIPScore x 100" (torchmetrics' convention) without its
clamp at 0, so the reward keeps its sign and stays informative for poorly aligned images; with
``scale: 1`` it is the raw cosine. Any CLIP-style transformers model works: a Hub id at a pinned
revision or a local dir.
"""

from __future__ import annotations

from .hf_clip import HFClipReward

MODEL_PATH = "openai/clip-vit-large-patch14"
MODEL_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"


class ClipScore(HFClipReward):
    """Prompt-image alignment of each image.

    Args:
        model_path, model_revision: Hub id (at a pinned revision) or local dir of the CLIP model.
        processor_path, processor_revision: its processor; None uses the model's own.
        scale: multiplier of the cosine similarity (100 = CLIPScore x 100, 1 = raw cosine).
    """

    name = "clip_score"

    def __init__(
        self,
        model_path: str = MODEL_PATH,
        model_revision: str | None = MODEL_REVISION,
        processor_path: str | None = None,
        processor_revision: str | None = None,
        scale: float = 100.0,
        dtype: str = "fp32",
    ):
        self.scale = float(scale)
        super().__init__(model_path, model_revision, processor_path, processor_revision, dtype)

    def factor(self):
        return self.scale
