"""The reward base class and the image/tensor helpers every reward shares.

torch is imported inside the helpers so that importing a reward module stays cheap.
"""

from __future__ import annotations

from typing import Any


class Reward:
    """Base class of reward callables.

    Subclasses implement ``__call__(images, prompts, metadata) -> (rewards, info)`` (see the
    package docstring for shapes). Rewards that hold models override ``to``; the trainer calls
    it once after building the reward. The reward is never checkpointed by the trainer.

    Rewards that can give gradients (for reward-backpropagation methods: DRaFT, AlignProp) set
    ``differentiable = True`` and implement :meth:`score_with_grad`.
    """

    name: str = "reward"
    differentiable: bool = False

    def to(self, device: Any, dtype: Any = None) -> Reward:
        """Move the reward's models to ``device`` (and ``dtype``); cheap rewards do nothing."""
        return self

    def __call__(self, images, prompts, metadata):
        raise NotImplementedError

    def score_with_grad(self, images, prompts, metadata):
        """Differentiable rewards: a float32 (B,) tensor on the reward's device with a graph back to
        ``images`` ((B, 3, H, W) in [0, 1], on any device), equal to ``__call__``'s rewards up to the
        preprocessing (torch twin instead of PIL). The reward's own parameters get no gradient."""
        raise NotImplementedError(
            f"reward {self.name!r} ({type(self).__name__}) has no differentiable scoring path "
            "(differentiable=False): reward-gradient algorithms need a differentiable reward such as "
            "aesthetic, pickscore, clip_score, hpsv2 or shape_proxy"
        )

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ``ConfigError`` if this reward cannot score these prompts (called with a few
        prompts of the run's prompt set before anything is sampled); most rewards take any prompt."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ModelReward(Reward):
    """A reward scored by a frozen torch model held in ``self.model``.

    The model scores in ``dtype`` (float32 unless the reward's config says otherwise, as
    ddpo-pytorch scores its aesthetic reward): the run's mixed precision does not apply to rewards.
    ``to`` moves it to the device; the batch is then moved to ``self.device`` / ``self.dtype``.
    """

    model: Any = None

    def __init__(self, dtype: Any = "fp32"):
        import torch

        from ddpo.errors import ConfigError

        self.device = torch.device("cpu")
        try:
            self.dtype = resolve_dtype(dtype)
        except ValueError as error:
            raise ConfigError(f"reward.dtype: {error}") from None

    def to(self, device: Any, dtype: Any = None) -> ModelReward:
        import torch

        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype) or self.dtype
        self.model.to(self.device, self.dtype)
        return self


def open_clip_image_size(model) -> int:
    """The square input size of an open_clip model's image tower."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_images(images):
    """Validate a (B, 3, H, W) floating-point image batch and return it unchanged."""
    import torch

    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got {images.dtype}")
    return images


def to_uint8_hwc(images):
    """(B, 3, H, W) floats in [0, 1] -> numpy uint8 (B, H, W, 3), rounding to nearest."""
    import torch

    check_images(images)
    pixels = (images.detach().to("cpu", torch.float32) * 255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_pil_images(images) -> list:
    """(B, 3, H, W) floats in [0, 1] -> list of RGB PIL images (uint8, rounded)."""
    from PIL import Image

    return [Image.fromarray(array) for array in to_uint8_hwc(images)]


def as_reward_tensor(values, batch_size: int, what: str = "rewards"):
    """Turn per-image values into the 1-D float32 CPU tensor the trainer expects."""
    import torch

    tensor = torch.as_tensor(values).detach().to("cpu", torch.float32).reshape(-1)
    if tensor.numel() != batch_size:
        raise ValueError(f"{what}: expected {batch_size} values, got {tensor.numel()}")
    return tensor


def resolve_dtype(dtype):
    """Accept a torch dtype, None, or a name such as "fp16", "bf16", "float32"."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "no": torch.float32,
    }
    key = str(dtype).removeprefix("torch.").lower()
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[key]


def freeze(module):
    """Put a scoring model in eval mode with no trainable parameters; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def first_line(error: BaseException, limit: int = 300) -> str:
    """A one-line description of an exception, for one-line ConfigError messages."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
