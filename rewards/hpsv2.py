"""Human Preference Score v2.1: a fine-tuned open_clip ViT-H-14; score = cos(image, prompt).

The architecture is created with ``pretrained=None`` (no base-weight download) and the HPS
checkpoint (``{"state_dict": ...}``) is loaded into it: from the Hub repo ``xswu/HPSv2`` at a
pinned revision, or from a local ``checkpoint_path``. The score is the cosine similarity of the
L2-normalised image and text features (the HPS convention, typically 0.2-0.35), not scaled by
the logit scale.
"""

from __future__ import annotations

import warnings

from ddpo.errors import ConfigError

from .base import ModelReward, as_reward_tensor, check_images, first_line, open_clip_image_size
from .clip_preprocess import RESIZE_MODES

HUB_REPO = "xswu/HPSv2"
HUB_FILENAME = "HPS_v2.1_compressed.pt"
HUB_REVISION = "697403c78157020a1ae59d23f111aa58ced35b0a"
_IGNORED_MISSING = {"logit_bias"}


def _checkpoint_file(checkpoint_path, hub_repo, hub_filename, hub_revision) -> str:
    from pathlib import Path

    from .download import hub_file

    fix = f"set reward.checkpoint_path=/path/to/{hub_filename}"
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"HPS v2 checkpoint not found: {path}; {fix}")
        return str(path)
    try:
        return hub_file(hub_repo, hub_filename, hub_revision)
    except Exception as error:
        raise ConfigError(
            f"HPS v2 checkpoint {hub_repo}/{hub_filename}@{hub_revision} is not in the Hugging Face cache and "
            f"could not be downloaded ({first_line(error, 200)}); download it with network access "
            f"(HF_HUB_OFFLINE unset) or {fix}"
        ) from None


def load_hps_state_dict(model, path: str, weights_only: bool = True) -> None:
    """Load an HPS checkpoint into ``model``; every model key must be present."""
    import torch

    fix = "set reward.checkpoint_path= to an HPS v2 checkpoint for this reward.clip_model"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        hint = (
            "" if not weights_only else " (reward.weights_only=false loads pickled objects: only for a file you trust)"
        )
        raise ConfigError(f"cannot read the HPS v2 checkpoint {path} ({first_line(error, 200)}){hint}; {fix}") from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ConfigError(f"HPS v2 checkpoint {path} holds no state dict; {fix}")
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ConfigError(
            f"HPS v2 checkpoint {path} does not fit the model ({first_line(error, 200)}); {fix}"
        ) from None
    missing = [key for key in result.missing_keys if key not in _IGNORED_MISSING]
    if missing:
        raise ConfigError(f"HPS v2 checkpoint {path} lacks {len(missing)} model weights (e.g. {missing[:3]}); {fix}")
    if result.unexpected_keys:
        warnings.warn(
            f"HPS v2 checkpoint {path}: ignored {len(result.unexpected_keys)} keys the model does not use "
            f"(e.g. {result.unexpected_keys[:3]})",
            stacklevel=2,
        )


class HPSv2(ModelReward):
    """HPS v2.1 preference score of each image for its prompt.

    Args:
        clip_model: open_clip architecture of the checkpoint (``ViT-H-14``; ``tiny-test`` in tests).
        checkpoint_path: local HPS checkpoint; None fetches ``hub_filename`` from ``hub_repo``.
        hub_repo, hub_filename, hub_revision: where the checkpoint lives on the Hub.
        weights_only: ``torch.load(weights_only=...)``; keep True unless you trust the file.
        resize: ``longest`` (HPS's evaluation transform: long side to 224, black padding) or
            ``shortest`` (short side, centre crop); the same for square images.
    """

    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        clip_model: str = "ViT-H-14",
        checkpoint_path: str | None = None,
        hub_repo: str = HUB_REPO,
        hub_filename: str = HUB_FILENAME,
        hub_revision: str | None = HUB_REVISION,
        weights_only: bool = True,
        resize: str = "longest",
        dtype: str = "fp32",
    ):
        from .open_clip_models import create_open_clip, open_clip_tokenizer

        super().__init__(dtype)
        if resize not in RESIZE_MODES:
            raise ConfigError(f"reward.resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        path = _checkpoint_file(checkpoint_path, hub_repo, hub_filename, hub_revision)
        self.model = create_open_clip(clip_model, None)
        load_hps_state_dict(self.model, path, weights_only)
        self.model.eval()
        self.tokenizer = open_clip_tokenizer(clip_model)
        self.image_size = open_clip_image_size(self.model)

    def _check(self, images, prompts):
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"hpsv2: {images.shape[0]} images but {len(prompts)} prompts")

    def pixels(self, images, preprocess: str = "pil"):
        """The normalised CLIP input of ``images``: ``pil`` (HPS's own) or its ``tensor`` twin."""
        from .clip_preprocess import preprocess_pil, preprocess_tensor

        if preprocess == "pil":
            return preprocess_pil(images, self.image_size, self.resize)
        return preprocess_tensor(images.to(self.device), self.image_size, self.resize)

    def _score_pixels(self, pixels, prompts):
        """cos(image, prompt) of normalised pixels, float32 on the reward's device (grad if pixels have)."""
        tokens = self.tokenizer(list(prompts))
        image_features = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
        text_features = self.model.encode_text(tokens.to(self.device)).float()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return (image_features * text_features).sum(dim=-1)

    def score_with_grad(self, images, prompts, metadata):
        """The HPS score, (B,) float32 on the reward's device, differentiable w.r.t. ``images``
        (torch-twin preprocessing); the model's parameters stay frozen."""
        self._check(images, prompts)
        return self._score_pixels(self.pixels(images, "tensor"), prompts)

    def __call__(self, images, prompts, metadata):
        import torch

        self._check(images, prompts)
        with torch.no_grad():
            scores = self._score_pixels(self.pixels(images, "pil"), prompts)
        return as_reward_tensor(scores, images.shape[0], self.name), {}
