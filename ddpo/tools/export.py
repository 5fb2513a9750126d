"""Export a finished run (or one of its checkpoints) as a Hub-ready model folder, and push it if asked.

    ddpo-export outputs/shapes                                  # -> outputs/shapes/export/
    ddpo-export outputs/shapes --checkpoint 100 --out exports/shapes-100
    ddpo-export outputs/shapes --push my-name/ddpo-shapes --private

(in a clone: ``python scripts/export.py`` with the same arguments).

The folder holds the trained weights in diffusers format, exactly as the run wrote them (LoRA:
pytorch_lora_weights.safetensors, for pipe.load_lora_weights; full fine-tuning: unet/, or transformer/
for the flow-matching family, for from_pretrained), a model card (README.md: base model, reward, algorithm
and hyperparameters from <run>/.hydra/config.yaml, the reward numbers of <run>/metrics.jsonl, how to load
it), reward_curve.png and samples.png (base and trained model, same prompts and seeds, sampled as
ddpo-sample samples: DDIM, or for a flow-matching run (pipeline=flow_sde) diffusers'
StableDiffusion3Pipeline with the ODE and pipeline.eval_num_steps; --no-sample reuses the run's last
logged image grid instead). --push creates the Hub repository and uploads the folder (log in first with
`hf auth login`, or set HF_TOKEN).

Only files this script knows are exported: the weights files the run's export writes (LoRA:
pytorch_lora_weights.safetensors; full fine-tuning: the model folder's config.json and its
diffusion_pytorch_model*.safetensors, with their index), each a real safetensors or JSON file of the
run directory (a symbolic link that leads out of it is refused), then the card and the plots it writes
itself. --push uploads exactly those files, and lists them (path and size) before it does.
"""

import argparse
import json
import os
import re
import shutil
import sys

from ddpo.tools.common import OneLineParser, add_seed_options, fail, first_line, seeds_of
from ddpo.tools.sample import (  # this project's loaders, and how ddpo-sample samples, draws prompts and checks
    FLOW_PIPELINE,
    NUM_PROMPTS,
    apply_trained,
    check_device,
    load_base,
    prepare_sampler,
    run_prompts,
    sample_rows,
)

LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads
# full fine-tuning: the folder the pipelines' export writes (save_pretrained), and the files in it that are exported
MODEL_FOLDERS = ("unet", "transformer")
MODEL_FILES = re.compile(
    r"config\.json|diffusion_pytorch_model[\w.-]*\.safetensors|diffusion_pytorch_model\.safetensors\.index[\w.]*\.json"
)
MAX_HEADER = 100 * 2**20  # a safetensors header (JSON) larger than this is not one save_pretrained wrote
DDIM_PIPELINES = ("ddim", "sdxl")  # conf/pipeline options that sample with DDIM (as ddpo-sample does)
FLOW_PIPELINES = ("flow_sde",)  # the flow-matching family: diffusers' StableDiffusion3Pipeline, sampled with the ODE
HYPERPARAMETERS = [
    "seed",
    "num_epochs",
    "use_lora",
    "lora_rank",
    "mixed_precision",
    "sample.num_steps",
    "sample.eta",
    "sample.guidance_scale",
    "sample.batch_size",
    "sample.num_batches_per_epoch",
    "train.batch_size",
    "train.learning_rate",
    "train.gradient_accumulation_steps",
    "train.num_inner_epochs",
    "train.clip_range",
    "train.adv_clip_max",
    "train.timestep_fraction",
    "train.max_grad_norm",
]
# the flow-matching family's sampler and adapter (conf/pipeline/flow_sde.yaml; it has no sample.eta)
FLOW_HYPERPARAMETERS = [
    "pipeline.lora_alpha",
    "pipeline.num_steps",
    "pipeline.eval_num_steps",
    "pipeline.noise_level",
    "pipeline.sigma_schedule",
    "pipeline.sde_window",
    "pipeline.guidance_scale",
    "pipeline.train_cfg",
    "pipeline.max_sequence_length",
]


# The licenses of the shipped model configs' Hub models (conf/model/*.yaml), as their Hub cards declare them:
# (license, license_name, license_link); an "other" license is named and linked, as the Hub does. Keys in lower case.
BASE_LICENSES = {
    "compvis/stable-diffusion-v1-4": ("creativeml-openrail-m", None, None),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("creativeml-openrail-m", None, None),
    "stabilityai/stable-diffusion-2-1": ("openrail++", None, None),
    "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", None, None),
    "stabilityai/stable-diffusion-3.5-medium": (
        "other",
        "stabilityai-ai-community",
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md",
    ),
    "black-forest-labs/flux.1-dev": (
        "other",
        "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    ),
    "black-forest-labs/flux.1-schnell": ("apache-2.0", None, None),
}
PROJECT_LICENSE = "apache-2.0"  # this project's (LICENSE), as the Hub names it
# loaders whose base model is this project's own (shipped weights, or a seeded random initialisation) when no
# path is given: no other model's weights are in it
OWN_MODELS = (
    "tiny_model",
    "tiny_sdxl_model",
    "tiny_flow_model",
    "tiny_flux_model",
    "tiny_shapes_model",
    "tiny_shapes_flow_model",
    "tiny_testbed_model",
    "sd15_architecture",
    "sd3_architecture",
    "flux_architecture",
)
VERSIONED = ("torch", "diffusers", "transformers", "peft", "accelerate")  # the libraries the card names
REDACTED = "<redacted>"  # what the card shows of request headers (reward.headers may hold a token)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def pipeline_family(cfg, choices: dict) -> str:
    """The run's sampling family: flow (pipeline=flow_sde, a SD3 transformer), ddim (ddim, sdxl) or other."""
    from omegaconf import OmegaConf

    choice = choices.get("pipeline")
    if choice in FLOW_PIPELINES or OmegaConf.select(cfg, "pipeline._target_", default=None) == FLOW_PIPELINE:
        return "flow"
    return "ddim" if (choice or "ddim") in DDIM_PIPELINES else "other"


# -- the run ------------------------------------------------------------------------------------
class Source:
    """What is exported: the run directory, the directory of the weights, and the epochs they hold."""

    def __init__(self, run_dir: str, weights_dir: str, epochs: int | None):
        self.run_dir = run_dir
        self.weights_dir = weights_dir
        self.epochs = epochs  # epochs trained into a checkpoint's weights; None for final/ (all of them)

    @property
    def label(self) -> str:
        return "final" if self.epochs is None else os.path.basename(self.weights_dir)


def run_is_training(run_dir: str) -> str | None:
    """Who holds the run's lock (``ddpo/run_lock.py``), or None when no process is training in it."""
    import fcntl

    from ddpo.run_lock import LOCK_FILE

    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def locate(path: str, checkpoint: str | None) -> Source:
    """The run and the weights to export, or a one-line error saying what is missing."""
    from ddpo.checkpointing import STATE_FILE, list_checkpoints, read_state

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        fail(f"{path}: no such directory (give a run directory of train.py, or one of its checkpoints)")
    if os.path.isfile(os.path.join(path, STATE_FILE)):  # <run>/checkpoints/checkpoint_<epoch>
        if checkpoint is not None:
            fail("give either a checkpoint directory or --checkpoint, not both")
        return Source(os.path.dirname(os.path.dirname(path)), path, int(read_state(path)["epochs_completed"]))
    if not os.path.isfile(os.path.join(path, ".hydra", "config.yaml")):
        fail(f"{path} is not a run directory of train.py (no .hydra/config.yaml)")
    checkpoints = list_checkpoints(path)
    saved = ", ".join(str(epoch) for epoch, _ in checkpoints) or "none"
    if checkpoint is not None:
        if checkpoint == "latest" and checkpoints:
            epoch, directory = checkpoints[-1]
            return Source(path, directory, epoch)
        for epoch, directory in checkpoints:
            if checkpoint.isdigit() and int(checkpoint) == epoch:
                return Source(path, directory, epoch)
        fail(f"{path} has no checkpoint of epoch {checkpoint} (checkpoints saved after epochs: {saved})")
    holder = run_is_training(path)
    if holder:
        fail(f"{path} is still training ({holder}): wait for it to end, or export a checkpoint with --checkpoint N")
    final = os.path.join(path, "final")
    if not os.path.isdir(final):
        fail(
            f"{path} has not finished (no final/): rerun its train.py command to complete it, or export a "
            f"checkpoint with --checkpoint N (checkpoints saved after epochs: {saved})"
        )
    return Source(path, final, None)


def inside(path: str, root: str) -> bool:
    """Whether ``path``, every symbolic link followed, lies in ``root``."""
    real, root = os.path.realpath(path), os.path.realpath(root)
    return real == root or real.startswith(root + os.sep)


def is_safetensors(path: str) -> bool:
    """Whether the file is a safetensors file: an 8-byte header length, then that many bytes of a JSON object."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= min(size - 8, MAX_HEADER):
            return False
        try:
            return isinstance(json.loads(handle.read(length)), dict)
        except ValueError:
            return False


def is_json_object(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return isinstance(json.load(handle), dict)
    except ValueError:
        return False


def weight_files(source: Source) -> tuple[str, list[str], list[str]]:
    """("lora" or "full", the model folders, the files to copy relative to the weights directory).

    Only what the run's export writes (an allow-list: nothing else in final/ or a checkpoint is
    copied), each a regular file of the run directory whose content is what its name says.
    """
    weights, run = source.weights_dir, source.run_dir

    def refuse_outside(path: str) -> None:
        if not inside(path, run):
            fail(
                f"{path} leads to {os.path.realpath(path)}, outside the run directory {run}: export copies "
                "only the run's own files (copy the weights into the run instead of linking them)"
            )

    refuse_outside(weights)
    if os.path.isfile(os.path.join(weights, LORA_FILE)):
        kind, folders, files = "lora", [], [LORA_FILE]
    else:
        # full fine-tuning: the trained model's diffusers folder (unet/, or transformer/ for the flow family)
        folders = [name for name in MODEL_FOLDERS if os.path.isfile(os.path.join(weights, name, "config.json"))]
        if not folders:
            fail(f"no trained weights in {weights} ({LORA_FILE} or a model folder: {', '.join(MODEL_FOLDERS)})")
        kind, files, skipped = "full", [], []
        for folder in folders:
            refuse_outside(os.path.join(weights, folder))
            for name in sorted(os.listdir(os.path.join(weights, folder))):
                (files if MODEL_FILES.fullmatch(name) else skipped).append(f"{folder}/{name}")
        if skipped:
            warn(
                f"not exported (not a weights file of the run): {', '.join(os.path.join(weights, s) for s in skipped)}"
            )
    for rel in files:
        path = os.path.join(weights, rel)
        refuse_outside(path)
        if not os.path.isfile(path):
            fail(f"{path} is not a file")
        what = "safetensors" if rel.endswith(".safetensors") else "JSON"
        try:
            valid = is_safetensors(path) if what == "safetensors" else is_json_object(path)
        except OSError as exc:
            fail(f"cannot read {path} ({first_line(exc)})")
        if not valid:
            fail(f"{path} is not a {what} file: the weights are damaged (export a checkpoint instead)")
    for folder in folders:
        if not any(rel.startswith(f"{folder}/") and rel.endswith(".safetensors") for rel in files):
            fail(f"{os.path.join(weights, folder)} holds no weights (diffusion_pytorch_model*.safetensors)")
    return kind, folders, files


def read_run(source: Source):
    """(config, group choices, command-line overrides, metrics records of the exported epochs)."""
    from omegaconf import OmegaConf

    from ddpo.errors import DDPOError
    from ddpo.logging import MetricsFile

    hydra_dir = os.path.join(source.run_dir, ".hydra")
    try:
        cfg = OmegaConf.load(os.path.join(hydra_dir, "config.yaml"))
        choices, overrides = {}, []
        if os.path.isfile(os.path.join(hydra_dir, "hydra.yaml")):
            hydra_cfg = OmegaConf.load(os.path.join(hydra_dir, "hydra.yaml"))
            choices = OmegaConf.to_container(hydra_cfg.hydra.runtime.choices)
        if os.path.isfile(os.path.join(hydra_dir, "overrides.yaml")):
            overrides = [
                str(o) for o in OmegaConf.to_container(OmegaConf.load(os.path.join(hydra_dir, "overrides.yaml")))
            ]
    except Exception as exc:
        fail(f"cannot read {hydra_dir} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    try:
        records = MetricsFile(source.run_dir).read()
    except DDPOError as exc:
        fail(str(exc))
    if source.epochs is not None:
        records = [r for r in records if r["epoch"] < source.epochs]
    if not records:
        fail(f"{source.run_dir}/metrics.jsonl holds no epoch of these weights: the run has not trained yet")
    return cfg, choices, overrides, records


def read_evaluations(source: Source) -> list[dict]:
    """The run's held-out evaluations (eval.jsonl: the one before training included) of these weights' epochs."""
    from ddpo.errors import DDPOError
    from ddpo.logging import EVAL_FILE, MetricsFile

    try:
        evaluations = MetricsFile(source.run_dir, EVAL_FILE).read()
    except DDPOError as exc:
        fail(str(exc))
    last = source.epochs if source.epochs is not None else max((e["epoch"] for e in evaluations), default=0)
    return [e for e in evaluations if e["epoch"] <= last]


# -- samples ------------------------------------------------------------------------------------
def sample_grid(source: Source, cfg, prompts: list[str], seeds: list[int], device: str, model_path: str | None):
    """Base and trained model on the same prompts and seeds: rows base/trained per prompt, columns seeds.

    As ddpo-sample samples: DDIM, or for a flow run the SD3 pipeline's own Euler ODE with
    ``pipeline.eval_num_steps`` (the run's evaluation sampler).
    """
    from ddpo.logging import image_grid

    try:
        pipe, _ = load_base(source.run_dir, model_path)
    except SystemExit as stop:  # ddpo-sample's one-line refusal (the config, the loader, the model)
        fail(f"{str(stop.code).removeprefix('error: ')}; or --no-sample to skip the samples")
    prepare_sampler(pipe, cfg)  # DDPO's sampler; a flow model keeps its FlowMatchEulerDiscreteScheduler
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    base = sample_rows(pipe, prompts, seeds, cfg, device)
    apply_trained(pipe, source.weights_dir)
    pipe.to(device)
    trained = sample_rows(pipe, prompts, seeds, cfg, device)
    images, captions = [], []
    for prompt, base_row, trained_row in zip(prompts, base, trained):
        images += base_row + trained_row
        captions += [f"base | {prompt} | seed {s}" for s in seeds] + [f"trained | {prompt} | seed {s}" for s in seeds]
    return image_grid(images, captions, tile=min(256, cfg.model.resolution * 4), columns=len(seeds))


def logged_grid(run_dir: str):
    """The run's last logged image grid (images/step_<n>.png), or None."""
    from PIL import Image

    folder = os.path.join(run_dir, "images")
    steps = []
    if os.path.isdir(folder) and inside(folder, run_dir):
        for name in os.listdir(folder):
            match = re.fullmatch(r"step_(\d+)\.png", name)
            path = os.path.join(folder, name)
            if match and os.path.isfile(path) and inside(path, run_dir):  # never a link out of the run
                steps.append((int(match.group(1)), name))
    if not steps:
        return None
    path = os.path.join(folder, max(steps)[1])
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decoded here: the card gets pixels, not the file
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        warn(f"the card has no samples: {path} is not an image PIL reads ({first_line(exc)})")
        return None


# -- the card -----------------------------------------------------------------------------------
def number(value) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"


def hub_id(path) -> str | None:
    """``path`` if it names a Hub repository (owner/name), not a local directory."""
    if not isinstance(path, str) or os.path.isabs(path) or os.path.exists(path) or path.startswith("."):
        return None
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else None


def dotted(container: dict, key: str):
    value = container
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def load_base_code(model: dict, family: str = "ddim") -> tuple[str, str]:
    """(import lines, the line that builds ``pipe``) for the run's base model.

    A flow run's base is a ``StableDiffusion3Pipeline`` (loaded without T5 when the run dropped it).
    """
    cls = "StableDiffusion3Pipeline" if family == "flow" else "DiffusionPipeline"
    target = str(model.get("_target_", ""))
    path = model.get("path")
    if hub_id(path) or (path and target.startswith("ddpo.models.load_")):
        extra = f', revision="{model["revision"]}"' if model.get("revision") else ""
        note = ""
        if family == "flow" and model.get("drop_t5"):
            extra, note = extra + ", text_encoder_3=None, tokenizer_3=None", "  # trained without T5, as it ran"
        return f"from diffusers import {cls}", f'pipe = {cls}.from_pretrained("{path}"{extra}){note}'
    if target.startswith("ddpo.models."):  # built or shipped by this package: pip install ddpo-diffusion
        name = target.rsplit(".", 1)[1]
        keys = ("path", "seed", "resolution", "prediction_type", "drop_t5")
        args = ", ".join(f"{k}={model[k]!r}" for k in keys if k in model and model[k] is not None)
        note = f"  # a diffusers {cls}" if family == "flow" else ""
        return f"from ddpo.models import {name}  # pip install ddpo-diffusion", f"pipe = {name}({args}){note}"
    return f"from diffusers import {cls}", f'pipe = {cls}.from_pretrained("<the base model>")'


def usage_code(
    values: dict, kind: str, folders: list[str], weights_dir: str, repo: str, prompt: str, family: str
) -> str:
    """The card's snippet: build the base, load the trained weights, sample as the run samples (or evaluates)."""
    import json

    model, sample, pipeline = (values.get(k) or {} for k in ("model", "sample", "pipeline"))
    ddim = family == "ddim"
    imports, build = load_base_code(model, family)
    lines = [imports, "from diffusers import DDIMScheduler"] if ddim else [imports]
    if kind == "lora":
        load = [f'pipe.load_lora_weights("{repo}")']
    else:
        load = []
        for folder in folders:
            with open(os.path.join(weights_dir, folder, "config.json")) as handle:
                cls = json.load(handle).get("_class_name", "AutoModel")
            lines.append(f"from diffusers import {cls}")
            load.append(f'pipe.{folder} = {cls}.from_pretrained("{repo}", subfolder="{folder}")')
    settings = f"num_inference_steps={sample.get('num_steps')}, guidance_scale={sample.get('guidance_scale')}"
    if family == "flow":  # the run's evaluation sampler: the ODE (the pipeline's own scheduler), eval_num_steps
        resolution = model.get("resolution")
        settings = (
            f"num_inference_steps={pipeline.get('eval_num_steps')}, guidance_scale={pipeline.get('guidance_scale')}, "
            f"max_sequence_length={pipeline.get('max_sequence_length')}, height={resolution}, width={resolution}"
        )
    lines += ["", build, *load]
    if ddim:
        lines.append(
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler it was trained with"
        )
        settings += f", eta={sample.get('eta')}"
    lines.append(f"image = pipe({prompt!r}, {settings}).images[0]")
    return "\n".join(lines)


def plain(cfg) -> dict:
    """The run's config as plain values (interpolations resolved where they can be)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def base_license(model: dict) -> tuple[str, str | None, str | None, str]:
    """(the Hub's license id, license_name, license_link, why) for a model trained from ``model``: the base
    model's license where it is known, this project's for a base model of its own, else "other"."""
    base = hub_id(model.get("path"))
    if base:
        known = BASE_LICENSES.get(base.lower())
        if known:
            return (*known, f"the license of the base model `{base}`, which applies to this model")
        return "other", None, None, f"not known here: the license of the base model `{base}` applies (see its card)"
    loader = str(model.get("_target_", "")).rsplit(".", 1)[-1]
    if not model.get("path") and loader in OWN_MODELS:
        return (
            PROJECT_LICENSE,
            None,
            None,
            f"the license of ddpo-diffusion, whose own base model this is (`{loader}`: shipped weights or a seeded "
            "random initialisation, no other model's weights)",
        )
    return "other", None, None, "not known here: the base model is a local copy, whose license applies"


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` of a Hub model resolves to in this machine's Hub cache, if it is there."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.file_download import repo_folder_name

        ref = os.path.join(HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"), "refs", revision)
        with open(ref) as handle:
            commit = handle.read().strip()
    except (OSError, ValueError, ImportError):
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def versions_table(model: dict) -> str:
    """Rows of this package's and its libraries' versions, and the base model's revision."""
    from importlib.metadata import PackageNotFoundError, version

    import ddpo

    rows = [("ddpo-diffusion", ddpo.__version__)]
    for name in VERSIONED:
        try:
            rows.append((name, version(name)))
        except PackageNotFoundError:
            rows.append((name, "not installed"))
    base = hub_id(model.get("path"))
    if base:
        revision = str(model.get("revision") or "main")
        commit = cached_commit(base, revision)
        rows.append((f"base model `{base}`", f"`{revision}`" + (f" (commit `{commit}`)" if commit else "")))
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def redact_override(override: str) -> str:
    """A command-line override with the value of any request header hidden (they may carry a token)."""
    key, sep, value = override.partition("=")
    return f"{key}={REDACTED}" if sep and "headers" in key.split(".") else override


def train_command(overrides: list[str]) -> str:
    """``python train.py`` with the run's overrides (Hydra's own ``hydra.*`` left out), quoted for a shell."""
    import shlex

    kept = [redact_override(o) for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    return " ".join(["python train.py", *(shlex.quote(o) for o in kept)])


def config_text(source: Source) -> str:
    """The run's ``.hydra/config.yaml`` as YAML (interpolations as written), request headers' values hidden."""
    from omegaconf import OmegaConf

    def redact(node):
        if isinstance(node, dict):
            return {
                key: {name: REDACTED for name in value}
                if key == "headers" and isinstance(value, dict)
                else redact(value)
                for key, value in node.items()
            }
        return [redact(item) for item in node] if isinstance(node, list) else node

    cfg = OmegaConf.load(os.path.join(source.run_dir, ".hydra", "config.yaml"))
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=False)))).rstrip("\n")


def fenced(text: str, language: str = "") -> str:
    """``text`` as a Markdown code block, fenced with more backticks than any run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def write_card(
    path: str, source: Source, values: dict, choices: dict, overrides: list[str], records: list[dict], **info
):
    """The model card: YAML front matter for the Hub, then results, usage and training settings."""
    from huggingface_hub import ModelCard, ModelCardData

    from ddpo.citation import bibtex

    model = values.get("model") or {}
    kind, folders = info["kind"], info["folders"]
    base = hub_id(model.get("path"))
    model_name = base or model.get("path") or str(model.get("_target_", "an unknown base model"))
    base_note = "" if base or model.get("path") else " (built locally by ddpo-diffusion: nothing to download)"
    algorithm = choices.get("algorithm") or str(dotted(values, "algorithm._target_")).rsplit(".", 1)[-1].lower()
    reward = choices.get("reward") or str(dotted(values, "reward._target_"))
    prompt_set = choices.get("prompt") or str(dotted(values, "prompt._target_"))
    tags = ["diffusers", "text-to-image", "ddpo", "reinforcement-learning", algorithm]
    family = info.get("family", "ddim")
    if family == "flow":
        tags += ["stable-diffusion-3", "flow-matching"]
    elif choices.get("pipeline") == "flux":
        tags += ["flux", "flow-matching"]
    else:
        tags += ["stable-diffusion-xl" if choices.get("pipeline") == "sdxl" else "stable-diffusion"]
    if kind == "lora":
        tags += ["lora"]
    license_id, license_name, license_link, license_note = base_license(model)
    relation = {"base_model_relation": "adapter" if kind == "lora" else "finetune"} if base else {}
    data = ModelCardData(
        license=license_id,
        license_name=license_name,
        license_link=license_link,
        base_model=base,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(dict.fromkeys(tags)),
        **relation,
    )

    first, last = records[0], records[-1]
    best = max(records, key=lambda r: r["reward_mean"] if r.get("reward_mean") is not None else float("-inf"))
    samples = sum(int(r.get("num_samples") or 0) for r in records)
    denoiser = "transformer (`StableDiffusion3Pipeline`)" if family == "flow" else "UNet"
    what = (
        f"LoRA adapter (rank {values.get('lora_rank')}) for the {denoiser}"
        if kind == "lora"
        else "fully fine-tuned " + ", ".join(f"`{f}`" for f in folders)
    )
    rows = [
        ("first epoch", first),
        ("last epoch", last),
        ("best epoch", best),
    ]
    results = "\n".join(
        f"| {name} | {r['epoch']} | {number(r.get('reward_mean'))} | {number(r.get('reward_std'))} |"
        for name, r in rows
    )
    evals = info.get("evaluations") or []
    eval_text = ""
    if evals:  # eval.jsonl: its first line is the base model's evaluation, before any training
        first_eval, last_eval = evals[0], evals[-1]
        keys = sorted(
            k
            for k, v in last_eval.items()
            if k.startswith("eval_")
            and not k.endswith(("_ci_low", "_ci_high", "_time_s", "_epochs_trained"))
            and isinstance(v, (int, float))
        )

        def value(e: dict, k: str) -> str:  # the mean, with its 95% interval where the evaluation has one
            low, high = e.get(k + "_ci_low"), e.get(k + "_ci_high")
            interval = f" [{number(low)}, {number(high)}]" if low is not None and high is not None else ""
            return number(e.get(k)) + interval

        def heading(e: dict) -> str:
            return "before training" if e["epoch"] == 0 else f"after {e['epoch']} epoch{'s' if e['epoch'] != 1 else ''}"

        eval_text = (
            "\n\nHeld-out evaluation (`eval.every`, `eval.jsonl`):\n\n"
            f"| metric | {heading(first_eval)} | {heading(last_eval)} |\n|---|---|---|\n"
            + "\n".join(f"| `{k}` | {value(first_eval, k)} | {value(last_eval, k)} |" for k in keys)
        )
    settings = (
        [k for k in HYPERPARAMETERS if k != "sample.eta"] + FLOW_HYPERPARAMETERS
        if family == "flow"
        else HYPERPARAMETERS
    )
    params = "\n".join(f"| `{key}` | {dotted(values, key)} |" for key in settings if dotted(values, key) is not None)
    algo_params = "\n".join(
        f"| `algorithm.{k}` | {v} |"
        for k, v in (values.get("algorithm") or {}).items()
        if k != "_target_" and isinstance(v, (int, float, str, bool))
    )
    command = train_command(overrides)
    changes_text = config_changes_text(source, records)
    weights_from = "the run's final weights" if source.epochs is None else f"checkpoint `{source.label}`"
    samples_text = (
        f"![samples](samples.png)\n\n{info['samples_caption']}\n\n" if info.get("samples_caption") is not None else ""
    )
    body = f"""
# {model_name}, fine-tuned with {algorithm.upper()} on `{reward}`

A {what} of `{model_name}`{base_note}, trained with reinforcement learning ({algorithm}: the denoising chain as a
policy, optimised with a policy gradient) to maximise the reward `{reward}` on the prompt set `{prompt_set}`.
Exported from {weights_from} of the training run `{os.path.basename(source.run_dir)}`.

## Results

Training reward per epoch (`metrics.jsonl`: mean and standard deviation over the epoch's samples):

| | epoch | reward mean | reward std |
|---|---|---|---|
{results}

{len(records)} epoch{"s" if len(records) != 1 else ""}, {samples} samples in total.{eval_text}

![reward curve](reward_curve.png)

{samples_text}## How to use

```python
{info["usage"]}
```

## Training

- base model: `{model_name}`{base_note}
- algorithm: `{algorithm}`
- reward: `{reward}`
- prompts: `{prompt_set}`

The command that trained it (`.hydra/overrides.yaml`; `ddpo-train` takes the same arguments):

{fenced(command, "bash")}

| setting | value |
|---|---|
{params}
{algo_params}
{changes_text}
<details>
<summary>The run's whole config (<code>.hydra/config.yaml</code>)</summary>

{fenced(config_text(source), "yaml")}

</details>

## Versions

The software that exported this model (a run does not record the versions it trained with), and the base model:

| | version |
|---|---|
{versions_table(model)}

## License

`{license_name or license_id}`{f" ({license_link})" if license_link else ""}: {license_note}.

## Limitations

The reward above is what training maximised, measured on the training prompts; a policy optimised
against a reward model can exploit it (reward hacking), so look at the samples, not only the numbers.
The base model's license and use restrictions apply to this model.

## Citation

This model was trained with ddpo-diffusion, which implements DDPO (Black et al., ICLR 2024):

{fenced(bibtex(), "bibtex")}
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)


def config_changes_text(source: Source, records: list[dict]) -> str:
    """The settings the run changed while it trained (``resume_with_changes``, ``config_history.jsonl``):
    the table above shows the last ones, which the epochs before a change never used."""
    import json

    from ddpo.config_history import HISTORY_FILE

    path = os.path.join(source.run_dir, HISTORY_FILE)
    if not os.path.isfile(path) or os.path.islink(path):
        return ""
    exported = records[-1]["epoch"] + 1 if records else 0
    rows = []
    with open(path) as handle:
        for line in handle:
            try:
                entry = json.loads(line)
                if not (isinstance(entry, dict) and isinstance(entry.get("changes"), dict)):
                    continue
            except ValueError:
                continue
            if entry["changes"] and isinstance(entry.get("epoch"), int) and entry["epoch"] < exported:
                for key, change in entry["changes"].items():
                    change = change if isinstance(change, dict) else {}
                    rows.append(f"| {entry['epoch']} | `{key}` | {change.get('from')} | {change.get('to')} |")
    if not rows:
        return ""
    return (
        "\nThe run was resumed with changed settings (`resume_with_changes=true`); the table above shows the "
        "last ones:\n\n| from epoch | setting | before | after |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def card_samples(args, source: Source, cfg, prompts: list[str], seeds: list[int], pipeline: str, family: str):
    """(the card's sample grid or None, its caption): sampled here, or the run's own last logged grid."""
    if not args.no_sample and family == "other":
        print(
            f"pipeline={pipeline}: not sampled here (the card samples only the DDIM and SD3 flow-matching "
            "families; ddpo-sample also samples pipeline=flux); the card shows the run's images"
        )
    if args.no_sample or family == "other":
        grid = logged_grid(source.run_dir)
        return grid, "The last sample batch the run logged (`prompt | reward`)."
    grid = sample_grid(source, cfg, prompts, seeds, args.device, args.model_path)
    sampler = (
        f" Sampled as the run evaluates: the ODE with {cfg.pipeline.eval_num_steps} steps." if family == "flow" else ""
    )
    return grid, (
        f"Rows: base model, then this model, for each prompt ({', '.join(repr(p) for p in prompts)}); "
        f"columns: seeds {', '.join(map(str, seeds))} (the same noise in both rows).{sampler}"
    )


# -- main ---------------------------------------------------------------------------------------
def default_out(source: Source) -> str:
    return os.path.join(source.run_dir, "export" if source.epochs is None else f"export_{source.label}")


def check_out(out: str, source: Source, overwrite: bool) -> str:
    """The folder to write, refused in one line before anything is built: a file, a link, a folder
    that holds the run (``--overwrite`` would delete it), a folder that is not empty without ``--overwrite``."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.islink(out):
        fail(f"--out {out} is a symbolic link (to {os.path.realpath(out)}): give the folder itself")
    if os.path.lexists(out) and not os.path.isdir(out):
        fail(f"{out} is a file, not a folder: give another --out")
    if inside(source.run_dir, out):
        fail(f"--out {out} holds the run directory {source.run_dir}: give a folder of its own")
    if inside(out, source.weights_dir):
        fail(f"--out {out} is inside the weights it exports ({source.weights_dir}): give another --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        fail(f"{out} exists and is not empty: give another --out, or --overwrite to replace it")
    parent = os.path.dirname(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        fail(f"--out {out}: {parent} is not writable")
    partial = out + ".partial"
    if os.path.lexists(partial) and (os.path.islink(partial) or not os.path.isdir(partial)):
        fail(f"{partial} is in the way (this script writes the folder there first): move it, or give another --out")
    return out


def size_text(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def upload_list(folder: str, files: list[str]) -> list[tuple[str, int]]:
    """(path, size) of each file the export wrote, each still a regular file of ``folder``; nothing else."""
    listed = []
    for rel in files:
        path = os.path.join(folder, rel)
        if os.path.islink(path) or not os.path.isfile(path) or not inside(path, folder):
            fail(f"{path} changed after it was exported (it is not the file export wrote): export again")
        listed.append((rel, os.path.getsize(path)))
    return listed


def push(folder: str, repo_id: str, private: bool, message: str, files: list[str]) -> str:
    """Upload exactly ``files`` of ``folder`` (those the export wrote), listed first."""
    from huggingface_hub import HfApi

    listed = upload_list(folder, files)
    print(f"uploading {len(listed)} files ({size_text(sum(s for _, s in listed))}) to {repo_id}:")
    for rel, size in listed:
        print(f"  {rel}  {size_text(size)}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            commit_message=message,
            allow_patterns=[rel for rel, _ in listed],  # the exported files, by their exact names
        )
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        fail(
            f"could not push to {repo_id} ({type(exc).__name__}: {detail}); the folder is ready at {folder} "
            "(log in with `hf auth login` or set HF_TOKEN, then rerun with --push)"
        )
    return str(url)


def main(argv=None) -> str:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "run_dir", help="a finished run's directory, or one of its checkpoints/checkpoint_* directories"
    )
    parser.add_argument(
        "--checkpoint", help="export the checkpoint saved after this epoch (or 'latest') instead of final/"
    )
    parser.add_argument("--out", help="the folder to write (default <run>/export, or <run>/export_checkpoint_<epoch>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--push", metavar="REPO_ID", help="upload the folder to this Hub model repository (owner/name)")
    parser.add_argument("--private", action="store_true", help="with --push: create the repository private")
    parser.add_argument(
        "--prompts", nargs="+", help=f"prompts of the sample grid (default: {NUM_PROMPTS} of the run's prompt set)"
    )
    add_seed_options(parser, default=4, what="of the sample grid", was_a_list=True)
    parser.add_argument("--no-sample", action="store_true", help="no sampling: reuse the run's last logged image grid")
    parser.add_argument("--model-path", help="base model (hub id or directory) to sample from instead of the run's own")
    parser.add_argument("--device", help="device to sample on (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.private and not args.push:
        fail("--private applies to --push only")
    if args.push and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.push):
        fail(f"--push {args.push}: a Hub repository id is owner/name")

    seeds = seeds_of(args)
    source = locate(args.run_dir, args.checkpoint)
    kind, folders, files = weight_files(source)
    cfg, choices, overrides, records = read_run(source)
    evaluations = read_evaluations(source)
    out = check_out(args.out or default_out(source), source, args.overwrite)
    pipeline = choices.get("pipeline", "ddim")
    family = pipeline_family(cfg, choices)
    if not args.no_sample and family != "other":  # sampling: the device before any model is built
        import torch

        args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from ddpo.logging import plot_reward_curve

    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a folder an interrupted export left
    written = []  # the folder's files, each written here: the only ones --push uploads
    try:
        os.makedirs(tmp)
        for rel in files:  # the allow-listed weights, read through their checked real paths
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(os.path.realpath(os.path.join(source.weights_dir, rel)), os.path.join(tmp, rel))
            written.append(rel)
        plot_reward_curve(records, os.path.join(tmp, "reward_curve.png"), title=os.path.basename(source.run_dir))
        written.append("reward_curve.png")

        prompts = args.prompts or run_prompts(cfg, NUM_PROMPTS)[0]
        grid, caption = card_samples(args, source, cfg, prompts, seeds, pipeline, family)
        if grid is not None:
            grid.save(os.path.join(tmp, "samples.png"))
            written.append("samples.png")
        values = plain(cfg)
        repo = args.push or os.path.basename(out)  # a Hub id, or this folder's path from its parent
        usage = usage_code(values, kind, folders, source.weights_dir, repo, prompts[0], family)
        write_card(
            os.path.join(tmp, "README.md"),
            source,
            values,
            choices,
            overrides,
            records,
            kind=kind,
            folders=folders,
            family=family,
            evaluations=evaluations,
            usage=usage,
            samples_caption=caption if grid is not None else None,
        )
        written.append("README.md")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk, a folder it may not write: one line, and no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot export to {out} ({first_line(exc)})")
    except BaseException:  # an error or Ctrl-C leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {kind} weights ({source.label}, {len(records)} epochs) -> {out}")
    if args.push:
        message = f"Upload {os.path.basename(source.run_dir)} ({source.label})"
        url = push(out, args.push, args.private, message, written)
        print(f"pushed to {url}")
    return out


def cli() -> None:
    """The ``ddpo-export`` console script (``main`` returns the folder, which a console script would
    take for an exit status)."""
    main()


if __name__ == "__main__":
    cli()
