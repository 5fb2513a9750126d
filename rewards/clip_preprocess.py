"""CLIP image preprocessing of the open_clip rewards (LAION aesthetic, HPS v2): open_clip's own eval
transform, on PIL images and, step by step, on tensors, so that gradients reach the pixels.

``pil``: uint8 (rounded) PIL images through ``open_clip.image_transform(size, is_train=False)``:
bicubic resize, centre crop (or pad), to tensor, normalisation with open_clip's OpenAI CLIP mean and
std. This is what the LAION aesthetic predictor and HPS v2 were trained and evaluated with.
``tensor``: the same transform's steps on the float images. Its resize, crop, pad and normalisation
are torchvision's, which take tensors and are differentiable (the resize is bicubic with antialiasing,
as PIL's); its conversions to RGB and to a tensor pass tensors through. Two things differ, so this
runs the steps one by one instead of calling the transform:

- after the resize the values are clamped to [0, 1], as PIL's uint8 result clips bicubic overshoot;
- open_clip's ``ResizeKeepRatio`` (the ``longest`` mode) reads a PIL image's ``size`` attribute, so
  its own ``get_params`` is given the tensor's size and torchvision resizes.

Both paths agree to within a few 1/255 steps in pixel space.

Resize modes: ``shortest`` resizes the short side to ``size`` and centre-crops (CLIP, LAION
aesthetic); ``longest`` resizes the long side to ``size`` and pads with black, centred (the HPS v2
evaluation transform). For square images both are the same plain resize.

transformers' CLIP rewards (``rewards.hf_clip``) run their own image processor on tensors instead.
"""

from __future__ import annotations

RESIZE_MODES = ("shortest", "longest")


def clip_transform(size: int = 224, mode: str = "shortest", mean=None, std=None):
    """open_clip's eval transform (a torchvision ``Compose``); ``mean``/``std`` default to open_clip's
    OpenAI CLIP constants."""
    import open_clip

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    return open_clip.image_transform(
        size,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN if mean is None else mean,
        std=open_clip.OPENAI_DATASET_STD if std is None else std,
        resize_mode=mode,
    )


def preprocess_pil(images, size: int = 224, mode: str = "shortest", mean=None, std=None):
    """(B, 3, H, W) in [0, 1] -> normalised float32 CPU pixels (B, 3, size, size), via PIL."""
    import torch

    from .base import to_pil_images

    transform = clip_transform(size, mode, mean, std)
    return torch.stack([transform(image) for image in to_pil_images(images)])


def preprocess_tensor(images, size: int = 224, mode: str = "shortest", mean=None, std=None):
    """Differentiable twin of :func:`preprocess_pil`; stays on the images' device, float32."""
    from types import SimpleNamespace

    import torch
    import torchvision.transforms.functional as TF
    from open_clip.transform import ResizeKeepRatio
    from torchvision.transforms import Resize

    from .base import check_images

    check_images(images)
    pixels = images.float()
    for step in clip_transform(size, mode, mean, std).transforms:
        if isinstance(step, ResizeKeepRatio):
            height, width = pixels.shape[-2:]
            new_size = step.get_params(SimpleNamespace(size=(width, height)), step.size, step.longest)
            pixels = TF.resize(pixels, new_size, step.interpolation, antialias=True).clamp(0.0, 1.0)
        elif isinstance(step, Resize):
            pixels = step(pixels).clamp(0.0, 1.0)
        else:
            pixels = step(pixels)
    return pixels.to(torch.float32)
