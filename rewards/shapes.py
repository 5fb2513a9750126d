"""Rewards of the shapes world (ddpo/shapes.py): the exact checker and a learned proxy of it.

- ``ShapeAlignment`` (``reward=shape_alignment``): the programmatic checker. The reward is the
  fraction of the caption's attributes (colour, shape, count, and position for relations) the
  image gets right; ``info`` holds each attribute (1/0, NaN where the caption has no relation)
  and ``correct`` (all attributes right, GenEval's per-image accuracy).
- ``ShapeProxy`` (``reward=shape_proxy``): the probability that image and caption match
  according to ``ShapeScorer``, a small CNN trained by ``scripts/pretrain_tiny.py`` on renders
  only. It is a learned reward model with the usual blind spots: train on it and evaluate with
  the checker to watch proxy and gold diverge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .base import ModelReward, Reward, as_reward_tensor, check_images, to_uint8_hwc

SCORER_FILE = "model.safetensors"
SCORER_CONFIG = "config.json"


def scene_vector(scene):
    """A caption's scene as a fixed-length float vector (the scorer's text input).

    First object: colour, shape, count one-hots; second object: colour, shape one-hots (zeros for
    counting captions); relation one-hot with a last slot for "no relation".
    """
    import torch

    from ddpo import shapes

    colours, kinds, counts = list(shapes.COLOURS), list(shapes.SHAPES), list(shapes.NUMBER_WORDS)
    vector = torch.zeros(scene_vector_size())
    first = scene.specs[0]
    vector[colours.index(first.colour)] = 1
    vector[4 + kinds.index(first.shape)] = 1
    vector[7 + counts.index(first.count)] = 1
    if scene.relation is not None:
        second = scene.specs[1]
        vector[11 + colours.index(second.colour)] = 1
        vector[15 + kinds.index(second.shape)] = 1
        vector[18 + list(shapes.RELATIONS).index(scene.relation)] = 1
    else:
        vector[22] = 1
    return vector


def scene_vector_size() -> int:
    return 23


def _scorer_class():
    import torch
    from torch import nn

    class ShapeScorer(nn.Module):
        """A small CNN that reads a (B, 3, H, W) image in [0, 1] and a scene vector and returns the
        logit that they match. Two coordinate channels are added to the image so that the
        convolutions can tell left from right."""

        def __init__(self, width: int = 32, hidden: int = 128, size: int = 32):
            super().__init__()
            self.config = {"width": width, "hidden": hidden, "size": size}
            act = nn.GELU
            self.image = nn.Sequential(
                nn.Conv2d(5, width, 3, padding=1),
                act(),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                act(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                act(),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
                act(),
                nn.Flatten(),
                nn.Linear(2 * width * (size // 8) ** 2, hidden),
                act(),
            )
            self.text = nn.Sequential(nn.Linear(scene_vector_size(), hidden), act(), nn.Linear(hidden, hidden))
            self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), act(), nn.Linear(hidden, 1))

        def forward(self, images, vectors):
            b, _, h, w = images.shape
            ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
            xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
            features = self.image(torch.cat([images * 2 - 1, xs, ys], dim=1))
            text = self.text(vectors)
            return self.head(torch.cat([features, text, features * text], dim=1)).squeeze(1)

    return ShapeScorer


def ShapeScorer(**config):  # noqa: N802 (a class factory: torch is imported only when it is used)
    return _scorer_class()(**config)


def save_scorer(scorer, directory) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(directory / SCORER_FILE))
    (directory / SCORER_CONFIG).write_text(json.dumps(scorer.config, indent=2) + "\n")


def load_scorer(directory):
    """The scorer saved in ``directory`` (safetensors weights and a JSON config: nothing is unpickled)."""
    from safetensors.torch import load_file

    from ddpo.errors import ConfigError

    directory = Path(directory)
    if not (directory / SCORER_FILE).is_file() or not (directory / SCORER_CONFIG).is_file():
        raise ConfigError(
            f"no shape scorer in {directory} (expected {SCORER_FILE} and {SCORER_CONFIG}; "
            "scripts/pretrain_tiny.py writes them)"
        )
    scorer = ShapeScorer(**json.loads((directory / SCORER_CONFIG).read_text()))
    scorer.load_state_dict(load_file(str(directory / SCORER_FILE)))
    return scorer.eval().requires_grad_(False)


def default_scorer_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("ddpo.assets").joinpath("tiny_shapes", "scorer")))


def _scenes(prompts, name):
    from ddpo import shapes
    from ddpo.errors import ConfigError

    scenes = []
    for prompt in prompts:
        try:
            scenes.append(shapes.parse(prompt))
        except ValueError:
            raise ConfigError(
                f"reward {name!r} scores captions of the shapes grammar (prompt=shapes_train or "
                f"shapes_heldout); got the prompt {prompt!r}"
            ) from None
    return scenes


class ShapeAlignment(Reward):
    """The exact checker of ddpo/shapes.py as a reward (see the module docstring)."""

    name = "shape_alignment"

    def check_prompts(self, prompts):
        _scenes(prompts, self.name)

    def __call__(self, images, prompts, metadata):
        from ddpo import shapes

        check_images(images)
        scenes = _scenes(prompts, self.name)
        verdicts = [shapes.check(scene, shapes.detect(array)) for scene, array in zip(scenes, to_uint8_hwc(images))]
        n = len(verdicts)
        info = {"correct": as_reward_tensor([float(v.correct) for v in verdicts], n)}
        for attribute in shapes.ATTRIBUTES:
            values = [v.attributes.get(attribute) for v in verdicts]
            info[attribute] = as_reward_tensor([math.nan if x is None else float(x) for x in values], n)
        return as_reward_tensor([v.score for v in verdicts], n), info


class ShapeProxy(ModelReward):
    """The learned scorer's match probability as a reward (see the module docstring)."""

    name = "shape_proxy"
    differentiable = True

    def __init__(self, path: str | None = None, dtype="fp32"):
        super().__init__(dtype)
        self.model = load_scorer(Path(path).expanduser() if path else default_scorer_dir())

    def check_prompts(self, prompts):
        _scenes(prompts, self.name)

    def _logits(self, images, prompts):
        """The scorer's match logits, float32 on the reward's device (grad if ``images`` has)."""
        import torch

        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        size = self.model.config["size"]
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"{self.name}: the scorer reads {size}x{size} images, got {tuple(images.shape[-2:])}")
        vectors = torch.stack([scene_vector(scene) for scene in _scenes(prompts, self.name)])
        return self.model(images.to(self.device, self.dtype), vectors.to(self.device, self.dtype)).float()

    def score_with_grad(self, images, prompts, metadata):
        """sigmoid(logit), (B,) float32 on the reward's device, differentiable w.r.t. ``images``."""
        import torch

        return torch.sigmoid(self._logits(images, prompts))

    def __call__(self, images, prompts, metadata):
        import torch

        with torch.no_grad():
            logits = self._logits(images, prompts)
        probability = torch.sigmoid(logits)
        return as_reward_tensor(probability, len(prompts)), {"proxy_logit": as_reward_tensor(logits, len(prompts))}
