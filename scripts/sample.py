"""Sample an image grid from a base model plus a run's trained weights.

    python scripts/sample.py outputs/2026-11-25/10-00-00-000000 --prompts "a cat" "a dog" --seeds 0 1 2
    python scripts/sample.py <run dir> --baseline        # also the base model, same seeds, for comparison

The base model is the run's own model config (from <run>/.hydra/config.yaml) unless --model-path
is given. The trained weights are <run>/final (LoRA in diffusers format, or a full UNet or transformer), or those of
a checkpoint when its directory (<run>/checkpoints/checkpoint_<epoch>) is given instead.
Rows are prompts (base, then trained, with --baseline), columns are seeds. A flow-matching run
(pipeline=flow_sde) is sampled as it is evaluated: diffusers' StableDiffusion3Pipeline, the Euler ODE
with the run's pipeline.eval_num_steps.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# the model loaders a run's config may name; anything else is refused (a config is data, not code)
KNOWN_LOADERS = {
    "ddpo.models.load_stable_diffusion": ("path", "revision", "variant"),
    "ddpo.models.tiny_model": ("path", "seed", "resolution", "prediction_type"),
    "ddpo.models.sd15_architecture": ("seed", "resolution"),
    "ddpo.models.load_stable_diffusion_xl": ("path", "revision", "variant"),
    "ddpo.models.tiny_sdxl_model": ("path", "seed", "resolution"),
    "ddpo.models.tiny_shapes_model": ("path", "resolution"),
    "ddpo.models.load_stable_diffusion_3": ("path", "revision", "variant", "drop_t5"),
    "ddpo.models.tiny_flow_model": ("path", "seed", "resolution", "drop_t5"),
    "ddpo.models.sd3_architecture": ("seed", "resolution"),
    "ddpo.models.tiny_shapes_flow_model": ("path", "resolution"),
}
FLOW_PIPELINE = "ddpo.pipelines.FlowMatchingDDPOPipeline"  # runs are sampled with diffusers' SD3 pipeline (ODE)


def is_flow(cfg) -> bool:
    return cfg.get("pipeline", {}).get("_target_") == FLOW_PIPELINE


def fail(message: str):
    raise SystemExit(f"error: {message}")


def locate(path: str) -> tuple[str, str]:
    """(run directory, directory of the trained weights) from a run or a checkpoint directory."""
    from ddpo.trainer import STATE_FILE

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        fail(f"{path}: no such directory (give a run directory or one of its checkpoints/checkpoint_* directories)")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(path)), path  # <run>/checkpoints/checkpoint_<epoch>
    return path, os.path.join(path, "final")


def load_base(run_dir: str, model_path: str | None):
    from omegaconf import OmegaConf

    from ddpo import models

    config_file = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.isfile(config_file):
        fail(f"{config_file} not found: {run_dir} is not a run directory of train.py")
    try:
        cfg = OmegaConf.load(config_file)
        model = OmegaConf.to_container(cfg.model, resolve=False)
    except Exception as exc:
        fail(f"cannot read {config_file} ({type(exc).__name__}: {exc})")
    if model_path:
        loader = models.load_stable_diffusion_3 if is_flow(cfg) else models.load_stable_diffusion
        return loader(model_path), cfg
    target = model.get("_target_")
    if target not in KNOWN_LOADERS:
        fail(
            f"{config_file}: model._target_={target!r} is not one of this project's model loaders "
            f"({', '.join(KNOWN_LOADERS)}); give the base model with --model-path"
        )
    kwargs = {key: model[key] for key in KNOWN_LOADERS[target] if key in model}
    bad = [key for key, value in kwargs.items() if not isinstance(value, (str, int, float, type(None)))]
    if bad:
        fail(f"{config_file}: model.{bad[0]} must be a plain value; give the base model with --model-path")
    return getattr(models, target.rsplit(".", 1)[1])(**kwargs), cfg


def apply_trained(pipe, weights_dir: str) -> str:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if os.path.isfile(os.path.join(weights_dir, "pytorch_lora_weights.safetensors")):
        pipe.load_lora_weights(weights_dir)
        return "LoRA"
    if os.path.isdir(os.path.join(weights_dir, "transformer")):
        pipe.transformer = SD3Transformer2DModel.from_pretrained(os.path.join(weights_dir, "transformer"))
        return "full transformer"
    if os.path.isdir(os.path.join(weights_dir, "unet")):
        pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(weights_dir, "unet"))
        return "full UNet"
    fail(f"no trained weights in {weights_dir} (has the run finished? a checkpoint directory works too)")


def sample_rows(pipe, prompts, seeds, cfg, device):
    import torch

    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator(device=device).manual_seed(seed)
            if is_flow(cfg):  # the flow pipeline's evaluation sampler: the ODE with eval_num_steps
                sampler = {
                    "num_inference_steps": cfg.pipeline.eval_num_steps,
                    "guidance_scale": cfg.pipeline.guidance_scale,
                    "max_sequence_length": cfg.pipeline.max_sequence_length,
                }
            else:
                sampler = {
                    "num_inference_steps": cfg.sample.num_steps,
                    "guidance_scale": cfg.sample.guidance_scale,
                    "eta": cfg.sample.eta,
                }
            out = pipe(
                prompt,
                height=cfg.model.resolution,
                width=cfg.model.resolution,
                generator=generator,
                output_type="pil",
                **sampler,
            )
            row.append(out.images[0])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's output directory, or one of its checkpoint directories")
    parser.add_argument("--prompts", nargs="+", default=["a cat", "a dog", "a horse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--model-path", help="base model (hub id or directory) instead of the run's own")
    parser.add_argument("--baseline", action="store_true", help="also sample the base model")
    parser.add_argument("--out", help="output PNG (default <run>/samples.png)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler

    from ddpo.logging import image_grid

    run_dir, weights_dir = locate(args.run_dir)
    pipe, cfg = load_base(run_dir, args.model_path)
    if not is_flow(cfg):  # DDPO's sampler; a flow model keeps its FlowMatchEulerDiscreteScheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    images, captions = [], []
    if args.baseline:
        for prompt, row in zip(args.prompts, sample_rows(pipe, args.prompts, args.seeds, cfg, args.device)):
            images += row
            captions += [f"base | {prompt} | seed {s}" for s in args.seeds]
    kind = apply_trained(pipe, weights_dir)
    pipe.to(args.device)
    for prompt, row in zip(args.prompts, sample_rows(pipe, args.prompts, args.seeds, cfg, args.device)):
        images += row
        captions += [f"trained | {prompt} | seed {s}" for s in args.seeds]
    out = args.out or os.path.join(run_dir, "samples.png")
    grid = image_grid(images, captions, tile=min(256, cfg.model.resolution * 4), columns=len(args.seeds))
    grid.save(out)
    print(f"{len(images)} images ({kind} from {weights_dir}) -> {out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
