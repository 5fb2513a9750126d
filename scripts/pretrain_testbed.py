#!/usr/bin/env python
"""Build the testbed model (``model=tiny_testbed``): the shapes model taught a noisy colour word.

    python scripts/pretrain_testbed.py                  # writes ddpo/assets/tiny_testbed (about 15 min, 2 cores)

The testbed is a world in which the RL optimum is known and reachable. It starts from the shipped
shapes model (``ddpo/assets/tiny_shapes``, which draws colours right 99.6% of the time) and
fine-tunes its UNet and text encoder on the diffusion loss over renders of single objects and
counts ("a red circle", "three blue squares"), in which each scene's colour slips, at rate
``--slip`` (0.5), to its partner colour (``ddpo/shapes.py`` ``COLOUR_SLIP``: red -> yellow ->
green -> blue -> red) while the caption keeps the named one. The base therefore draws the named
colour about half of the time, at any guidance scale (guidance cannot tell a colour from its
partner: both are twice as likely given the caption as without it), and the exact checker says
which samples got it right. The RL optimum, always the named colour, is what the base drew before
the slip; nothing else about the images needs to change.

The same script is the design's check (README, "The testbed"): started from the testbed with
``--slip 0 --split train``, it is supervised fine-tuning on perfect renders of the RL training
captions, and its held-out accuracy (``pretrain.json``) says how far any method can move the
held-out metric with that data; ``--lr 0`` is its control.

Seeded and reproducible: the renders, slips and batches follow from ``--seed``. The VAE, the
tokenizer and the learned scorer (``reward=shape_proxy``) are the shapes model's, copied.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pretrain_tiny  # noqa: E402
import torch  # noqa: E402

from ddpo import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "ddpo" / "assets"
KINDS = ("single", "counting")


def testbed_scenes(split: str) -> dict[str, list]:
    """The testbed's scenes by kind: single objects and counts, of one split or of both ("all")."""
    by_kind: dict[str, list] = {}
    for scene in shapes.all_scenes():
        if scene.kind in KINDS and split in ("all", shapes.split(scene)):
            by_kind.setdefault(scene.kind, []).append(scene)
    return by_kind


def build_dataset(count: int, seed: int, split: str, slip: float, size: int = 32):
    """``count`` renders (uint8 NHWC) with the scenes their captions name; a fraction ``slip`` of
    them drawn in the partner colour. Returns (images, captioned scenes, slipped flags)."""
    rng = random.Random(seed)
    by_kind = testbed_scenes(split)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    scenes, slips = [], []
    for i in range(count):
        scene = rng.choice(by_kind[rng.choice(KINDS)])
        slipped = rng.random() < slip
        images[i] = shapes.render_scene(shapes.slipped(scene) if slipped else scene, rng, size)
        scenes.append(scene)
        slips.append(slipped)
    return images, scenes, slips


def forget_paths(directory: Path) -> None:
    """Drop the ``_name_or_path`` that diffusers writes into saved configs (the folder it was loaded
    from, a path of the machine that built it): the shipped files name no machine's paths."""
    import json

    for path in [directory / "model_index.json", *directory.glob("*/config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def shown(path: Path) -> str:
    """A path as the record keeps it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", type=Path, default=ASSETS / "tiny_shapes", help="the model to start from")
    parser.add_argument("--out", type=Path, default=ASSETS / "tiny_testbed")
    parser.add_argument("--slip", type=float, default=0.5, help="the rate at which a render's colour slips")
    parser.add_argument(
        "--split", choices=("all", "train"), default="all", help="whose captions are rendered (train: the SFT check)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=30000, help="size of the rendered training set")
    parser.add_argument("--steps", type=int, default=2500, help="diffusion training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance scale of the final evaluation")
    parser.add_argument("--eval-seeds", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    if not 0 <= args.slip <= 1:
        parser.error(f"--slip must be in [0, 1] (got {args.slip})")
    if not (args.init_from / "model_index.json").is_file():
        parser.error(f"--init-from {args.init_from}: not a model folder (no model_index.json)")

    from ddpo.models.loading import load_stable_diffusion
    from ddpo.prompts import shapes_eval_prompts

    log = pretrain_tiny.log
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    timings, start = {}, time.time()
    log(f"rendering {args.images} images of {args.split} captions, colour slip {args.slip} (seed {args.seed})")
    images_uint8, scenes, slips = build_dataset(args.images, args.seed, args.split, args.slip)
    timings["data_s"] = time.time() - start
    log(f"{sum(slips)} of {len(slips)} renders slipped")

    pipe = load_stable_diffusion(str(args.init_from))
    _, latents = pretrain_tiny.load_vae(args.init_from / "vae", pretrain_tiny.to_tensor(images_uint8), device)
    stage = time.time()
    pipe.unet, pipe.text_encoder = pretrain_tiny.train_diffusion(
        latents, scenes, pipe.tokenizer, args, device, unet=pipe.unet, text_encoder=pipe.text_encoder
    )
    timings["diffusion_s"] = time.time() - stage

    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    stage = time.time()
    heldout = pretrain_tiny.evaluate_pipeline(
        pipe, args, device, prompts=shapes_eval_prompts("heldout", relations=0), eta=0.0
    )
    timings["eval_s"] = time.time() - stage
    timings["total_s"] = time.time() - start
    pretrain_tiny.log_heldout(heldout)

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    forget_paths(args.out)
    if (args.init_from / "scorer").is_dir() and args.init_from.resolve() != args.out.resolve():
        shutil.copytree(args.init_from / "scorer", args.out / "scorer", dirs_exist_ok=True)
    args.init_from = shown(args.init_from)
    pretrain_tiny.write_record(args, device, timings, heldout, argv, script="pretrain_testbed.py", slipped=sum(slips))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
