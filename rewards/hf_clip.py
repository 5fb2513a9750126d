"""Rewards from a transformers CLIP-style dual encoder: score = factor * cos(image, prompt).

Models and processors load by Hub id at a pinned revision, or from a local directory (anything
saved with ``save_pretrained``), for machines without internet. With HF_HUB_OFFLINE set only
the local Hugging Face cache is read.
"""

from __future__ import annotations

from pathlib import Path

from ddpo.errors import ConfigError
from rewards.base import ModelReward, as_reward_tensor, check_images, first_line, freeze, to_pil_images


def load_pretrained(loader, path: str, revision: str | None, *, what: str, key: str):
    """``loader.from_pretrained`` of a local dir or a Hub id; a one-line ConfigError on failure."""
    from ddpo.network import work_offline_unless_hub_reachable
    from rewards.download import hub_offline

    local = Path(str(path)).expanduser()
    if local.is_dir():
        source, kwargs = str(local), {}
    elif str(path).startswith(("/", ".", "~")):
        raise ConfigError(f"{what} directory not found: {local}; set {key}=/path/to/a/saved/model/dir or a Hub id")
    else:
        work_offline_unless_hub_reachable()
        source, kwargs = str(path), {"revision": revision, "local_files_only": hub_offline()}
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as error:
        raise ConfigError(
            f"could not load {what} {path!r} (revision {revision}) ({first_line(error, 200)}); download it with "
            f"network access (HF_HUB_OFFLINE unset) or set {key}=/path/to/a/local/copy"
        ) from None


def _embeddings(output):
    """transformers 5 returns model outputs from get_*_features; older versions return tensors."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class HFClipReward(ModelReward):
    """Base class: a transformers dual encoder (``get_image_features``/``get_text_features``).

    Subclasses set ``name`` and :meth:`factor`; ``info["cosine"]`` carries the raw cosine.
    """

    name = "hf_clip"

    def __init__(
        self,
        model_path: str,
        model_revision: str | None = None,
        processor_path: str | None = None,
        processor_revision: str | None = None,
        dtype: str = "fp32",
    ):
        from transformers import AutoModel, AutoProcessor

        super().__init__(dtype)
        if processor_path is None:
            processor_path, processor_revision = model_path, model_revision
        self.processor = load_pretrained(
            AutoProcessor,
            processor_path,
            processor_revision,
            what=f"{self.name} processor",
            key="reward.processor_path",
        )
        self.model = freeze(
            load_pretrained(AutoModel, model_path, model_revision, what=f"{self.name} model", key="reward.model_path")
        )
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, method):
                raise ConfigError(f"reward.model_path={model_path} is not a CLIP-style model (no {method})")
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    def factor(self):
        """Multiplier of the cosine similarity (float or 0-d tensor)."""
        return 1.0

    def cosine(self, images, prompts):
        """cos(image, prompt) of each pair, float32 on the reward's device (no grad)."""
        import torch

        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        pixels = self.processor.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        text = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            image_embeds = _embeddings(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            text_embeds = _embeddings(
                self.model.get_text_features(
                    input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
                )
            )
            image_embeds = image_embeds.float() / image_embeds.float().norm(dim=-1, keepdim=True)
            text_embeds = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
            return (image_embeds * text_embeds).sum(dim=-1)

    def __call__(self, images, prompts, metadata):
        import torch

        cosine = self.cosine(images, prompts)
        with torch.no_grad():
            scores = self.factor() * cosine
        batch = images.shape[0]
        return as_reward_tensor(scores, batch, self.name), {"cosine": as_reward_tensor(cosine, batch, "cosine")}
