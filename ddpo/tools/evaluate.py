"""Evaluate a run (base vs trained) or a base model on fixed held-out prompts x fixed seeds.

    ddpo-evaluate outputs/2026-11-25/10-00-00-000000            # a run: base and trained
    ddpo-evaluate outputs/.../checkpoints/checkpoint_20         # the weights of one checkpoint
    ddpo-evaluate experiment=tiny_shapes_alignment               # a base model (Hydra overrides)
    ddpo-evaluate <run> --seeds 4                                # seeds 0..3 per prompt (default 16)

(in a clone: ``python scripts/evaluate.py`` with the same arguments; ``--seed-list`` gives seed values).

The prompts, rewards and sampler are the run's (``eval.prompt`` or its training prompt set; its
training reward plus ``eval.rewards``; ``sample.*``), so the numbers equal what ``eval.every``
logged for the same weights and seeds (for a run with ``train.ema_decay > 0``, the checkpoint's EMA,
as ``eval.every`` and ``final/`` use it). Writes into ``--out`` (default ``<run>/eval``):

- ``summary.json``: per model (base, trained), every reward and info value with its mean and 95%
  confidence interval, the diversity score, and the trained-minus-base differences;
- ``samples_base.csv``, ``samples_trained.csv``: one row per image (prompt, seed, every score);
- ``grid.png``: base and trained side by side on the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ddpo.tools.common import OneLineParser, add_seed_options, fail, seeds_of

# what a run's config may instantiate here: classes of this project only (a config is data, not code)
ALLOWED = {
    "prompt": ("ddpo.prompts", "PromptSet"),
    "reward": ("ddpo.rewards.base", "Reward"),
    "pipeline": ("ddpo.pipelines.base", "DDPOPipeline"),
}


def checked_instantiate(node, kind: str, what: str, **kwargs):
    """``hydra.utils.instantiate`` of a node whose ``_target_`` is a class of this project of the right kind."""
    import importlib

    from hydra.utils import get_class, instantiate

    target = node.get("_target_") if hasattr(node, "get") else None
    if not isinstance(target, str) or not target.startswith(("ddpo.", "rewards.")):  # rewards.*: a clone's old configs
        fail(f"{what}: _target_={target!r} is not a class of this project (ddpo.*, ddpo.rewards.* or rewards.*)")
    module, base = ALLOWED[kind]
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 (any import failure is the same answer)
        fail(f"{what}: cannot locate {target} ({type(exc).__name__}: {exc})")
    if not issubclass(cls, getattr(importlib.import_module(module), base)):
        fail(f"{what}: {target} is not a {base}")
    from ddpo.errors import DDPOError

    try:
        return instantiate(node, **kwargs)
    except DDPOError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ or exc
        if isinstance(cause, DDPOError):
            fail(str(cause))
        fail(f"cannot build {what} ({target}): {type(cause).__name__}: {cause}")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddpo.cli import config_dir
    from ddpo.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 (hydra raises several types for bad overrides)
            fail(f"cannot compose the config from {overrides}: {' '.join(str(exc).split())[:300]}")
    from omegaconf import open_dict

    reward_name = cfg.hydra.runtime.choices.get("reward", "reward")
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, reward_name


def locate(path: str) -> tuple[str, str]:
    """(run directory, checkpoint directory with the trained weights) of a run or checkpoint directory."""
    from ddpo.checkpointing import STATE_FILE, list_checkpoints

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(path)), path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        fail(f"{path} has no checkpoint (checkpoints/checkpoint_*): has the run saved one?")
    return path, checkpoints[-1][1]


def build_pipeline(cfg, device):
    from ddpo import models
    from ddpo.config import run_config
    from ddpo.tools.sample import KNOWN_LOADERS  # the model loaders a config may name

    run = run_config(cfg)
    model = cfg.model
    target = model.get("_target_")
    if target not in KNOWN_LOADERS:
        fail(f"model._target_={target!r} is not one of this project's model loaders ({', '.join(KNOWN_LOADERS)})")
    kwargs = {key: model[key] for key in KNOWN_LOADERS[target] if key in model}
    from ddpo.errors import DDPOError

    try:
        components = getattr(models, target.rsplit(".", 1)[1])(**kwargs)
    except DDPOError as exc:
        fail(str(exc))
    pipeline = checked_instantiate(
        cfg.pipeline,
        "pipeline",
        "the pipeline",
        components=components,
        use_lora=run.use_lora,
        lora_rank=run.lora_rank,
        mixed_precision=run.mixed_precision.value,
        device=device,
        resolution=cfg.model.get("resolution"),
    )
    return run, pipeline


def rewards_of(cfg, reward_name: str, device) -> dict:
    rewards = {reward_name: checked_instantiate(cfg.reward, "reward", "the reward")}
    for name, node in (cfg.eval.get("rewards") or {}).items():
        if name not in rewards:
            rewards[name] = checked_instantiate(node, "reward", f"eval.rewards.{name}")
    for reward in rewards.values():
        if hasattr(reward, "to"):
            reward.to(device)
    return rewards


def print_summary(label: str, summary: dict) -> None:
    print(f"{label}: {summary['num_images']} images ({summary['num_prompts']} prompts x {len(summary['seeds'])} seeds)")
    rows = list(summary["scores"].items()) + [("diversity", summary["diversity"])]
    for name, stats in rows:
        low, high = stats["ci95"]
        print(f"  {name:32s} {stats['mean']:.4f}  [{low:.4f}, {high:.4f}]  n={stats['n']}")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="+", help="a run or checkpoint directory, or Hydra overrides (a base model)")
    add_seed_options(parser, default=16)
    parser.add_argument("--out", help="output directory (default <run>/eval, or ./eval for a base model)")
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in grid.png")
    parser.add_argument("--grid-seeds", type=int, default=4, help="seeds per prompt shown in grid.png")
    parser.add_argument("--no-base", action="store_true", help="for a run: skip the base model")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    seeds = seeds_of(args)

    import torch
    from omegaconf import OmegaConf

    from ddpo.evaluation import comparison_grid, eval_prompts, evaluate, write_outputs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    first = args.target[0]
    is_run = len(args.target) == 1 and "=" not in first
    if is_run:
        if not os.path.isdir(os.path.expanduser(first)):
            fail(f"{first}: no such directory (give a run directory, a checkpoint directory, or Hydra overrides)")
        run_dir, weights_dir = locate(first)
        config_file = os.path.join(run_dir, ".hydra", "config.yaml")
        if not os.path.isfile(config_file):
            fail(f"{config_file} not found: {run_dir} is not a run directory of train.py")
        cfg = OmegaConf.load(config_file)
        choices = os.path.join(run_dir, ".hydra", "hydra.yaml")
        reward_name = (
            OmegaConf.load(choices).hydra.runtime.choices.get("reward", "reward")
            if os.path.isfile(choices)
            else "reward"
        )
        out = args.out or os.path.join(run_dir, "eval")
    else:
        cfg, reward_name = compose(args.target)
        weights_dir = None
        out = args.out or os.path.join(os.getcwd(), "eval")

    run, pipeline = build_pipeline(cfg, device)
    prompt_node = cfg.eval.get("prompt") or cfg.prompt
    prompts = eval_prompts(checked_instantiate(prompt_node, "prompt", "the evaluation prompt set"))
    rewards = rewards_of(cfg, reward_name, device)
    batch_size = run.eval.batch_size
    results, started = {}, time.time()
    if weights_dir is None or not args.no_base:
        with pipeline.evaluation():
            results["base"] = evaluate(pipeline, prompts, seeds, rewards, batch_size)
        print_summary("base", results["base"].summary)
    if weights_dir is not None:
        if run.train.ema_decay > 0:  # the run evaluated (and exported) its EMA: so does this
            pipeline.keep_ema(run.train.ema_decay, run.train.ema_every)
        pipeline.load_trained(weights_dir)
        with pipeline.evaluation(), pipeline.ema_weights():
            results["trained"] = evaluate(pipeline, prompts, seeds, rewards, batch_size)
        print_summary(f"trained ({os.path.relpath(weights_dir, run_dir)})", results["trained"].summary)
    os.makedirs(out, exist_ok=True)
    files = []
    for label, result in results.items():
        files += write_outputs(result, out, f"_{label}")
    summary = {label: result.summary for label, result in results.items()}
    summary["weights"] = weights_dir
    summary["seconds"] = time.time() - started
    if len(results) == 2:
        base, trained = results["base"].summary, results["trained"].summary
        summary["difference"] = {
            name: trained["scores"][name]["mean"] - base["scores"][name]["mean"] for name in base["scores"]
        } | {"diversity": trained["diversity"]["mean"] - base["diversity"]["mean"]}
    from ddpo.logging import finite_json

    path = os.path.join(out, "summary.json")
    with open(path, "w") as handle:
        handle.write(json.dumps(finite_json(summary), indent=2, allow_nan=False) + "\n")
    files.append(path)
    rows = []
    k = len(seeds)
    shown = min(args.grid_seeds, k)
    for p, prompt in enumerate(prompts[: args.grid_prompts]):
        base = results["base"].images[p * k : p * k + shown] if "base" in results else []
        trained = results["trained"].images[p * k : p * k + shown] if "trained" in results else []
        rows.append((prompt, list(base), list(trained)))
    grid_path = os.path.join(out, "grid.png")
    comparison_grid(rows, tile=max(64, min(128, 4 * pipeline.resolution))).save(grid_path)
    files.append(grid_path)
    print(f"wrote {', '.join(os.path.relpath(f) for f in files)} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
