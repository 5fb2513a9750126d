"""PickScore v1 (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

score = logit_scale.exp() * cos(image, prompt) (about 20-23 for typical images), as in the
model card. The processor comes from the CLIP-H base repo, the weights from PickScore_v1.
"""

from __future__ import annotations

from .hf_clip import HFClipReward

PROCESSOR_PATH = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_REVISION = "1c2b8495b28150b8a4922ee1c8edee224c284c0c"
MODEL_PATH = "yuvalkirstain/PickScore_v1"
MODEL_REVISION = "a4e4367c6dfa7288a00c550414478f865b875800"


class PickScore(HFClipReward):
    """PickScore of each image for its prompt.

    Args:
        model_path, model_revision: Hub id (at a pinned revision) or local dir of the model.
        processor_path, processor_revision: Hub id or local dir of the CLIP processor.
    """

    name = "pickscore"

    def __init__(
        self,
        model_path: str = MODEL_PATH,
        model_revision: str | None = MODEL_REVISION,
        processor_path: str = PROCESSOR_PATH,
        processor_revision: str | None = PROCESSOR_REVISION,
        dtype: str = "fp32",
    ):
        super().__init__(model_path, model_revision, processor_path, processor_revision, dtype)

    def factor(self):
        return self.model.logit_scale.detach().float().exp()
