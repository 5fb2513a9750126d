"""algorithm=ddpo trains bit for bit the weights main trained before the algorithm/pipeline refactor."""

import json
import platform
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
]
RECORDED_ON = ("x86_64", "2.14.1")  # float results depend on the instruction set and the kernels


@pytest.mark.skipif(
    (platform.machine(), torch.__version__.split("+")[0]) != RECORDED_ON,
    reason=f"the reference was recorded on {RECORDED_ON} (machine, torch)",
)
def test_ddpo_reproduces_the_pre_refactor_weights(tmp_path):
    from safetensors.torch import load_file

    result = run_cli(tmp_path, [*OVERRIDES, "algorithm=ddpo"], env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ours = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    reference = load_file(REFERENCE / "ddpo_tiny_lora_2_epochs.safetensors")
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    for mine, ref in zip(
        (tmp_path / "metrics.jsonl").read_text().splitlines(),
        (REFERENCE / "ddpo_tiny_lora_2_epochs.metrics.jsonl").read_text().splitlines(),
    ):
        mine, ref = json.loads(mine), json.loads(ref)
        for key, value in ref.items():
            if not key.endswith("_s"):  # timings (…_time_s, reward_wait_s, samples_per_s)
                assert mine[key] == value, key
