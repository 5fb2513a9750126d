"""The shapes world: grammar, splits, the exact checker, its reward, the learned proxy, the shipped model."""

import math
import random

import numpy as np
import pytest
import torch

from ddpo import shapes
from ddpo.errors import ConfigError
from ddpo.models.loading import tiny_shapes_dir
from ddpo.prompts import ShapesPrompts, shapes_eval_prompts

SHIPPED = tiny_shapes_dir()
needs_model = pytest.mark.skipif(
    not (SHIPPED / "model_index.json").is_file(), reason="the tiny shapes model is not in ddpo/assets/tiny_shapes"
)
SHIPPED_FLOW = tiny_shapes_dir("tiny_shapes_flow")
needs_flow_model = pytest.mark.skipif(
    not (SHIPPED_FLOW / "model_index.json").is_file(),
    reason="the tiny shapes flow model is not in ddpo/assets/tiny_shapes_flow",
)


def test_grammar_round_trips_and_splits_are_disjoint():
    scenes = shapes.all_scenes()
    assert len(scenes) == 480 and len(set(scenes)) == 480
    for scene in scenes:
        assert shapes.parse(scene.caption) == scene
    train = {s.caption for s in scenes if shapes.split(s) == "train"}
    heldout = {s.caption for s in scenes if shapes.split(s) == "heldout"}
    assert len(train) == 224 and len(heldout) == 256 and not train & heldout
    for caption in train:  # no held-out colour-shape pairing is ever drawn in RL training
        assert not shapes.parse(caption).pairs & shapes.HELDOUT_PAIRS
    assert shapes.parse("two red circles") == shapes.Scene((shapes.Spec("red", "circle", 2),))
    for bad in ("a purple circle", "two red circle", "a red circles", "a red circle left of a red square", ""):
        with pytest.raises(ValueError):
            shapes.parse(bad)


def test_prompt_sets_draw_only_their_split():
    rng = random.Random(0)
    train, heldout = ShapesPrompts("train"), ShapesPrompts("heldout")
    drawn = {train(rng)[0] for _ in range(2000)}
    assert all(shapes.split(shapes.parse(p)) == "train" for p in drawn)
    assert {shapes.parse(p).kind for p in drawn} == {"single", "counting", "relation"}
    assert all(shapes.split(shapes.parse(heldout(rng)[0])) == "heldout" for _ in range(500))
    prompts = shapes_eval_prompts("heldout")
    assert prompts == heldout.eval_prompts() == shapes_eval_prompts("heldout")  # fixed
    assert len(prompts) == 32 and len(set(prompts)) == 32
    assert all(shapes.split(shapes.parse(p)) == "heldout" for p in prompts)
    with pytest.raises(ConfigError, match="prompt.split"):
        ShapesPrompts("test")
    hard = ShapesPrompts("train", kinds=["counting", "relation"])
    assert {shapes.parse(hard(rng)[0]).kind for _ in range(500)} == {"counting", "relation"}
    assert len(hard) == 24 + 192
    with pytest.raises(ConfigError, match="prompt.kinds"):
        ShapesPrompts("train", kinds=["pairs"])


def test_checker_is_exact_on_renders():
    rng = random.Random(1234)
    for scene in shapes.all_scenes():
        for size in (32, 48):
            verdict = shapes.check_image(shapes.render_scene(scene, rng, size), scene)
            assert verdict.correct and verdict.score == 1.0, (scene.caption, size, verdict)
            assert len(verdict.objects) == sum(s.count for s in scene.specs)
            assert {(o.colour, o.shape) for o in verdict.objects} == scene.pairs


@pytest.mark.parametrize("attribute", ["colour", "shape", "count", "relation"])
def test_checker_catches_each_wrong_attribute(attribute):
    rng = random.Random(7)
    scenes = shapes.all_scenes()
    if attribute in ("count", "relation"):
        scenes = [s for s in scenes if (s.relation is not None) == (attribute == "relation")]
    for scene in rng.sample(scenes, 40):
        wrong = shapes.perturb(scene, rng, attribute)
        verdict = shapes.check_image(shapes.render_scene(wrong, rng), scene)
        assert not verdict.correct and verdict.score < 1.0, (scene.caption, wrong.caption)
        expected_false = {"colour": "colour", "shape": "shape", "count": "count", "relation": "position"}[attribute]
        assert verdict.attributes[expected_false] is False, (scene.caption, wrong.caption, verdict)
        if attribute in ("count", "relation"):  # the right objects are there, only their number / place is wrong
            assert verdict.colour and verdict.shape


def test_checker_ignores_specks_and_refuses_blobs():
    scene = shapes.parse("a blue square")
    image = shapes.render([shapes.Placed("blue", "square", 4, 4, 8)])
    image[20, 20] = shapes.COLOURS["red"]  # a one-pixel speck is noise, not an object
    assert shapes.check_image(image, scene).correct
    ring = np.full((32, 32, 3), 255, dtype=np.uint8)
    ring[4:16, 4:16] = shapes.COLOURS["blue"]
    ring[6:14, 6:14] = 255  # a thin hollow square (overlap 0.56 with the square template) is no shape
    found = shapes.detect(ring)
    assert len(found) == 1 and found[0].shape is None
    assert not shapes.check_image(ring, scene).shape


def test_shape_alignment_reward():
    from rewards.base import Reward
    from rewards.shapes import ShapeAlignment

    reward = ShapeAlignment()
    assert isinstance(reward, Reward)
    rng = random.Random(3)
    prompts = ["two red circles", "a blue square left of a yellow triangle"]
    right = [shapes.render_scene(shapes.parse(p), rng) for p in prompts]
    wrong = [
        shapes.render_scene(shapes.parse("three red circles"), rng),
        shapes.render_scene(shapes.parse("a blue square right of a yellow triangle"), rng),
    ]
    images = torch.from_numpy(np.stack(right + wrong)).permute(0, 3, 1, 2).float() / 255
    values, info = reward(images, prompts + prompts, [{}] * 4)
    assert values.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 3 / 4])
    assert info["correct"].tolist() == [1, 1, 0, 0]
    assert info["count"].tolist() == [1, 1, 0, 1]
    assert (
        math.isnan(info["position"][0])
        and info["position"][1] == 1
        and info["position"][3] == 0
        and math.isnan(info["position"][2])
    )
    with pytest.raises(ConfigError, match="shapes grammar"):
        reward(images[:1], ["a cat"], [{}])


def test_word_tokenizer_gives_one_token_per_grammar_word():
    from ddpo.models.tokenizer import build_word_tokenizer

    words = sorted({w for s in shapes.all_scenes() for w in s.caption.split()})
    tokenizer = build_word_tokenizer(words)
    for word in words:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    assert len(tokenizer("a purple hexagon").input_ids) > 5  # any text still tokenises (by characters)


@needs_model
def test_shipped_model_is_small_safetensors_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights), weights
    assert sum(f.stat().st_size for f in files) < 15e6
    from ddpo.models import tiny_shapes_model

    pipe = tiny_shapes_model()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.sample_size * 2 == 32


@needs_flow_model
def test_shipped_flow_twin_is_small_safetensors_shares_the_vae_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [f for f in SHIPPED_FLOW.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights), weights
    assert all(f.stat().st_size < 15e6 for f in weights)
    vae, twin_vae = (d / "vae" / "diffusion_pytorch_model.safetensors" for d in (SHIPPED, SHIPPED_FLOW))
    assert vae.read_bytes() == twin_vae.read_bytes()  # the same image space as the DDIM model
    from ddpo.models import tiny_shapes_flow_model

    pipe = tiny_shapes_flow_model()
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.transformer.config.sample_size * 2 == 32


@needs_flow_model
def test_flow_twin_preset_trains_and_evaluates_on_the_held_out_checker(tmp_path):
    import json

    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=tiny_shapes_flow_alignment",
        "logger=none",
        "sample.num_steps=4",
        "pipeline.sde_window=[0,3]",
        "pipeline.eval_num_steps=4",
        "algorithm.group_size=4",
        "sample.batch_size=8",
        "sample.num_batches_per_epoch=1",
        "train.batch_size=8",
        "num_epochs=1",
        "save_freq=1",
        "eval.every=1",
        "eval.seeds=1",
    ]
    result = run_cli(run_dir, overrides, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1]
    for record in evals:
        assert 0 <= record["eval_shape_alignment_correct"] <= 1 and record["eval_shape_alignment_colour"] > 0.5
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


@needs_model
def test_learned_proxy_tells_matching_captions_from_changed_ones():
    from rewards.shapes import ShapeProxy

    proxy = ShapeProxy()
    rng = random.Random(11)
    scenes = rng.sample(shapes.all_scenes(), 100)
    images = torch.from_numpy(np.stack([shapes.render_scene(s, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    right, _ = proxy(images, [s.caption for s in scenes], [{}] * 100)
    wrong, _ = proxy(images, [shapes.perturb(s, rng).caption for s in scenes], [{}] * 100)
    assert ((right >= 0) & (right <= 1)).all()
    assert (right > wrong).float().mean() > 0.8
