"""Sample an image grid from a base model plus a run's trained weights.

    ddpo-sample outputs/2026-11-25/10-00-00-000000 --prompts "a cat" "a dog" --seed-list 0 1 2
    ddpo-sample <run dir> --baseline        # also the base model, same seeds, for comparison
    ddpo-sample <run dir> --seeds 8         # seeds 0..7 of three prompts of the run's prompt set

(in a clone: ``python scripts/sample.py`` with the same arguments). The prompts are three of the
run's own prompt set (as ``export`` draws them) unless --prompts is given; the seeds are 0..N-1 with
--seeds N (default 4), or those of --seed-list.
The base model is the run's own model config (from <run>/.hydra/config.yaml) unless --model-path
is given. The trained weights are <run>/final (LoRA in diffusers format, or a full UNet or transformer), or those of
a checkpoint when its directory (<run>/checkpoints/checkpoint_<epoch>) is given instead.
Rows are prompts (base, then trained, with --baseline), columns are seeds. A flow-matching run
(pipeline=flow_sde, pipeline=flux) is sampled as it is evaluated: diffusers' StableDiffusion3Pipeline
or FluxPipeline, the Euler ODE with the run's pipeline.eval_num_steps (for FLUX, with its distilled
guidance, pipeline.true_cfg_scale and pipeline.shift as the run's pipeline uses them).
Everything it is given (seeds, device, --out, the run's config) is checked before a model is built:
a mistake ends in one line (``error: ...``, exit status 1).
"""

import argparse
import os

from ddpo import config  # imports neither torch nor diffusers
from ddpo.tools.common import OneLineParser, add_seed_options, fail, first_line, seeds_of

# the model loaders a run's config may name; anything else is refused (a config is data, not code)
KNOWN_LOADERS = {
    "ddpo.models.load_stable_diffusion": ("path", "revision", "variant"),
    "ddpo.models.tiny_model": ("path", "seed", "resolution", "prediction_type"),
    "ddpo.models.sd15_architecture": ("seed", "resolution"),
    "ddpo.models.load_stable_diffusion_xl": ("path", "revision", "variant"),
    "ddpo.models.tiny_sdxl_model": ("path", "seed", "resolution"),
    "ddpo.models.tiny_shapes_model": ("path", "resolution"),
    "ddpo.models.tiny_testbed_model": ("path", "resolution"),
    "ddpo.models.load_stable_diffusion_3": ("path", "revision", "variant", "drop_t5"),
    "ddpo.models.tiny_flow_model": ("path", "seed", "resolution", "drop_t5"),
    "ddpo.models.sd3_architecture": ("seed", "resolution"),
    "ddpo.models.tiny_shapes_flow_model": ("path", "resolution"),
    "ddpo.models.load_flux": ("path", "revision", "variant"),
    "ddpo.models.tiny_flux_model": ("path", "seed", "resolution", "guidance"),
    "ddpo.models.flux_architecture": ("seed", "resolution", "num_layers", "num_single_layers"),
}
FLOW_PIPELINE = "ddpo.pipelines.FlowMatchingDDPOPipeline"  # runs are sampled with diffusers' SD3 pipeline (ODE)
FLUX_PIPELINE = "ddpo.pipelines.FluxDDPOPipeline"  # runs are sampled with diffusers' FluxPipeline (ODE)
# the flow-matching pipelines (sampled with the diffusers pipeline's own Euler ODE, as they evaluate) and the
# loader of their base model when --model-path names it
FLOW_LOADERS = {FLOW_PIPELINE: "load_stable_diffusion_3", FLUX_PIPELINE: "load_flux"}
MAX_RESOLUTION = config.MAX_RESOLUTION  # the training config's limit on the image side (ddpo/config.py)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # what the grid is written as (PIL, by the extension)
# the sampler's settings in the run's config: DDIM as the run samples, the ODE as a flow run evaluates
DDIM_SAMPLER = {
    "num_inference_steps": "sample.num_steps",
    "guidance_scale": "sample.guidance_scale",
    "eta": "sample.eta",
}
FLOW_SAMPLER = {
    "num_inference_steps": "pipeline.eval_num_steps",
    "guidance_scale": "pipeline.guidance_scale",
    "max_sequence_length": "pipeline.max_sequence_length",
}
# FLUX: guidance_scale is its distilled guidance (FluxPipeline's too); true CFG is true_cfg_scale (off at 1)
FLUX_SAMPLER = {**FLOW_SAMPLER, "true_cfg_scale": "pipeline.true_cfg_scale"}
COUNTS = ("num_inference_steps", "max_sequence_length")  # the sampler settings that are positive integers
DEFAULT_PROMPTS = ["a cat", "a dog", "a horse"]  # when the run's prompt set cannot be built here
NUM_PROMPTS = 3  # prompts of the run's prompt set drawn when --prompts is not given
# prompt sets whose prompts may be drawn here, and their plain-value arguments (a run's config is data:
# nothing else is instantiated from it)
KNOWN_PROMPT_SETS = {
    "ddpo.prompts.SimpleAnimals": ("words_file",),
    "ddpo.prompts.ImagenetAnimals": ("words_file",),
    "ddpo.prompts.NounsActivities": ("nouns_file", "activities_file"),
    "ddpo.prompts.ShapesPrompts": ("split", "kinds"),
    "ddpo.prompts.FilePrompts": ("path",),
}


def pipeline_target(cfg) -> str | None:
    pipeline = cfg.get("pipeline")
    return pipeline.get("_target_") if hasattr(pipeline, "get") else None


def is_flow(cfg) -> bool:
    """A flow-matching run (SD3 or FLUX): sampled with its diffusers pipeline's ODE, not with DDIM."""
    return pipeline_target(cfg) in FLOW_LOADERS


def is_flux(cfg) -> bool:
    return pipeline_target(cfg) == FLUX_PIPELINE


def flux_shift(cfg, config_file: str = "the run's config") -> float | None:
    """A FLUX run's fixed ``pipeline.shift`` (None: FLUX's own, resolution-dependent shift), checked."""
    from omegaconf import OmegaConf

    try:
        shift = OmegaConf.select(cfg, "pipeline.shift", default=None)
    except Exception as exc:
        fail(f"{config_file}: pipeline.shift cannot be read ({first_line(exc)})")
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0):
        fail(f"{config_file}: pipeline.shift must be a number > 0 or null (got {shift!r})")
    return shift


def run_prompts(cfg, count: int = NUM_PROMPTS) -> tuple[list[str], str | None]:
    """(``count`` distinct prompts of the run's own prompt set (seeded draws), None), or
    (DEFAULT_PROMPTS, why the run's set could not be drawn from here)."""
    import random

    from omegaconf import OmegaConf

    from ddpo import prompts as prompt_sets

    try:
        node = OmegaConf.to_container(cfg.get("prompt") or {}, resolve=False)
    except Exception as exc:  # a prompt: node that is not a mapping
        return DEFAULT_PROMPTS[:count], f"its prompt: section cannot be read ({first_line(exc)})"
    target = node.get("_target_") if isinstance(node, dict) else None
    if target not in KNOWN_PROMPT_SETS:
        return DEFAULT_PROMPTS[:count], f"its prompt set {target!r} is not one of this project's"
    kwargs = {key: node[key] for key in KNOWN_PROMPT_SETS[target] if key in node}
    plain = (str, int, float, type(None))
    if not all(
        isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in kwargs.values()
    ):
        return DEFAULT_PROMPTS[:count], f"the arguments of its prompt set {target} are not plain values"
    try:
        prompt_set = getattr(prompt_sets, target.rsplit(".", 1)[1])(**kwargs)
    except Exception as exc:  # e.g. a prompt file that is not on this machine
        return DEFAULT_PROMPTS[:count], f"its prompt set {target} cannot be built here ({first_line(exc)})"
    rng, found = random.Random(0), []
    for _ in range(100 * count):
        prompt = prompt_set(rng)[0]
        if prompt not in found:
            found.append(prompt)
        if len(found) == count:
            break
    return found, None


# -- what is checked before a model is built ------------------------------------------------------------
def check_device(name: str, option: str = "--device") -> str:
    """A device this script can sample on and this machine has: cpu, cuda[:N] or mps."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        fail(f"{option} {name}: not a device (cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"{option} {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            fail(f"{option} {name}: MPS is not available on this machine (use --device cpu)")
    elif device.type != "cpu":
        fail(f"{option} {name}: this script samples on cpu, cuda, cuda:N or mps")
    return name


def check_image_out(path: str, option: str = "--out") -> str:
    """A path the grid can be written to: an image extension, in a folder that exists, not a folder itself."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        fail(f"{option} {path} is a directory: give the image file to write (e.g. {os.path.join(path, 'samples.png')})")
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        fail(f"{option} {path}: the grid is written as an image; end the name in {', '.join(IMAGE_EXTENSIONS)}")
    if not os.path.isdir(os.path.dirname(path)):
        fail(f"{option} {path}: no such directory {os.path.dirname(path)}")
    if not os.access(os.path.dirname(path), os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        fail(f"{option} {path}: not writable")
    return path


def read_config(run_dir: str):
    """The run's composed config (<run>/.hydra/config.yaml), or one line saying why it cannot be read."""
    from omegaconf import DictConfig, OmegaConf

    config_file = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.isfile(config_file):
        fail(f"{config_file} not found: {run_dir} is not a run directory of train.py")
    try:
        cfg = OmegaConf.load(config_file)
    except Exception as exc:  # YAML, encoding or file errors: all mean "cannot read this config"
        fail(f"cannot read {config_file} ({first_line(exc)})")
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
        fail(f"cannot read {config_file} (no model: section)")
    return cfg


def check_resolution(cfg, config_file: str) -> int:
    """``model.resolution``, an integer in (0, MAX_RESOLUTION]; its divisibility is the model's to check."""
    try:
        resolution = cfg.model.get("resolution")
    except Exception as exc:  # an interpolation that does not resolve
        fail(f"{config_file}: model.resolution cannot be read ({first_line(exc)})")
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        fail(f"{config_file}: model.resolution must be an integer, the image side in pixels (got {resolution!r})")
    if not 0 < resolution <= MAX_RESOLUTION:
        fail(f"{config_file}: model.resolution={resolution} is outside (0, {MAX_RESOLUTION}] pixels")
    return resolution


def sampler_settings(cfg, config_file: str = "the run's config") -> dict:
    """The pipeline call's sampler settings from the run's config (DDIM, or the flow run's ODE)."""
    from omegaconf import OmegaConf

    settings = {}
    keys = FLUX_SAMPLER if is_flux(cfg) else FLOW_SAMPLER if is_flow(cfg) else DDIM_SAMPLER
    for name, key in keys.items():
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception as exc:
            fail(f"{config_file}: {key} cannot be read ({first_line(exc)})")
        if name in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(f"{config_file}: {key} must be a positive integer (got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{config_file}: {key} must be a number (got {value!r})")
        settings[name] = value
    if is_flux(cfg):
        flux_shift(cfg, config_file)  # checked here, before a model is built; prepare_sampler uses it
        if settings["true_cfg_scale"] > 1:  # the run's true CFG: the empty prompt is the negative
            settings["negative_prompt"] = ""
    return settings


def prepare_sampler(pipe, cfg) -> None:
    """The base model's scheduler as the run samples: DDIM (DDPO's sampler), or a flow model's own Euler
    scheduler (FLUX with a fixed ``pipeline.shift`` instead of its dynamic one, as ddpo/pipelines/flux.py)."""
    from diffusers import DDIMScheduler

    if not is_flow(cfg):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif is_flux(cfg):
        from ddpo.pipelines.flux import with_fixed_shift

        pipe.scheduler = with_fixed_shift(pipe.scheduler, flux_shift(cfg))


def check_fits(pipe, cfg, config_file: str) -> None:
    """What only the loaded model can say: the image side its VAE (and patches) divide, and its timesteps."""
    resolution = cfg.model.resolution
    from ddpo.pipelines.flux import PACK  # FLUX packs 2x2 latent patches outside the transformer (no patch_size)

    patch = PACK if is_flux(cfg) else getattr(pipe, "patch_size", None) or 1
    factor = getattr(pipe, "vae_scale_factor", 1) * patch
    if resolution % factor:
        fail(f"{config_file}: model.resolution={resolution} must be a multiple of {factor} for this model")
    steps = sampler_settings(cfg, config_file)["num_inference_steps"]
    timesteps = pipe.scheduler.config.get("num_train_timesteps")
    if not is_flow(cfg) and timesteps is not None and steps > timesteps:
        fail(f"{config_file}: sample.num_steps={steps} exceeds the scheduler's {timesteps} training timesteps")


# -- the run, the models -------------------------------------------------------------------------------
def locate(path: str) -> tuple[str, str]:
    """(run directory, directory of the trained weights) from a run or a checkpoint directory."""
    from ddpo.checkpointing import STATE_FILE

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        fail(f"{path}: no such directory (give a run directory or one of its checkpoints/checkpoint_* directories)")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(path)), path  # <run>/checkpoints/checkpoint_<epoch>
    return path, os.path.join(path, "final")


def trained_kind(weights_dir: str) -> str:
    """What ``apply_trained`` will load from ``weights_dir``, or one line if it holds no trained weights."""
    if os.path.isfile(os.path.join(weights_dir, "pytorch_lora_weights.safetensors")):
        return "LoRA"
    if os.path.isdir(os.path.join(weights_dir, "transformer")):
        return "full transformer"
    if os.path.isdir(os.path.join(weights_dir, "unet")):
        return "full UNet"
    fail(f"no trained weights in {weights_dir} (has the run finished? a checkpoint directory works too)")


def plan_base(run_dir: str, model_path: str | None):
    """(the run's config, a function that builds its base model): all checked, nothing built yet."""
    from ddpo import models
    from ddpo.errors import DDPOError

    cfg = read_config(run_dir)
    config_file = os.path.join(run_dir, ".hydra", "config.yaml")
    if model_path:
        loader = getattr(models, FLOW_LOADERS.get(pipeline_target(cfg), "load_stable_diffusion"))
        target, kwargs = loader.__name__, {"path": model_path}
    else:
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(cfg.model, resolve=False)
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
        loader = getattr(models, target.rsplit(".", 1)[1])
    check_resolution(cfg, config_file)
    sampler_settings(cfg, config_file)

    def build():
        try:
            pipe = loader(**kwargs)
        except DDPOError as exc:  # the loader's own one-line refusal (no such model, not a model, a bad setting)
            fail(str(exc))
        except (TypeError, ValueError, OSError) as exc:  # settings of the right kind that it cannot take
            fail(f"{config_file}: {target} cannot build the model from {kwargs} ({first_line(exc)})")
        check_fits(pipe, cfg, config_file)
        return pipe

    return cfg, build


def load_base(run_dir: str, model_path: str | None):
    """(the run's base model, its config): the config checked first, the loader's refusal one line."""
    cfg, build = plan_base(run_dir, model_path)
    return build(), cfg


def apply_trained(pipe, weights_dir: str) -> str:
    from diffusers import UNet2DConditionModel

    kind = trained_kind(weights_dir)
    try:
        if kind == "LoRA":
            pipe.load_lora_weights(weights_dir)
        elif kind == "full transformer":  # the base model's class: SD3Transformer2DModel, FluxTransformer2DModel
            pipe.transformer = type(pipe.transformer).from_pretrained(os.path.join(weights_dir, "transformer"))
        else:
            pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(weights_dir, "unet"))
    except Exception as exc:  # diffusers/peft/safetensors raise many types; all mean "cannot load these weights"
        fail(f"cannot load the trained weights ({kind}) of {weights_dir} into the base model ({first_line(exc)})")
    return kind


def sample_rows(pipe, prompts, seeds, cfg, device):
    import torch

    sampler = sampler_settings(cfg)  # the flow pipeline's evaluation sampler: the ODE with eval_num_steps
    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator(device=device).manual_seed(seed)
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
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's output directory, or one of its checkpoint directories")
    parser.add_argument(
        "--prompts", nargs="+", help=f"the prompts (default: {NUM_PROMPTS} of the run's prompt set, drawn with seed 0)"
    )
    add_seed_options(parser, default=4, was_a_list=True)
    parser.add_argument("--model-path", help="base model (hub id or directory) instead of the run's own")
    parser.add_argument("--baseline", action="store_true", help="also sample the base model")
    parser.add_argument("--out", help="output PNG (default <run>/samples.png)")
    parser.add_argument("--device", help="device to sample on (default: cuda if available)")
    args = parser.parse_args(argv)
    seeds = seeds_of(args)
    device = check_device(args.device or ("cuda" if _cuda() else "cpu"))
    run_dir, weights_dir = locate(args.run_dir)
    cfg, build_base = plan_base(run_dir, args.model_path)
    out = check_image_out(args.out or os.path.join(run_dir, "samples.png"))
    trained_kind(weights_dir)
    prompts = args.prompts
    if not prompts:
        prompts, why = run_prompts(cfg)
        if why:
            print(f"note: sampling {prompts} ({why}; give --prompts)")

    from ddpo.logging import image_grid

    pipe = build_base()
    prepare_sampler(pipe, cfg)  # DDPO's sampler; a flow model keeps its FlowMatchEulerDiscreteScheduler
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    images, captions = [], []
    if args.baseline:
        for prompt, row in zip(prompts, sample_rows(pipe, prompts, seeds, cfg, device)):
            images += row
            captions += [f"base | {prompt} | seed {s}" for s in seeds]
    kind = apply_trained(pipe, weights_dir)
    pipe.to(device)
    for prompt, row in zip(prompts, sample_rows(pipe, prompts, seeds, cfg, device)):
        images += row
        captions += [f"trained | {prompt} | seed {s}" for s in seeds]
    grid = image_grid(images, captions, tile=min(256, cfg.model.resolution * 4), columns=len(seeds))
    try:
        grid.save(out)
    except OSError as exc:
        fail(f"cannot write {out} ({first_line(exc)})")
    shown = f"prompts {', '.join(repr(p) for p in prompts)}; seeds {', '.join(map(str, seeds))}"
    print(f"{len(images)} images ({kind} from {weights_dir}; {shown}) -> {out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
