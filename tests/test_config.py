"""The config groups compose, the batch arithmetic is right, and a tiny run completes with every logger."""

from __future__ import annotations

import glob
import inspect
import math
import os

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from ddpo.config import plan_batches, run_config
from ddpo.errors import ConfigError
from tests.conftest import CONF_DIR, TINY, compose, read_metrics, run_in_process

GROUPS = ("model", "pipeline", "reward", "prompt", "logger", "experiment")
PROMPT_FILE = os.path.join(os.path.dirname(__file__), "fixtures", "two_prompts.txt")
# what some options need beyond their name to compose and build
EXTRA = {
    ("prompt", "from_file"): [f"prompt.path={PROMPT_FILE}"],
    ("experiment", "flowgrpo_pickscore"): [f"prompt.path={PROMPT_FILE}"],  # Flow-GRPO's prompt list is not shipped
    ("experiment", "nft_pickscore_sd35"): [f"prompt.path={PROMPT_FILE}"],  # nor DiffusionNFT's
    ("experiment", "awm_pickscore_sd35"): [f"prompt.path={PROMPT_FILE}"],  # nor AWM's
    ("experiment", "dancegrpo_flux_hps"): [f"prompt.path={PROMPT_FILE}"],  # nor DanceGRPO's
}
REQUIRED_METRICS = (
    "epoch",
    "global_step",
    "reward_mean",
    "reward_std",
    "loss",
    "approx_kl",
    "clipfrac",
    "epoch_time_s",
    "samples_per_s",
)


def options(group: str) -> list[str]:
    return sorted(name[:-5] for name in os.listdir(CONF_DIR / group) if name.endswith(".yaml"))


ALL_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"
    assert {"tiny", "sd15"} <= set(options("model"))
    assert {"none", "tensorboard", "wandb"} <= set(options("logger"))
    assert "from_file" in options("prompt")


def _target_nodes(node, path=""):
    """(dotted path, node) of every mapping with a _target_ inside ``node``."""
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_option_composes(group, option):
    cfg = compose([f"{group}={option}", *EXTRA.get((group, option), [])])
    if group != "experiment":
        assert cfg[group], f"{group}={option} is empty"
    # the typed part of the config is valid and its batch arithmetic holds
    plan = plan_batches(run_config(cfg))
    assert plan.optimizer_steps_per_epoch >= 1
    # every _target_ of the option names an importable callable whose signature takes the YAML's keys,
    # so the group's config can be instantiated as written (extra keys are a TypeError at build time)
    node = cfg if group == "experiment" else cfg[group]
    targets = list(_target_nodes(node, "" if group == "experiment" else group))
    if group != "experiment":
        assert targets, f"{group}={option} names no _target_"
    for path, target_node in targets:
        target = get_object(target_node._target_)
        assert callable(target), f"{path}._target_={target_node._target_} is not callable"
        kwargs = {k: v for k, v in target_node.items() if not str(k).startswith("_")}
        try:
            inspect.signature(target).bind_partial(**kwargs)
        except TypeError as exc:
            pytest.fail(f"{group}={option}: {path} ({target_node._target_}) does not accept its keys: {exc}")


def test_option_values_land():
    cfg = compose(["experiment=tiny_compressibility"])
    assert cfg.model._target_ == "ddpo.models.tiny_model"
    assert cfg.reward._target_ == "ddpo.rewards.jpeg.JpegCompressibility"
    assert cfg.prompt._target_ == "ddpo.prompts.SimpleAnimals"
    assert cfg.num_epochs == 30 and cfg.use_lora is False
    assert run_config(cfg).mixed_precision.value == "no"
    assert (cfg.sample.num_steps, cfg.sample.batch_size, cfg.sample.num_batches_per_epoch) == (10, 8, 4)
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    # values not in the preset keep config.yaml's defaults
    assert cfg.sample.eta == 1.0 and cfg.train.clip_range == pytest.approx(1e-4)

    # the command line beats the preset
    cfg = compose(["experiment=tiny_compressibility", "num_epochs=3", "reward=jpeg_incompressibility"])
    assert cfg.num_epochs == 3 and cfg.reward._target_ == "ddpo.rewards.jpeg.JpegIncompressibility"

    defaults = compose()
    assert defaults.model.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert defaults.logger.backend == "tensorboard"
    assert compose(["model=sd14"]).model.path == "CompVis/stable-diffusion-v1-4"
    assert compose(["logger=wandb"]).logger.backend == "wandb"
    assert compose(["logger=none"]).logger.backend == "none"
    assert compose(["prompt=from_file", f"prompt.path={PROMPT_FILE}"]).prompt.path == PROMPT_FILE
    assert compose(["reward=aesthetic"]).reward._target_ == "ddpo.rewards.aesthetic.AestheticReward"


def test_typed_schema_rejects_bad_keys_and_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["foo=1"])
    with pytest.raises(ConfigCompositionException):
        compose(["sample.batch_size=abc"])
    with pytest.raises(ConfigCompositionException):
        compose(["mixed_precision=fp32"])
    run = run_config(compose(["mixed_precision=bf16", "checkpoints_total_limit=null"]))
    assert run.mixed_precision.value == "bf16" and run.checkpoints_total_limit is None


# -- batch arithmetic ---------------------------------------------------------------------------
PAPER = [
    "sample.batch_size=8",
    "sample.num_batches_per_epoch=4",
    "train.batch_size=4",
    "train.gradient_accumulation_steps=2",
    "sample.num_steps=50",
    "train.timestep_fraction=0.5",
]


def test_plan_batches_paper_preset():
    run = run_config(compose(PAPER))
    plan = plan_batches(run)
    assert plan.samples_per_epoch_per_process == 32
    assert plan.samples_per_epoch == 32
    assert plan.train_batches_per_epoch == 8
    assert plan.optimizer_steps_per_epoch == 4
    assert plan.trained_timesteps == 25

    two = plan_batches(run, world_size=2)
    assert two.samples_per_epoch == 64
    assert two.optimizer_steps_per_epoch == 4  # batch sizes are per process
    summary = two.summary(run)
    assert "64 samples" in summary and "global train batch 16 samples" in summary


def test_plan_batches_rejects_non_dividing_sizes():
    with pytest.raises(ConfigError, match=r"train\.batch_size=3"):
        plan_batches(run_config(compose([*PAPER, "train.batch_size=3"])))
    with pytest.raises(ConfigError, match=r"train\.gradient_accumulation_steps=3"):
        plan_batches(run_config(compose([*PAPER, "train.gradient_accumulation_steps=3"])))
    for fraction in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"train\.timestep_fraction"):
            plan_batches(run_config(compose([f"train.timestep_fraction={fraction}"])))


# -- a tiny run with each logger ----------------------------------------------------------------
@pytest.mark.parametrize("logger", ["none", "tensorboard", "wandb"])
def test_tiny_run_with_each_logger(logger, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may be written into the working directory
    # build() may set WANDB_DIR in os.environ: make sure it does not leak into later tests
    monkeypatch.setenv("WANDB_DIR", "unset")
    monkeypatch.delenv("WANDB_DIR")
    run_dir = tmp_path / "run"

    final_reward, components = run_in_process(run_dir, [*TINY, f"logger={logger}"])

    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    steps_per_epoch = components.plan.optimizer_steps_per_epoch
    assert steps_per_epoch == 2  # 2 x 2 samples, train batches of 2, no accumulation
    assert [r["global_step"] for r in records] == [2, 4]
    for record in records:
        missing = [k for k in REQUIRED_METRICS if k not in record]
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert all(math.isfinite(record[k]) for k in REQUIRED_METRICS)
        assert record["num_samples"] == 4 and record["epoch_time_s"] > 0 and record["samples_per_s"] > 0
        assert 0.0 <= record["clipfrac"] <= 1.0 and record["approx_kl"] >= 0.0
        assert record["reward_std"] >= 0.0
        assert record["reward_mean"] < 0  # jpeg_compressibility: minus a size in kB
    assert final_reward == pytest.approx(records[-1]["reward_mean"])

    assert sorted(os.listdir(run_dir / "images")) == ["step_000002.png", "step_000004.png"]
    assert (run_dir / "reward_curve.png").is_file()
    assert os.listdir(cwd) == [], f"the run wrote into the working directory: {os.listdir(cwd)}"

    events = glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True)
    wandb_runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    if logger == "tensorboard":
        assert events, "no tensorboard event files under the run directory"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        scalars = {}
        for directory in {os.path.dirname(e) for e in events}:
            accumulator = EventAccumulator(directory)
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars[tag] = [(s.step, s.value) for s in accumulator.Scalars(tag)]
        assert [step for step, _ in scalars["reward_mean"]] == [2, 4]
        assert [v for _, v in scalars["reward_mean"]] == pytest.approx([r["reward_mean"] for r in records])
        assert not (run_dir / "wandb").exists()
    elif logger == "wandb":
        assert len(wandb_runs) == 1, "the offline wandb run is not under <run dir>/wandb"
        offline = wandb_runs[0]
        assert glob.glob(os.path.join(offline, "run-*.wandb"))
        assert glob.glob(os.path.join(offline, "files", "media", "images", "*.png"))
        assert not events
    else:
        assert not events and not (run_dir / "wandb").exists()


def test_the_ddim_pipeline_checks_its_own_eta(tmp_path):
    """eta > 0 is the DDIM sampler's requirement: its pipeline checks it, not the run schema."""
    from ddpo.config import build

    plan_batches(run_config(compose(["sample.eta=0"])))  # the schema has no opinion
    with pytest.raises(ConfigError, match=r"sample\.eta must be > 0"):
        build(compose(["model=tiny", "logger=none", "sample.eta=0"]), str(tmp_path))


@pytest.mark.parametrize(
    "preset, alignment",
    [
        ("tiny_shapes_compressibility", "tiny_shapes_alignment"),
        ("tiny_shapes_flow_compressibility", "tiny_shapes_flow_alignment"),
    ],
)
@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_the_compressibility_presets_on_the_pretrained_models_are_their_alignment_twins(preset, alignment, algorithm):
    """The README's forward-process figures were measured with the alignment presets and the reward
    swapped: the compressibility presets compose to the same training config (evaluation aside)."""
    ours = OmegaConf.to_container(compose([f"experiment={preset}", f"algorithm={algorithm}"]), resolve=True)
    measured = compose(
        [f"experiment={alignment}", "reward=jpeg_compressibility", "eval.every=0", "num_epochs=30", "save_freq=30"]
        + [f"algorithm={algorithm}"]
    )
    measured = OmegaConf.to_container(measured, resolve=True)
    ours.pop("eval"), measured.pop("eval")
    assert ours == measured


def test_forward_process_runs_on_a_random_weight_model_are_recognised():
    """What the start-up warning for nft/awm on model=tiny, tiny_flow, tiny_sdxl reads."""
    from ddpo.models.loading import random_weights

    assert all(random_weights(compose([f"model={m}"]).model) for m in ("tiny", "tiny_flow", "tiny_sdxl"))
    assert not random_weights(compose(["model=tiny_shapes"]).model)
    assert not random_weights(compose(["model=tiny", "model.path=/some/trained/model"]).model)
    assert not random_weights(compose(["model=sd15"]).model)
    assert all(random_weights(compose([f"model={m}"]).model) for m in ("sd15_arch", "sd3_arch"))


@pytest.mark.parametrize("algorithm, warned", [("nft", True), ("awm", True), ("ddpo", False)])
def test_a_forward_process_algorithm_on_the_random_tiny_model_is_warned_at_start(tmp_path, caplog, algorithm, warned):
    from ddpo.config import build
    from tests.conftest import TINY

    overrides = TINY + [f"algorithm={algorithm}"] + (["algorithm.group_size=2"] if algorithm != "ddpo" else [])
    with caplog.at_level("WARNING", logger="ddpo.config"):
        build(compose(overrides), str(tmp_path))
    messages = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert bool(messages) == warned, messages
    if warned:
        assert "tiny_model" in messages[0] and "tiny_shapes_compressibility" in messages[0]
