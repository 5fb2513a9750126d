"""algorithm=ddpo trains the weights main trained before the algorithm/pipeline refactor (commit d90fb67).

Float results depend on the CPU's instruction set, its kernels and the thread count, not only on the
architecture name, so trained weights are compared within float error, never bit for bit; what does
not depend on float arithmetic (epochs, optimizer steps, sample counts) must be equal.

The measure is the relative error of the update, ``||W - W_ref|| / ||W_ref - W_init||`` over all LoRA
tensors together. Measured (tests/fixtures/reference/README.md) on the recording machine by
re-running the same command under other kernel sets (``ATEN_CPU_CAPABILITY=default``, ``avx2``) and
thread counts, against real changes of the loop:

| run of the reference command | smooth reward | JPEG reward (default) |
|---|---|---|
| same machine, same kernels | 0 | 0 |
| float error: other kernels / 2 threads | 1.0e-4 .. 2.9e-4 | 7.4e-5 .. 1.8e-2 |
| learning rate x 1.001 | 1.0e-3 | |
| learning rate x 1.01 | 1.0e-2 | 3.5e-2 |
| learning rate x 2 | 1.14 | 1.03 |
| the first advantage of each epoch negated | 0.71 | 0.90 |

The JPEG reward is discontinuous in the pixels (a pixel that rounds the other way changes the file
by whole bytes, hence the advantages), which amplifies float error; the smooth reward
(mean brightness) does not, so its reference pins the loop tightly and the JPEG one coarsely.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
OVERRIDES = [
    "model=tiny",
    "logger=none",
    "mixed_precision=no",
    "sample.num_steps=3",
    "sample.batch_size=2",
    "sample.num_batches_per_epoch=2",
    "train.batch_size=2",
    "num_epochs=2",
    "save_freq=1",
    "algorithm=ddpo",
]
SMOOTH = ["reward._target_=tests.fixtures.smooth_rewards.MeanBrightness"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# 7x the largest float error measured, 5x below a learning rate 1% off
SMOOTH_TOLERANCE = 2e-3
# 14x the largest float error measured, 3.6x below the smallest real change measured
JPEG_TOLERANCE = 0.25
EXACT_KEYS = ("epoch", "global_step", "num_samples")  # counts: no float arithmetic decides them
CLOSE_KEYS = ("reward_mean", "reward_std")  # smooth functions of the weights (loss, KL and ratios are ~0)


def update_error(ours: dict, reference: dict, init: dict) -> float:
    """||ours - reference|| / ||reference - init|| over all tensors: the trained update's relative error."""
    assert ours.keys() == reference.keys() == init.keys()
    off = sum(((ours[k].double() - reference[k].double()) ** 2).sum() for k in reference)
    update = sum(((reference[k].double() - init[k].double()) ** 2).sum() for k in reference)
    return float((off / update).sqrt())


def train_and_compare(tmp_path, extra: list[str], name: str) -> tuple[float, list[dict], list[dict]]:
    from safetensors.torch import load_file

    result = run_cli(tmp_path, [*OVERRIDES, *extra], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    error = update_error(
        load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors"),
        load_file(REFERENCE / f"{name}.safetensors"),
        load_file(REFERENCE / "ddpo_tiny_lora_init.safetensors"),
    )
    ours = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (REFERENCE / f"{name}.metrics.jsonl").read_text().splitlines()]
    return error, ours, reference


def assert_same_records(ours: list[dict], reference: list[dict], rel: float) -> None:
    assert len(ours) == len(reference)
    for mine, ref in zip(ours, reference):
        for key in EXACT_KEYS:
            assert mine[key] == ref[key], key
        for key in CLOSE_KEYS:
            assert mine[key] == pytest.approx(ref[key], rel=rel), key


def test_ddpo_trains_the_pre_refactor_weights_on_a_smooth_reward(tmp_path):
    error, ours, reference = train_and_compare(tmp_path, SMOOTH, "ddpo_tiny_lora_2_epochs_smooth")
    assert error < SMOOTH_TOLERANCE, f"update differs from the reference by {error:.2e} (relative)"
    assert_same_records(ours, reference, rel=1e-3)


def test_ddpo_trains_the_pre_refactor_weights_on_the_default_reward(tmp_path):
    error, ours, reference = train_and_compare(tmp_path, [], "ddpo_tiny_lora_2_epochs")
    assert error < JPEG_TOLERANCE, f"update differs from the reference by {error:.2e} (relative)"
    for mine, ref in zip(ours, reference):
        for key in EXACT_KEYS:
            assert mine[key] == ref[key], key


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(["algorithm._target_=tests.fixtures.altered_algorithms.OneAdvantageFlipped"], id="one-advantage"),
        pytest.param(["train.learning_rate=3.03e-4"], id="lr+1%", marks=pytest.mark.slow),
    ],
)
def test_the_reference_check_catches_a_small_real_change(tmp_path, change):
    error, _, _ = train_and_compare(tmp_path, [*SMOOTH, *change], "ddpo_tiny_lora_2_epochs_smooth")
    assert error > SMOOTH_TOLERANCE, f"a changed loop passed the reference check ({error:.2e})"


def test_the_update_error_is_zero_for_the_reference_and_one_for_no_training():
    from safetensors.torch import load_file

    reference = load_file(REFERENCE / "ddpo_tiny_lora_2_epochs_smooth.safetensors")
    init = load_file(REFERENCE / "ddpo_tiny_lora_init.safetensors")
    assert update_error(reference, reference, init) == 0
    assert update_error(init, reference, init) == pytest.approx(1.0)
    assert not any(torch.equal(reference[k], init[k]) for k in reference)  # every tensor was trained
