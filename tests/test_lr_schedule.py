"""train.lr_scheduler / train.lr_warmup_steps: diffusers' get_scheduler over the run's optimizer steps."""

import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from tests.conftest import TINY, compose, read_metrics, run_in_process
from tests.test_resume import assert_same_epochs

# 2 optimizer steps per epoch (4 samples, train batches of 2)
BASE = [*TINY, "use_lora=false", "train.learning_rate=1e-2"]


def test_warm_up_from_zero_leaves_the_first_step_without_effect(tmp_path):
    """constant_with_warmup, 4 warm-up steps: the first optimizer step has lr 0 (no change, weight decay
    included), and the epoch records the rate the next step uses (2 steps done: 2/4 of the rate)."""
    from ddpo.models.tiny import build_tiny_pipeline

    overrides = [*BASE, "num_epochs=1", "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=4"]
    run_in_process(tmp_path / "warm", overrides)
    (record,) = read_metrics(tmp_path / "warm")
    assert record["lr"] == pytest.approx(1e-2 * 2 / 4)
    one_step = [*overrides, "sample.num_batches_per_epoch=1"]  # one optimizer step: at lr 0
    _, comps = run_in_process(tmp_path / "one", one_step)
    start = build_tiny_pipeline(seed=0).unet.state_dict()
    trained = comps.pipeline.unet.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start)
    _, moved = run_in_process(tmp_path / "constant", [*BASE, "num_epochs=1", "sample.num_batches_per_epoch=1"])
    assert any(not torch.equal(moved.pipeline.unet.state_dict()[k], start[k]) for k in start)


def test_a_scheduled_run_resumes_exactly(tmp_path):
    """The schedule is in the checkpoint: 1 + 1 epochs train what 2 do (cosine, 1 warm-up step): after the
    resume the rate is the longer schedule's at the restored step, not the rate the 1-epoch run left."""
    overrides = [*BASE, "train.lr_scheduler=cosine", "train.lr_warmup_steps=1"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(reference, [*overrides, "num_epochs=2"])
    run_in_process(resumed, [*overrides, "num_epochs=1"])
    run_in_process(resumed, [*overrides, "num_epochs=2"])
    records = read_metrics(resumed)
    assert [r["epoch"] for r in records] == [0, 1]
    assert_same_epochs(records, read_metrics(reference))
    # epoch 0's record holds the rate its own (1-epoch) schedule set next; once resumed, the 2-epoch schedule's
    assert records[0]["lr"] == pytest.approx(0.0, abs=1e-12) and read_metrics(reference)[0]["lr"] > 0
    assert records[1]["lr"] == read_metrics(reference)[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.lr_scheduler=cosinus"], ["train.lr_scheduler", "cosine"]),
        (["train.lr_warmup_steps=-1"], ["train.lr_warmup_steps"]),
        (["train.lr_warmup_steps=10"], ["constant_with_warmup"]),
    ],
)
def test_bad_schedules_are_one_line(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as raised:
        build(compose([*TINY, *overrides]), str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message
