"""Rewards from a transformers CLIP-style dual encoder: score = factor * cos(image, prompt).

Models and processors load by Hub id at a pinned revision, or from a local directory (anything
saved with ``save_pretrained``), for machines without internet. With HF_HUB_OFFLINE set only
the local Hugging Face cache is read.
"""

from __future__ import annotations

from pathlib import Path

from ddpo.errors import ConfigError

from .base import ModelReward, as_reward_tensor, check_images, first_line, freeze, to_pil_images


def load_pretrained(loader, path: str, revision: str | None, *, what: str, key: str):
    """``loader.from_pretrained`` of a local dir or a Hub id; a one-line ConfigError on failure."""
    from ddpo.network import work_offline_unless_hub_reachable

    from .download import hub_offline

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


def _not_differentiable(image_processor) -> str | None:
    """Why ``image_processor`` cannot preprocess tensors differentiably, or None when it can: transformers'
    torchvision backend (the default image processors of transformers 5) runs its resize, centre crop,
    rescale and normalisation as torch ops on tensors; a PIL/NumPy one does not."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # transformers < 5
        return f"{type(image_processor).__name__} (no torchvision backend in this transformers)"
    if not isinstance(image_processor, TorchvisionBackend):
        return f"{type(image_processor).__name__} (not transformers' torchvision backend)"
    return None


def _stacked(pixel_values):
    import torch

    return pixel_values if isinstance(pixel_values, torch.Tensor) else torch.stack(list(pixel_values))


class HFClipReward(ModelReward):
    """Base class: a transformers dual encoder (``get_image_features``/``get_text_features``).

    Subclasses set ``name`` and :meth:`factor`; ``info["cosine"]`` carries the raw cosine.
    ``__call__`` preprocesses with the model's own image processor (on PIL images);
    ``score_with_grad`` with the same processor on the float images (:meth:`tensor_pixels`), the rest
    is shared.
    """

    name = "hf_clip"
    differentiable = True

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
        self._not_differentiable = _not_differentiable(self.processor.image_processor)
        if self._not_differentiable:
            self.differentiable = False

    def factor(self):
        """Multiplier of the cosine similarity (float or 0-d tensor)."""
        return 1.0

    def _check(self, images, prompts):
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")

    def pil_pixels(self, images):
        """The processor's own preprocessing of ``images`` (uint8 PIL images in, CPU pixels out)."""
        return self.processor.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]

    def tensor_pixels(self, images):
        """The differentiable twin of :meth:`pil_pixels`: the same processor, with its own settings, on
        the float images scaled to its 0-255 input, in two calls so that the resized image is clamped to
        [0, 255] between them, as the PIL path's uint8 image is (bicubic overshoots); float32, on the
        images' device."""
        import torch

        if self._not_differentiable:
            raise NotImplementedError(
                f"reward {self.name!r}: its image processor is {self._not_differentiable}, "
                "so it has no differentiable scoring path"
            )
        processor = self.processor.image_processor
        common = {"input_data_format": "channels_first", "return_tensors": None}
        resized = processor(
            images=images.float() * 255.0, do_center_crop=False, do_rescale=False, do_normalize=False, **common
        )["pixel_values"]
        pixels = processor(images=_stacked(resized).clamp(0.0, 255.0), do_resize=False, **common)["pixel_values"]
        return _stacked(pixels).to(torch.float32)

    def _cosine_of_pixels(self, pixels, prompts):
        """cos(image, prompt) of preprocessed pixels, float32 on the reward's device (grad if pixels have)."""
        text = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        image_embeds = _embeddings(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        text_embeds = _embeddings(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
            )
        )
        image_embeds = image_embeds.float() / image_embeds.float().norm(dim=-1, keepdim=True)
        text_embeds = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
        return (image_embeds * text_embeds).sum(dim=-1)

    def cosine(self, images, prompts):
        """cos(image, prompt) of each pair, float32 on the reward's device (no grad)."""
        import torch

        self._check(images, prompts)
        with torch.no_grad():
            return self._cosine_of_pixels(self.pil_pixels(images), prompts)

    def score_with_grad(self, images, prompts, metadata):
        """factor * cos(image, prompt), (B,) float32 on the reward's device, differentiable w.r.t.
        ``images`` (torch-twin preprocessing); the model's parameters stay frozen."""
        self._check(images, prompts)
        cosine = self._cosine_of_pixels(self.tensor_pixels(images.to(self.device)), prompts)
        return (self.factor() * cosine).float()

    def __call__(self, images, prompts, metadata):
        import torch

        cosine = self.cosine(images, prompts)
        with torch.no_grad():
            scores = self.factor() * cosine
        batch = images.shape[0]
        return as_reward_tensor(scores, batch, self.name), {"cosine": as_reward_tensor(cosine, batch, "cosine")}
