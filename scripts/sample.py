"""Sample an image grid from a base model plus a run's trained weights.

    python scripts/sample.py outputs/2026-11-25/10-00-00-000000 --prompts "a cat" "a dog" --seeds 0 1 2
    python scripts/sample.py <run dir> --baseline        # also the base model, same seeds, for comparison

The base model is the run's own model config (from <run>/.hydra/config.yaml) unless --model-path
is given. The trained weights are <run>/final (LoRA in diffusers format, or a full UNet).
Rows are prompts (base, then trained, with --baseline), columns are seeds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_base(run_dir: str, model_path: str | None):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ddpo.models import load_stable_diffusion

    cfg = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
    if model_path:
        return load_stable_diffusion(model_path), cfg
    return instantiate(cfg.model), cfg


def apply_trained(pipe, run_dir: str) -> str:
    from diffusers import UNet2DConditionModel

    final = os.path.join(run_dir, "final")
    if os.path.isfile(os.path.join(final, "pytorch_lora_weights.safetensors")):
        pipe.load_lora_weights(final)
        return "LoRA"
    if os.path.isdir(os.path.join(final, "unet")):
        pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(final, "unet"))
        return "full UNet"
    raise SystemExit(f"error: no trained weights in {final} (has the run finished?)")


def sample_rows(pipe, prompts, seeds, cfg, device):
    import torch

    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator(device=device).manual_seed(seed)
            out = pipe(
                prompt,
                num_inference_steps=cfg.sample.num_steps,
                guidance_scale=cfg.sample.guidance_scale,
                eta=cfg.sample.eta,
                height=cfg.model.resolution,
                width=cfg.model.resolution,
                generator=generator,
                output_type="pil",
            )
            row.append(out.images[0])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's output directory")
    parser.add_argument("--prompts", nargs="+", default=["a cat", "a dog", "a horse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--model-path", help="base model (hub id or directory) instead of the run's own")
    parser.add_argument("--baseline", action="store_true", help="also sample the base model")
    parser.add_argument("--out", help="output PNG (default <run>/samples.png)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler

    from ddpo.logging import image_grid

    pipe, cfg = load_base(args.run_dir, args.model_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    images, captions = [], []
    if args.baseline:
        for prompt, row in zip(args.prompts, sample_rows(pipe, args.prompts, args.seeds, cfg, args.device)):
            images += row
            captions += [f"base | {prompt} | seed {s}" for s in args.seeds]
    kind = apply_trained(pipe, args.run_dir)
    pipe.to(args.device)
    for prompt, row in zip(args.prompts, sample_rows(pipe, args.prompts, args.seeds, cfg, args.device)):
        images += row
        captions += [f"trained | {prompt} | seed {s}" for s in args.seeds]
    out = args.out or os.path.join(args.run_dir, "samples.png")
    grid = image_grid(images, captions, tile=min(256, cfg.model.resolution * 4), columns=len(args.seeds))
    grid.save(out)
    print(f"{len(images)} images ({kind} from {args.run_dir}/final) -> {out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
