"""scripts/sample.py: run or checkpoint directories, one-line errors, and no code from a run's config."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, run_cli

SCRIPT = ROOT / "scripts" / "sample.py"


def sample(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    result = run_cli(run_dir, [*TINY, "num_epochs=1", "train.learning_rate=1e-2"])  # writes .hydra/config.yaml
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_missing_or_wrong_directory_is_one_line(tmp_path):
    assert_one_line_error(sample(tmp_path / "nope"), "no such directory")
    assert_one_line_error(sample(tmp_path), "config.yaml not found")


def test_a_checkpoint_directory_samples_its_weights(lora_run):
    checkpoint = lora_run / "checkpoints" / "checkpoint_00001"
    out = lora_run / "from_checkpoint.png"
    result = sample(checkpoint, "--prompts", "a cat", "--seed-list", "0", "1", "--baseline", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and f"LoRA from {checkpoint}" in result.stdout


@pytest.mark.parametrize(
    "model",
    [
        "{_target_: os.system, command: 'touch {marker}'}",
        "{_target_: ddpo.models.tiny_model, path: {_target_: os.system, command: 'touch {marker}'}}",
    ],
)
def test_a_crafted_run_config_runs_no_code(tmp_path, model):
    marker = tmp_path / "payload_ran"
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"model: {model.replace('{marker}', str(marker))}\n")
    result = sample(run_dir)
    assert_one_line_error(result, "--model-path")
    assert not marker.exists(), "the run's config executed code"
