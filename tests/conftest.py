"""Shared helpers: compose the real config with overrides and run it, in-process or as a user would."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A run small enough for a test: tiny model, 3 steps, 4 samples per epoch, no tracker.
TINY = [
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


def compose(overrides=()):
    """The composed config, exactly as train.py would see it (Hydra compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddpo.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_in_process(run_dir, overrides=()):
    """Build and train in this process; returns (final reward, components)."""
    from ddpo.config import build
    from ddpo.trainer import train

    cfg = compose(list(overrides))
    run, components = build(cfg, str(run_dir))
    return train(components, run), components


def run_cli(run_dir, overrides=(), env=None, timeout=600):
    """``python train.py ... hydra.run.dir=<run_dir>`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(run_dir, overrides=(), env=None):
    """``python train.py ... hydra.run.dir=<run_dir>`` started in the background (to signal it).

    The child gets the default SIGINT disposition, as in a terminal: a shell starts background jobs
    (``pytest ... &``) with SIGINT ignored, which the child would inherit and Ctrl-C tests could not signal.
    """
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def default_sigint() -> None:
    """In a child before exec: SIGINT as a terminal gives it (Python then raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


TOOLS = ("sample", "evaluate", "export", "plot_runs", "reward_server")  # scripts/<name>.py runs ddpo/tools/<name>.py


def load_script(name: str):
    """``scripts/<name>.py`` as a module: for the tools, the module in the package whose ``main`` it runs
    (so that a test's monkeypatch reaches the code); the other scripts are loaded from their file."""
    import importlib
    import importlib.util

    if name in TOOLS:
        return importlib.import_module(f"ddpo.tools.{name}")
    spec = importlib.util.spec_from_file_location(f"ddpo_{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the run's model loader is called (a check must come first)."""
    import ddpo.models

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(ddpo.models, "tiny_model", built)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_evaluate(run_dir, out, seeds: int = 2):
    """``python scripts/evaluate.py <run_dir> --seeds N --out <out>``; returns its summary.json (asserts success)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(run_dir), "--seeds", str(seeds), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(out) / "summary.json").read_text())
