"""JPEG (in)compressibility rewards from the DDPO paper: the size of the image saved as JPEG."""

from __future__ import annotations

import io

from .base import Reward, as_reward_tensor, check_images, to_uint8_hwc


def jpeg_size_kb(images, quality: int = 95):
    """JPEG file size in kB (1000 bytes) of each image of a (B, 3, H, W) batch in [0, 1]."""
    from PIL import Image

    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return as_reward_tensor(sizes, len(sizes), "jpeg sizes")


class _JpegReward(Reward):
    sign = 1.0

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def __call__(self, images, prompts, metadata):
        check_images(images)
        size_kb = jpeg_size_kb(images, self.quality)
        return self.sign * size_kb, {"jpeg_kb": size_kb}


class JpegCompressibility(_JpegReward):
    """Reward = minus the JPEG size in kB: smaller files (simpler images) score higher."""

    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibility(_JpegReward):
    """Reward = the JPEG size in kB: larger files (more detail and noise) score higher."""

    name = "jpeg_incompressibility"
    sign = 1.0
