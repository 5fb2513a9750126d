"""CLIP image preprocessing, twice: the PIL path of the original predictors and a differentiable twin.

``pil``: uint8 (rounded) -> PIL bicubic resize -> centre crop (or zero pad) -> CLIP normalisation;
this is what the LAION aesthetic predictor and HPS v2 were trained and evaluated with.
``tensor``: the same geometry with ``torch.nn.functional.interpolate(mode="bicubic",
antialias=True)`` on float images, so gradients reach the pixels (reward backpropagation).
Both agree to within a few 1/255 steps in pixel space.

Resize modes: ``shortest`` resizes the short side to ``size`` and centre-crops (CLIP, LAION
aesthetic); ``longest`` resizes the long side to ``size`` and pads with black, centred (the HPS v2
evaluation transform). For square images both are the same plain resize.

transformers' CLIP image processors (``rewards.hf_clip``) resize the short side too, but may crop
to another size than they resize to and place the crop with ``int`` rather than ``round``:
:func:`preprocess_tensor` takes ``crop`` and ``crop_rounding="floor"`` for them.
"""

from __future__ import annotations

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest")
CROP_ROUNDINGS = ("round", "floor")


def resized_shape(height: int, width: int, size: int, mode: str = "shortest") -> tuple[int, int]:
    """(height, width) after resizing; ``shortest`` follows torchvision's Resize(int)."""
    if mode == "shortest":
        if height <= width:
            return size, int(size * width / height)
        return int(size * height / width), size
    if mode == "longest":
        scale = size / max(height, width)
        return round(height * scale), round(width * scale)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def _crop_offsets(height: int, width: int, size, rounding: str = "round") -> tuple[int, int]:
    """Top/left corner of the centred crop of ``size`` (an int or (height, width)): torchvision's
    ``round`` or transformers' ``floor``."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if rounding == "round":
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    if rounding == "floor":
        return int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    raise ValueError(f"crop rounding must be one of {CROP_ROUNDINGS}, got {rounding!r}")


def _pad_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Top/left padding that centres a height x width image on a size x size canvas."""
    return (size - height) // 2, (size - width) // 2


def _normalise(pixels, mean, std):
    import torch

    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def preprocess_pil(images, size: int = 224, mode: str = "shortest", mean=CLIP_MEAN, std=CLIP_STD):
    """(B, 3, H, W) in [0, 1] -> normalised float32 CPU pixels (B, 3, size, size), via PIL."""
    import numpy as np
    import torch
    from PIL import Image

    from .base import to_pil_images

    out = []
    for image in to_pil_images(images):
        new_h, new_w = resized_shape(image.height, image.width, size, mode)
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        if mode == "shortest":
            top, left = _crop_offsets(new_h, new_w, size)
            image = image.crop((left, top, left + size, top + size))
        else:
            top, left = _pad_offsets(new_h, new_w, size)
            canvas = Image.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(image, (left, top))
            image = canvas
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
    return _normalise(torch.stack(out), mean, std)


def preprocess_tensor(
    images,
    size: int = 224,
    mode: str = "shortest",
    mean=CLIP_MEAN,
    std=CLIP_STD,
    *,
    crop=None,
    crop_rounding: str = "round",
):
    """Differentiable twin of :func:`preprocess_pil`; stays on the images' device, float32.

    ``crop`` (``shortest`` mode only): the centre crop's size, an int or (height, width), no larger
    than the resized image; default ``size`` x ``size``. ``crop_rounding``: see :func:`_crop_offsets`.
    """
    import torch
    import torch.nn.functional as F

    from .base import check_images

    check_images(images)
    pixels = images.float()
    height, width = pixels.shape[-2:]
    new_h, new_w = resized_shape(height, width, size, mode)
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    # PIL stores the resized image as uint8, which clips bicubic overshoot: do the same
    pixels = pixels.clamp(0.0, 1.0)
    if mode == "shortest":
        crop_h, crop_w = (size, size) if crop is None else (crop, crop) if isinstance(crop, int) else tuple(crop)
        if crop_h > new_h or crop_w > new_w:
            raise ValueError(f"crop {crop_h}x{crop_w} is larger than the resized image {new_h}x{new_w}")
        top, left = _crop_offsets(new_h, new_w, (crop_h, crop_w), crop_rounding)
        pixels = pixels[..., top : top + crop_h, left : left + crop_w]
    else:
        if crop is not None:
            raise ValueError("crop is only used by the shortest resize mode")
        top, left = _pad_offsets(new_h, new_w, size)
        pixels = F.pad(pixels, (left, size - new_w - left, top, size - new_h - top), value=0.0)
    return _normalise(pixels, mean, std).to(torch.float32)
