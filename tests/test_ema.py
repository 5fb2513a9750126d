"""train.ema_decay: an EMA of the trained weights, updated after every optimizer step, that evaluation
samples and final/ holds (as DiffusionNFT and Flow-GRPO evaluate and save their EMA), while
checkpoints keep both the trained weights and the EMA for an exact resume."""

from __future__ import annotations

import pytest
import torch

from ddpo.config_history import config_changes
from ddpo.policies import EMAWeights, ema_decay
from tests.conftest import TINY, compose


def test_the_decay_warms_up_as_the_official_ema():
    assert ema_decay(0.9, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9, 50) == pytest.approx(51 / 60)
    assert ema_decay(0.9, 81) == pytest.approx(0.9)  # (1 + n) / (10 + n) reaches 0.9 at n = 80
    assert ema_decay(0.99, 1000) == pytest.approx(0.99)


def test_ema_follows_the_trained_weights_by_the_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMAWeights({"w": p}, decay=0.9)
    expected = torch.zeros(3, dtype=torch.float64)
    for step, value in enumerate([1.0, 2.0, 4.0, -1.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.step(step)
        d = ema_decay(0.9, step)
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(ema.tensors["w"].double(), expected, rtol=1e-6, atol=1e-7)
    with ema.swapped():
        torch.testing.assert_close(p.data.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.all(p.data == -1.0)  # the trained weights are back


def test_an_ema_updated_every_third_step_moves_only_then():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMAWeights({"w": p}, decay=0.9, every=3)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step(1)
    ema.step(2)
    assert torch.all(ema.tensors["w"] == 0)
    ema.step(3)
    torch.testing.assert_close(ema.tensors["w"], torch.full((2,), 1 - ema_decay(0.9, 3)))


def test_a_checkpoint_from_before_the_key_existed_is_not_a_changed_config():
    old = {"train": {"learning_rate": 1e-3}}
    assert config_changes(old, {"train": {"learning_rate": 1e-3, "ema_decay": 0.0}}) == {}
    assert config_changes(old, {"train": {"learning_rate": 1e-3, "ema_decay": 0.9}}) == {"train.ema_decay": (0.0, 0.9)}


def test_out_of_range_decay_is_one_line():
    from ddpo.config import build
    from ddpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        build(compose([*TINY, "train.ema_decay=1.0"]), "unused")


@pytest.mark.slow  # a training run: kept out of the fast suite's CI budget (run with -m slow)
def test_evaluation_and_final_hold_the_ema_checkpoints_hold_both(tmp_path):
    from safetensors.torch import load_file

    from ddpo.config import build
    from ddpo.trainer import train

    run_dir = tmp_path / "run"
    run, comps = build(
        compose([*TINY, "use_lora=false", "train.learning_rate=1e-2", "train.ema_decay=0.9"]), str(run_dir)
    )
    pipeline = comps.pipeline
    seen = []

    class Evaluator:  # records which weights evaluation runs on, instead of sampling
        def due(self, epochs_completed, num_epochs):
            return True

        def run(self, pipe, accelerator):
            ema = pipe._ema
            seen.append(all(torch.equal(p.data, ema.tensors[name].to(p.dtype)) for name, p in ema.parameters.items()))
            return {"scores": {}, "diversity": {"mean": 0.0}}

    comps.evaluator = Evaluator()
    train(comps, run)
    ema, trained = pipeline._ema, dict(pipeline.trainable_module().named_parameters())
    assert len(seen) == 3 and all(seen)  # before the first epoch and after each of the 2
    assert any(not torch.equal(trained[n].data, t) for n, t in ema.tensors.items())  # the EMA lags the weights

    final = load_file(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint = run_dir / "checkpoints" / "checkpoint_00002"
    saved_trained = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    saved_ema = load_file(checkpoint / "ema.safetensors")
    for name, tensor in ema.tensors.items():
        torch.testing.assert_close(final[name], tensor.to(final[name].dtype), rtol=0, atol=0)
        torch.testing.assert_close(saved_ema[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(saved_trained[name], trained[name].data, rtol=0, atol=0)


@pytest.mark.slow
def test_evaluate_reports_the_ema_that_eval_every_logged(tmp_path):
    import json

    from ddpo.evaluation import flat_metrics
    from tests.conftest import run_cli, run_evaluate
    from tests.test_evaluation import SMALL_SHAPES

    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*SMALL_SHAPES, "train.ema_decay=0.9", "train.learning_rate=1e-2"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    trained = flat_metrics(run_evaluate(run_dir, tmp_path / "eval")["trained"])
    for key, value in trained.items():
        assert value == pytest.approx(evals[-1][key], rel=1e-6, abs=1e-9), key
