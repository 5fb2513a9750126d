"""The evaluation harness: statistics, determinism, eval.every == scripts/evaluate.py, eval curves."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpo.evaluation import diversity, evaluate, flat_metrics, interval
from ddpo.models.loading import tiny_shapes_dir
from tests.conftest import ROOT, run_cli, run_evaluate

needs_model = pytest.mark.skipif(
    not (tiny_shapes_dir() / "model_index.json").is_file(),
    reason="the tiny shapes model is not in ddpo/assets/tiny_shapes",
)
EVALUATE = ROOT / "scripts" / "evaluate.py"
PLOT_RUNS = ROOT / "scripts" / "plot_runs.py"
# the shapes preset made small: 4 denoising steps, 8 samples per epoch, 2 seeds per held-out caption
SMALL_SHAPES = [
    "experiment=tiny_shapes_alignment",
    "logger=none",
    "sample.num_steps=4",
    "sample.batch_size=4",
    "train.batch_size=4",
    "num_epochs=2",
    "save_freq=2",
    "eval.every=2",
    "eval.seeds=2",
]


def test_intervals():
    binary = interval(np.array([1.0] * 30 + [0.0] * 70 + [math.nan] * 5))  # NaN: not applicable, left out
    assert binary["n"] == 100 and binary["mean"] == pytest.approx(0.3)
    low, high = binary["ci95"]
    assert low == pytest.approx(0.2189, abs=1e-3) and high == pytest.approx(0.3958, abs=1e-3)  # Wilson
    assert interval(np.ones(10))["ci95"][1] <= 1.0  # Wilson stays inside [0, 1]
    values = np.arange(10, dtype=float)
    continuous = interval(values)
    half = 2.2621571627409915 * values.std(ddof=1) / math.sqrt(10)  # Student's t(0.975, 9), not z = 1.96
    assert continuous["ci95"] == pytest.approx([4.5 - half, 4.5 + half])
    three = interval(np.array([1.0, 2.0, 4.0]))  # three seeds: t(0.975, 2) = 4.303, the z interval's 2.2 times
    assert three["ci95"][1] - three["mean"] == pytest.approx(
        4.302652729911275 * np.std([1, 2, 4], ddof=1) / math.sqrt(3)
    )
    assert interval(np.array([math.nan]))["n"] == 0


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    base = torch.rand(1, 3, 8, 8)
    same = base.repeat(4, 1, 1, 1)
    assert diversity(same, 1)[0] == 0
    spread = torch.cat([same[:2], 1 - same[:2]])
    assert diversity(spread, 1)[0] > 0.1
    two = diversity(torch.cat([same, spread]), 2)
    assert two[0] == 0 and two[1] == pytest.approx(diversity(spread, 1)[0])


@needs_model
def test_evaluation_is_deterministic_and_independent_of_the_batch():
    from ddpo.models import tiny_shapes_model
    from ddpo.pipelines import StableDiffusionDDPOPipeline
    from rewards.shapes import ShapeAlignment

    pipeline = StableDiffusionDDPOPipeline(tiny_shapes_model(), use_lora=False, num_steps=4, guidance_scale=4.0)
    prompts = ["a red circle", "two blue triangles", "a green square above a yellow triangle"]
    rewards = {"shape_alignment": ShapeAlignment()}
    first = evaluate(pipeline, prompts, [0, 1, 2], rewards, batch_size=4)
    again = evaluate(pipeline, prompts, [0, 1, 2], rewards, batch_size=4)
    other_batch = evaluate(pipeline, prompts, [0, 1, 2], rewards, batch_size=9)
    assert torch.equal(first.images, again.images)
    assert first.summary == again.summary
    assert torch.allclose(first.images, other_batch.images, atol=1e-4)
    assert first.summary["num_images"] == 9 and first.prompts[3] == "two blue triangles"
    metrics = flat_metrics(first.summary)
    assert {
        "eval_shape_alignment_mean",
        "eval_shape_alignment_correct",
        "eval_shape_alignment_position",
        "eval_diversity",
    } <= set(metrics)
    assert first.summary["scores"]["shape_alignment/position"]["n"] == 3  # only the relation caption has one


@needs_model
def test_eval_every_logs_what_evaluate_reports_for_the_same_weights(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, SMALL_SHAPES, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2]  # the base model, then after the last epoch
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval_shape_alignment_correct" not in metrics[0]
    assert metrics[1]["eval_shape_alignment_correct"] == evals[1]["eval_shape_alignment_correct"]
    assert metrics[1]["eval_epochs_trained"] == 2
    assert {"eval_shape_proxy_mean", "eval_diversity"} <= set(evals[0])

    out = tmp_path / "eval"
    summary = run_evaluate(run_dir, out)
    assert summary["weights"].endswith("checkpoint_00002")
    for label, logged in (("base", evals[0]), ("trained", evals[1])):
        reported = flat_metrics(summary[label])
        for key, value in reported.items():
            assert value == pytest.approx(logged[key], rel=1e-6, abs=1e-9), (label, key)
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "samples_trained.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 * 2 and rows[0].startswith("prompt,seed,shape_alignment")

    plotted = subprocess.run(
        [
            sys.executable,
            str(PLOT_RUNS),
            str(run_dir),
            "--metric",
            "eval_shape_alignment_correct",
            "--metric",
            "eval_shape_proxy_mean",
            "--out",
            str(tmp_path / "eval.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_evaluate_refuses_code_in_a_run_config(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint_1" / "ddpo_state.json").write_text("{}")
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cfg = compose(["model=tiny", "eval.every=1"])
    cfg.eval.prompt = {"_target_": "os.system", "command": "touch " + str(tmp_path / "pwned")}
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    checkpoint = run_dir / "checkpoints" / "checkpoint_1"
    done = subprocess.run(
        [sys.executable, str(EVALUATE), str(checkpoint), "--seeds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert "not a class of this project" in done.stderr
    assert not (tmp_path / "pwned").exists()


def test_reward_info_means_leave_out_what_does_not_apply():
    from ddpo.reward_calls import finite_mean

    assert finite_mean(np.array([1.0, math.nan, 0.0])) == 0.5  # before: NaN, written as null
    assert finite_mean(np.array([math.nan, math.nan])) is None
