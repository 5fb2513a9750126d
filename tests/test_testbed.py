"""The testbed world (model=tiny_testbed, experiment=testbed): captions, the colour slip, the checker
on its renders, the shipped model's known base rate, and its evaluation harness."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ddpo import shapes
from ddpo.models.loading import tiny_shapes_dir
from tests.conftest import compose, load_script, run_cli, run_evaluate

SHIPPED = tiny_shapes_dir("tiny_testbed")
needs_model = pytest.mark.skipif(
    not (SHIPPED / "model_index.json").is_file(), reason="the testbed model is not in ddpo/assets/tiny_testbed"
)


def test_captions_are_single_objects_and_counts_split_by_pairing():
    from ddpo.prompts import ShapesPrompts

    train, heldout = ShapesPrompts("train", ["single", "counting"]), ShapesPrompts("heldout", ["single", "counting"])
    train_captions = {c for captions in train.by_kind.values() for c in captions}
    heldout_captions = set(heldout.eval_prompts())
    assert len(train_captions) == 32 and len(heldout_captions) == 16 and not train_captions & heldout_captions
    assert len(heldout.eval_prompts()) == 16  # every held-out caption, once
    for caption in train_captions | heldout_captions:
        scene = shapes.parse(caption)
        assert scene.relation is None
        assert (shapes.split(scene) == "heldout") == (caption in heldout_captions)
    # the full held-out set of the hard task keeps its 16 relation captions
    assert len(ShapesPrompts("heldout").eval_prompts()) == 32


def test_the_slip_is_one_cycle_through_the_four_colours():
    colour, seen = "red", []
    for _ in range(4):
        seen.append(colour)
        colour = shapes.COLOUR_SLIP[colour]
    assert colour == "red" and sorted(seen) == sorted(shapes.COLOURS)
    with pytest.raises(ValueError):
        shapes.slipped(shapes.parse("a red circle left of a blue square"))


def astuple(scene):
    return scene.specs[0].shape, scene.specs[0].count


def test_checker_is_exact_on_the_testbed_renders_and_fails_slipped_ones_on_colour_only():
    rng = random.Random(0)
    scenes = [s for s in shapes.all_scenes() if s.relation is None]
    assert len(scenes) == 48
    for scene in scenes:
        for _ in range(2):
            clean = shapes.check_image(shapes.render_scene(scene, rng), scene.caption)
            assert clean.correct, scene.caption
            wrong = shapes.check_image(shapes.render_scene(shapes.slipped(scene), rng), scene.caption)
            assert not wrong.correct and not wrong.attributes["colour"], scene.caption
            # what was drawn is right but for its colour: the slipped caption describes it exactly
            partner = shapes.Scene((shapes.Spec(shapes.COLOUR_SLIP[scene.specs[0].colour], *astuple(scene)),))
            assert shapes.check(partner, wrong.objects).correct, scene.caption


def test_the_pretraining_data_slips_at_its_rate_reproducibly():
    script = load_script("pretrain_testbed")
    images, scenes, slips = script.build_dataset(2000, seed=3, split="all", slip=0.5)
    again, _, slips_again = script.build_dataset(2000, seed=3, split="all", slip=0.5)
    assert np.array_equal(images, again) and slips == slips_again
    assert 0.45 < np.mean(slips) < 0.55
    assert {s.kind for s in scenes} == {"single", "counting"}
    _, train_scenes, none = script.build_dataset(500, seed=3, split="train", slip=0.0)
    assert not any(none) and all(shapes.split(s) == "train" for s in train_scenes)
    for image, scene, slip in list(zip(images, scenes, slips))[:200]:  # a slipped render is wrong on colour only
        verdict = shapes.check_image(image, scene.caption)
        assert verdict.correct != slip and verdict.attributes["colour"] != slip


@needs_model
def test_shipped_testbed_is_small_safetensors_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20e6
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    from ddpo.models import tiny_testbed_model

    pipe = tiny_testbed_model()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    record = json.loads((SHIPPED / "pretrain.json").read_text())
    assert record["settings"]["slip"] == 0.5


@needs_model
def test_the_base_draws_the_named_colour_about_half_of_the_time():
    """The design's premise, on the training sampler (10 DDIM steps, eta 1, guidance 4): the named
    colour about half of the time, and the named shape in most images of that colour (the checker's
    shape and count look at objects of the named colour only)."""
    from ddpo.evaluation import evaluate
    from ddpo.models import tiny_testbed_model
    from ddpo.pipelines import StableDiffusionDDPOPipeline
    from ddpo.prompts import ShapesPrompts
    from rewards.shapes import ShapeAlignment

    pipeline = StableDiffusionDDPOPipeline(tiny_testbed_model(), use_lora=False, num_steps=10, guidance_scale=4.0)
    prompts = [p for p in ShapesPrompts("train", ["single"]).by_kind["single"]]  # 8 single objects
    result = evaluate(pipeline, prompts, list(range(8)), {"shape_alignment": ShapeAlignment()}, batch_size=64)
    scores = result.summary["scores"]
    assert 0.3 < scores["shape_alignment/colour"]["mean"] < 0.7
    assert scores["shape_alignment/shape"]["mean"] > 0.6 * scores["shape_alignment/colour"]["mean"]


@pytest.mark.slow
@needs_model
def test_testbed_eval_every_logs_what_evaluate_reports(tmp_path):
    run_dir = tmp_path / "run"
    small = ["experiment=testbed_ddpo", "logger=none", "sample.num_steps=4", "sample.batch_size=4"]
    small += ["train.batch_size=4", "num_epochs=2", "save_freq=2", "eval.every=2", "eval.seeds=2"]
    result = run_cli(run_dir, small, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2]
    out = tmp_path / "eval"
    summary = run_evaluate(run_dir, out)
    from ddpo.evaluation import flat_metrics

    for label, logged in (("base", evals[0]), ("trained", evals[1])):
        for key, value in flat_metrics(summary[label]).items():
            if logged[key] is None:  # no caption has a relation: NaN, written as null
                assert value is None or value != value, (label, key)
                continue
            assert value == pytest.approx(logged[key], rel=1e-6, abs=1e-9), (label, key)
    rows = (out / "samples_trained.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 * 2


def test_the_draft_testbed_evaluates_the_exact_checker_beside_its_proxy():
    """experiment=testbed_draft trains on the proxy; its held-out evaluation must still score the exact checker
    (before, the proxy replaced the checker as the training reward and the checker left the evaluation)."""
    cfg = compose(["experiment=testbed_draft"])
    assert cfg.reward._target_.endswith("ShapeProxy")
    assert cfg.eval.rewards.shape_alignment._target_.endswith("ShapeAlignment")
    assert cfg.eval.rewards.shape_proxy._target_.endswith("ShapeProxy")


def test_the_testbed_preset_runs_the_algorithm_that_learned_most_there():
    """experiment=testbed is the newcomer's preset: it runs DiffusionNFT, which raised held-out correct the most in
    the same-hour comparison of all five algorithms (README, "The testbed"); testbed_nft names the same run."""
    cfg = compose(["experiment=testbed"])
    assert cfg.algorithm._target_ == compose(["experiment=testbed_nft"]).algorithm._target_
    assert cfg.algorithm._target_.endswith("NFT")
