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


def _field(value, key: str):
    """``value[key]`` of a size entry: a dict, a transformers ``SizeDict``, or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


def tensor_preprocessing(image_processor) -> tuple[dict | None, str | None]:
    """The :func:`rewards.clip_preprocess.preprocess_tensor` arguments that mirror a transformers
    CLIP image processor (bicubic resize of the short side, centre crop, rescale by 1/255, mean/std
    normalisation), or (None, why not) for a processor this torch twin does not reproduce."""
    if not getattr(image_processor, "do_rescale", True):
        return None, "do_rescale=False (pixels in 0-255 are not reproduced)"
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    if abs(rescale * 255 - 1) > 1e-6:
        return None, f"rescale_factor={rescale} (only 1/255 is reproduced)"
    spec = {"resize": None, "crop": None, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    if getattr(image_processor, "do_resize", True):
        size = getattr(image_processor, "size", None)
        shortest = size if isinstance(size, int) else _field(size, "shortest_edge")
        if not shortest or _field(size, "longest_edge"):
            return None, f"size={size} (only a shortest_edge resize is reproduced)"
        resample = getattr(image_processor, "resample", 3)
        if str(getattr(resample, "value", resample)).lower() not in ("3", "bicubic"):
            return None, f"resample={resample} (only bicubic is reproduced)"
        spec["resize"] = int(shortest)
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        if isinstance(crop, int):
            spec["crop"] = (crop, crop)
        elif _field(crop, "height") and _field(crop, "width"):
            spec["crop"] = (int(_field(crop, "height")), int(_field(crop, "width")))
        else:
            return None, f"crop_size={crop} (a height and a width are needed)"
    if getattr(image_processor, "do_normalize", True):
        spec["mean"] = tuple(float(x) for x in image_processor.image_mean)
        spec["std"] = tuple(float(x) for x in image_processor.image_std)
    return spec, None


class HFClipReward(ModelReward):
    """Base class: a transformers dual encoder (``get_image_features``/``get_text_features``).

    Subclasses set ``name`` and :meth:`factor`; ``info["cosine"]`` carries the raw cosine.
    ``__call__`` preprocesses with the model's own image processor (on PIL images);
    ``score_with_grad`` with its torch twin (:func:`tensor_preprocessing`), the rest is shared.
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
        self.tensor_spec, self._not_differentiable = tensor_preprocessing(self.processor.image_processor)
        if self.tensor_spec is None:
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
        """The differentiable twin of :meth:`pil_pixels` (float32, on the images' device)."""
        from .clip_preprocess import preprocess_tensor, resized_shape

        if self.tensor_spec is None:
            raise NotImplementedError(
                f"reward {self.name!r}: its image processor has {self._not_differentiable}, "
                "so it has no differentiable scoring path"
            )
        spec = self.tensor_spec
        height, width = images.shape[-2:]
        size = spec["resize"] or min(height, width)  # no resize: the short side keeps its length
        crop = spec["crop"] or resized_shape(height, width, size, "shortest")  # no crop: all of it
        return preprocess_tensor(images, size, "shortest", spec["mean"], spec["std"], crop=crop, crop_rounding="floor")

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
