"""The LAION aesthetic predictor v2 MLP head (imports torch; loaded lazily by rewards.aesthetic)."""

from __future__ import annotations

import torch
from torch import nn


class AestheticHead(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1 Linear layers with Dropout between, no activations.

    The layout (``layers.{0,2,4,6,7}`` Linear, ``layers.{1,3,5}`` Dropout) matches the state dict
    of ``sac+logos+ava1-l14-linearMSE.pth`` so that it loads with ``strict=True``. Input: the
    L2-normalised CLIP ViT-L/14 image embedding; output: a score on a 1-10 scale.
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)
