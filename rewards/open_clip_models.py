"""Building frozen open_clip models for rewards, including the tiny random model tests use.

``model_name`` is an open_clip architecture (``ViT-L-14``, ``ViT-H-14``, ...) or one of
:data:`TINY_MODELS`: ``tiny-test`` is a 2-layer, 64-wide CLIP with the ViT-L-14 embedding size
(768, so the real LAION aesthetic head fits) and the real CLIP vocabulary size (so open_clip's
bundled tokenizer works). It is randomly initialised and needs no download; it is selected with
``clip_model: tiny-test`` in a reward's config.

``pretrained`` is an open_clip tag (``openai``, ``laion2b_s32b_b79k``, ...), a local checkpoint
file (for machines without internet), or None for random weights.
"""

from __future__ import annotations

import os

from ddpo.errors import ConfigError

from .base import first_line, freeze

TINY_MODELS = {
    "tiny-test": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith("~") or value.endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(value)


def create_open_clip(
    model_name: str,
    pretrained: str | None,
    *,
    quick_gelu: bool = False,
    model_key: str = "reward.clip_model",
    pretrained_key: str = "reward.clip_pretrained",
):
    """A frozen (eval, no grad) open_clip model on the CPU in float32; ConfigError on any load failure."""
    import open_clip

    checkpoint = None
    if pretrained is not None:
        pretrained = str(pretrained)
        if _looks_like_path(pretrained):
            checkpoint = os.path.expanduser(pretrained)
            if not os.path.isfile(checkpoint):
                raise ConfigError(
                    f"CLIP checkpoint file not found: {checkpoint}; set {pretrained_key}=/path/to/checkpoint "
                    f"(an open_clip checkpoint such as open_clip_pytorch_model.bin) or an open_clip tag"
                )

    overrides = {}
    architecture = model_name
    if model_name in TINY_MODELS:
        if pretrained is not None and checkpoint is None:
            raise ConfigError(
                f"{model_key}={model_name} is a random test model without pretrained tags; "
                f"set {pretrained_key}=null (or a local checkpoint file)"
            )
        architecture, overrides = "ViT-B-32", TINY_MODELS[model_name]
    elif model_name not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip architecture {model_name!r}; set {model_key}= one of open_clip.list_models() "
            f"or {sorted(TINY_MODELS)}"
        )
    elif pretrained is not None and checkpoint is None:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ConfigError(
                f"unknown open_clip pretrained tag {pretrained!r} for {model_name}; "
                f"set {pretrained_key}= one of {tags} or a local checkpoint file"
            )

    if pretrained is not None and checkpoint is None:
        from ddpo.network import work_offline_unless_hub_reachable

        work_offline_unless_hub_reachable()  # open_clip downloads tags through the Hugging Face cache
    try:
        model = open_clip.create_model(
            architecture,
            pretrained=checkpoint or pretrained,
            force_quick_gelu=quick_gelu,
            precision="fp32",
            device="cpu",
            **overrides,
        )
    except Exception as error:
        source = checkpoint or f"tag {pretrained!r} (downloaded through the Hugging Face cache)"
        raise ConfigError(
            f"could not load open_clip {model_name} weights from {source} ({first_line(error, 200)}); "
            f"download them once with network access (HF_HUB_OFFLINE unset) or set "
            f"{pretrained_key}=/path/to/open_clip_pytorch_model.bin"
        ) from None
    return freeze(model)


def open_clip_tokenizer(model_name: str):
    """open_clip's tokenizer for an architecture; the tiny models use the bundled CLIP BPE."""
    import open_clip

    if model_name in TINY_MODELS:
        return open_clip.SimpleTokenizer(context_length=TINY_MODELS[model_name]["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(model_name)
