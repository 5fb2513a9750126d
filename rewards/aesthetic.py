"""LAION aesthetic predictor v2: an MLP head on OpenAI CLIP ViT-L/14 image embeddings (1-10 scale).

The head file ``sac+logos+ava1-l14-linearMSE.pth`` is fetched once into a cache dir and checked
against its published sha256 before it is used; a local copy can be given with
``reward.head_path`` and a local CLIP checkpoint with ``reward.clip_pretrained`` for machines
without internet. ``clip_model: tiny-test`` swaps in a small random CLIP (tests, no download).
"""

from __future__ import annotations

from pathlib import Path

from ddpo.errors import ConfigError

from .base import ModelReward, as_reward_tensor, check_images, first_line, freeze, open_clip_image_size
from .download import HubSource, UrlSource, default_cache_dir, fetch_verified, verify_sha256

HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
HEAD_SIZE = 3_714_759
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILENAME}"
HEAD_HUB_REPO = "trl-lib/ddpo-aesthetic-predictor"
HEAD_HUB_FILENAME = "aesthetic-model.pth"
PREPROCESS_MODES = ("pil", "tensor")

_HEAD_FIX = f"set reward.head_path=/path/to/{HEAD_FILENAME}"


def resolve_head_path(
    head_path=None,
    *,
    sha256: str | None = HEAD_SHA256,
    cache_dir=None,
    url: str | None = HEAD_URL,
    hub_repo: str | None = HEAD_HUB_REPO,
    hub_filename: str = HEAD_HUB_FILENAME,
    hub_revision: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """The verified head file: ``head_path`` if given, else the cached copy, else a fresh download."""
    size = HEAD_SIZE if sha256 is not None and sha256.lower() == HEAD_SHA256 else None
    if head_path is not None:
        path = Path(head_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"aesthetic head file not found: {path}; {_HEAD_FIX}")
        verify_sha256(
            path, sha256, size, "aesthetic head", f"{_HEAD_FIX} (or reward.head_sha256=null for your own head)"
        )
        return path
    sources = []
    if url:
        sources.append(UrlSource(url, timeout))
    if hub_repo:
        sources.append(HubSource(hub_repo, hub_filename, hub_revision))
    return fetch_verified(
        HEAD_FILENAME,
        cache_dir if cache_dir is not None else default_cache_dir(),
        sources,
        sha256=sha256,
        size=size,
        what="LAION aesthetic head",
        fix=_HEAD_FIX,
    )


def load_head(path):
    """The frozen :class:`AestheticHead` with the state dict of ``path`` (strict keys, CPU)."""
    import torch

    from .aesthetic_head import AestheticHead

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"cannot read the aesthetic head {path} ({first_line(error, 200)}); {_HEAD_FIX}") from None
    if not isinstance(state_dict, dict) or "layers.0.weight" not in state_dict:
        raise ConfigError(f"aesthetic head {path} is not an MLP state dict with layers.0.weight; {_HEAD_FIX}")
    head = AestheticHead(input_dim=int(state_dict["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"aesthetic head {path} does not fit the MLP ({first_line(error, 200)}); {_HEAD_FIX}"
        ) from None
    return freeze(head.float())


class AestheticReward(ModelReward):
    """LAION aesthetic score (1-10) of each image; prompts are ignored.

    Args:
        clip_model: open_clip architecture (``ViT-L-14``), or ``tiny-test`` (random, no download).
        clip_pretrained: open_clip tag (``openai``), a local checkpoint file, or None (random).
        quick_gelu: build CLIP with QuickGELU, as the OpenAI weights were trained.
        head_path: local head file; None downloads it into ``cache_dir``.
        head_sha256: expected sha256 of the head; None skips the check (your own head).
        head_url, head_hub_repo, head_hub_filename, head_hub_revision: download sources, in order.
        cache_dir: where the downloaded head is kept (default ``$XDG_CACHE_HOME/ddpo``).
        download_timeout: seconds for each socket operation of the URL download.
        preprocess: ``pil`` (the original preprocessing) or ``tensor`` (differentiable) for ``__call__``.
        dtype: the dtype CLIP scores in (``fp32``; ``bf16``/``fp16`` save memory); the head stays fp32.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        quick_gelu: bool = True,
        head_path: str | None = None,
        head_sha256: str | None = HEAD_SHA256,
        head_url: str | None = HEAD_URL,
        head_hub_repo: str | None = HEAD_HUB_REPO,
        head_hub_filename: str = HEAD_HUB_FILENAME,
        head_hub_revision: str | None = None,
        cache_dir: str | None = None,
        download_timeout: float = 60.0,
        preprocess: str = "pil",
        dtype: str = "fp32",
    ):
        from .open_clip_models import create_open_clip

        super().__init__(dtype)
        if preprocess not in PREPROCESS_MODES:
            raise ConfigError(f"reward.preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        self.preprocess = preprocess
        # the cheap, most likely failure first: no head file and no way to download it
        head_file = resolve_head_path(
            head_path,
            sha256=head_sha256,
            cache_dir=cache_dir,
            url=head_url,
            hub_repo=head_hub_repo,
            hub_filename=head_hub_filename,
            hub_revision=head_hub_revision,
            timeout=download_timeout,
        )
        self.head = load_head(head_file)
        self.clip = create_open_clip(clip_model, clip_pretrained, quick_gelu=quick_gelu)
        embed_dim = getattr(self.clip.visual, "output_dim", None)
        head_dim = self.head.layers[0].in_features
        if embed_dim is not None and embed_dim != head_dim:
            raise ConfigError(
                f"reward.clip_model={clip_model} embeds images in {embed_dim} dims but the aesthetic head "
                f"expects {head_dim}; use a ViT-L-14 (768-dim) CLIP or a matching head"
            )
        self.image_size = open_clip_image_size(self.clip)

    @property
    def model(self):
        return self.clip

    def to(self, device, dtype=None):
        super().to(device, dtype)
        self.head.to(self.device)  # tiny: stays float32 for accurate scores
        return self

    def _score_pixels(self, pixels):
        """Scores of normalised CLIP pixels (B, 3, S, S), on the reward's device, float32."""
        embeddings = self.clip.encode_image(pixels.to(self.device, self.dtype)).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return self.head(embeddings)

    def pixels(self, images, preprocess: str | None = None):
        """The normalised CLIP input of ``images`` by the ``pil`` or ``tensor`` path (float32)."""
        from .clip_preprocess import preprocess_pil, preprocess_tensor

        if (preprocess or self.preprocess) == "pil":
            return preprocess_pil(images, self.image_size)
        return preprocess_tensor(images.to(self.device), self.image_size)

    def score_with_grad(self, images, prompts, metadata):
        """Differentiable scores (B,) on the reward's device (float32), for reward-backpropagation
        methods: always the ``tensor`` preprocessing; prompts and metadata are ignored."""
        check_images(images)
        return self._score_pixels(self.pixels(images, "tensor"))

    def __call__(self, images, prompts, metadata):
        import torch

        check_images(images)
        with torch.no_grad():
            scores = self._score_pixels(self.pixels(images))
        return as_reward_tensor(scores, images.shape[0], self.name), {}
