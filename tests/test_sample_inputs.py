"""scripts/sample.py: every argument and run setting it cannot use ends in one line, before a model is built."""

import os
import resource
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, load_script
from tests.test_export_safety import make_run
from tests.test_sample_script import SCRIPT, assert_one_line_error

sample_script = load_script("sample")


def sample_error(*argv) -> str:
    """The one-line message sample.py stops with."""
    with pytest.raises(SystemExit) as stop:
        sample_script.main([str(a) for a in argv])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample_inputs"), lora=True)


def with_settings(run, tmp_path, **settings):
    """A copy of ``run`` whose config has these dotted keys set (None: removed)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = copy / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    for key, value in settings.items():
        parent, _, name = key.replace("__", ".").rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if value is None:
            node.pop(name)
        else:
            node[name] = value
    OmegaConf.save(cfg, config)
    return copy


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seed-list", "-1"], ["--seed-list -1", "2**63"]),
        (["--seed-list", "0", str(2**63)], [str(2**63)]),
        (["--seed-list", str(2**64)], [str(2**64)]),
        (["--device", "bogus"], ["--device bogus"]),
        (["--device", "cuda:99"], ["--device cuda:99"]),
        (["--out", "{tmp}"], ["is a directory"]),
        (["--out", "{tmp}/grid.txt"], [".png"]),
        (["--out", "{tmp}/missing/grid.png"], ["no such directory"]),
    ],
    ids=[
        "negative-seed",
        "seed-2**63",
        "seed-2**64",
        "bogus-device",
        "missing-cuda",
        "out-dir",
        "out-txt",
        "out-nodir",
    ],
)
def test_arguments_are_one_line_before_the_model_is_built(lora_run, tmp_path, no_model, argv, words):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    message = sample_error(lora_run, "--prompts", "a cat", *argv)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"model.resolution": 100000}, ["model.resolution=100000", "4096"]),
        ({"model.resolution": -64}, ["model.resolution=-64"]),
        ({"model.resolution": "big"}, ["model.resolution must be an integer"]),
        ({"model.resolution": None}, ["model.resolution must be an integer"]),
        ({"sample.num_steps": None}, ["sample.num_steps"]),
        ({"sample.eta": "x"}, ["sample.eta must be a number"]),
    ],
    ids=["resolution-100000", "resolution-negative", "resolution-text", "no-resolution", "no-num-steps", "eta-text"],
)
def test_run_settings_are_one_line_before_the_model_is_built(lora_run, tmp_path, no_model, settings, words):
    run = with_settings(lora_run, tmp_path, **settings)
    message = sample_error(run, "--prompts", "a cat", "--seeds", "1", "--out", tmp_path / "grid.png")
    for word in words:
        assert word in message, message
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize(
    "settings, argv, words",
    [
        ({"model.resolution": 100}, [], ["multiple of 8", "100"]),  # the tiny loader's own check
        ({"model.prediction_type": "zzz"}, [], ["prediction_type"]),
        ({}, ["--model-path", "{tmp}/not_a_model"], ["cannot load local directory", "not_a_model"]),
        ({}, ["--model-path", "{tmp}/missing"], ["no such directory"]),
        ({"sample.num_steps": 5000}, [], ["sample.num_steps=5000", "1000"]),
    ],
    ids=["resolution-100", "prediction-type", "model-path-not-a-model", "model-path-missing", "steps-5000"],
)
def test_a_loader_or_model_that_refuses_is_one_line(lora_run, tmp_path, settings, argv, words):
    run = with_settings(lora_run, tmp_path, **settings)
    (tmp_path / "not_a_model").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    message = sample_error(run, "--prompts", "a cat", "--seeds", "1", "--out", tmp_path / "grid.png", *argv)
    for word in words:
        assert word in message, message


def test_damaged_trained_weights_are_one_line(lora_run, tmp_path):
    run = with_settings(lora_run, tmp_path)
    (run / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"not weights" * 10)
    message = sample_error(run, "--prompts", "a cat", "--seeds", "1", "--out", tmp_path / "grid.png")
    assert "cannot load the trained weights" in message and "final" in message


def test_an_unreadable_config_is_one_line(lora_run, tmp_path):
    run = with_settings(lora_run, tmp_path)
    (run / ".hydra" / "config.yaml").write_text("model: [unclosed\n  sample: 1\n")
    assert "cannot read" in sample_error(run)
    (run / ".hydra" / "config.yaml").write_text("- a list\n")
    assert "no model: section" in sample_error(run)


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a 10 GB allocation fails instead of swapping


@pytest.mark.parametrize(
    "settings, argv",
    [
        ({"model.resolution": 100000}, []),
        ({}, ["--seed-list", str(2**64)]),
        ({}, ["--seeds", "abc"]),
        ({}, ["--model-path", "{tmp}/not_a_model"]),
    ],
    ids=["resolution-100000", "seed-2**64", "seed-not-a-number", "model-path-not-a-model"],
)
def test_the_command_line_prints_one_error_line(lora_run, tmp_path, settings, argv):
    """As a user runs it: one ``error:`` line on stderr, exit status 1, no traceback (and no 10 GB)."""
    run = with_settings(lora_run, tmp_path, **settings)
    (tmp_path / "not_a_model").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--prompts", "a cat", "--out", str(tmp_path / "grid.png"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=limited_memory,
    )
    assert_one_line_error(result)
    assert result.returncode == 1
