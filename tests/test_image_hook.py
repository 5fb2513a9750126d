"""Image hooks: a user's hook written for wandb works with every logger, and hooks get the documented data.

The user's hook (tests/fixtures/hooks.py, kept exactly as written) calls
``accelerate_logger.log_images({caption: [PIL image]}, step=...)``.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.conftest import TINY, read_metrics, run_in_process
from tests.fixtures import hooks

USER_HOOK = "logger.image_hook._target_=tests.fixtures.hooks.image_outputs_hook"
ONE_EPOCH = [*TINY, "num_epochs=1"]


@pytest.fixture
def clean_wandb_env(monkeypatch):
    # build() may set WANDB_DIR in os.environ: keep it from leaking into later tests
    monkeypatch.setenv("WANDB_DIR", "unset")
    monkeypatch.delenv("WANDB_DIR")


def test_user_hook_with_wandb_offline(tmp_path, monkeypatch, clean_wandb_env):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"

    _, components = run_in_process(run_dir, [*ONE_EPOCH, "logger=wandb", USER_HOOK])

    assert components.image_hook.func is hooks.image_outputs_hook  # _partial_: true kept
    offline_runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(offline_runs) == 1, "the offline run is not under <run dir>/wandb"
    media = glob.glob(os.path.join(offline_runs[0], "files", "media", "images", "*.png"))
    distinct_prompts = 2  # one sample batch of 2 images; captions are "prompt | reward"
    assert 1 <= len(media) <= distinct_prompts, media
    assert not (cwd / "wandb").exists() and os.listdir(cwd) == []
    assert glob.glob(str(run_dir / "images" / "step_*.png"))


def test_user_hook_with_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*ONE_EPOCH, "logger=tensorboard", USER_HOOK])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image_tags = []
    for events in glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(os.path.dirname(events))
        accumulator.Reload()
        image_tags += accumulator.Tags()["images"]
    assert image_tags, "the hook's images are not in the tensorboard events"
    step = read_metrics(run_dir)[-1]["global_step"]
    assert (run_dir / "images" / f"step_{step:06d}.png").is_file()


def test_user_hook_with_no_logger(tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*ONE_EPOCH, "logger=none", USER_HOOK])

    step = read_metrics(run_dir)[-1]["global_step"]
    from PIL import Image

    grid = Image.open(run_dir / "images" / f"step_{step:06d}.png")
    assert grid.width >= 256 and grid.height >= 256  # at least one 256 px tile from the hook


def test_hook_receives_documented_layout(tmp_path, monkeypatch):
    """[[images, prompts, metadata, rewards], ...] per sample batch; images float32 CPU in [0, 1],
    even when the frozen modules run in bf16."""
    monkeypatch.setattr(hooks, "CALLS", [])
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "num_epochs=2",
        "sample.num_batches_per_epoch=3",
        "train.batch_size=3",
        "mixed_precision=bf16",
        "logger.image_hook._target_=tests.fixtures.hooks.recording_hook",
    ]
    _, components = run_in_process(run_dir, overrides)
    assert components.pipeline.vae.dtype == torch.bfloat16  # the decoder really produced bf16 images

    records = read_metrics(run_dir)
    assert len(hooks.CALLS) == len(records) == 2, "the hook is called once per epoch"
    for (image_data, global_step, tracker), record in zip(hooks.CALLS, records):
        assert global_step == record["global_step"]
        assert tracker is components.tracker and callable(tracker.log_images)
        assert isinstance(image_data, list) and len(image_data) == 3  # one entry per sample batch
        all_rewards = []
        for entry in image_data:
            assert len(entry) == 4
            images, prompts, metadata, rewards = entry
            assert isinstance(images, torch.Tensor)
            assert images.dtype == torch.float32 and images.device.type == "cpu"
            assert images.shape == (2, 3, 64, 64)
            assert 0.0 <= images.min().item() and images.max().item() <= 1.0
            assert isinstance(prompts, list) and len(prompts) == 2 and all(isinstance(p, str) for p in prompts)
            assert isinstance(metadata, list) and len(metadata) == 2 and all(isinstance(m, dict) for m in metadata)
            assert [m["class"] for m in metadata] == prompts  # animals: metadata names the prompt's class
            assert len(rewards) == 2
            all_rewards += [float(r) for r in rewards]
        # the rewards handed to the hook are the ones the epoch was scored with
        assert sum(all_rewards) / len(all_rewards) == pytest.approx(record["reward_mean"], rel=1e-5)
        # the user's hook runs on exactly this data (numpy conversion of float32 works)
        hooks.image_outputs_hook(image_data, global_step, tracker)


def test_images_every_and_the_last_epoch_only(tmp_path):
    """logger.images_every=2 over 3 epochs: grids after epochs 0 and 2 (the last), none after epoch 1."""
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*TINY, "num_epochs=3", "logger.images_every=2"])
    steps = [r["global_step"] for r in read_metrics(run_dir)]
    written = sorted(os.path.basename(p) for p in glob.glob(str(run_dir / "images" / "*.png")))
    assert written == [f"step_{steps[0]:06d}.png", f"step_{steps[2]:06d}.png"]
    none_dir = tmp_path / "never"
    run_in_process(none_dir, [*TINY, "num_epochs=2", "logger.images_every=0"])
    assert not glob.glob(str(none_dir / "images" / "*.png"))


def test_max_images_caps_the_grid(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*ONE_EPOCH, "logger.max_images=1"])  # the last batch holds 2 images
    (grid,) = glob.glob(str(run_dir / "images" / "*.png"))
    with Image.open(grid) as image:
        assert image.width == 256  # one 256 px tile per row


@pytest.mark.parametrize("overrides", [["logger.images_every=-1"], ["logger.max_images=0"], ["logger.images_every=x"]])
def test_bad_image_settings_are_one_line(tmp_path, overrides):
    from ddpo.config import build
    from ddpo.errors import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError) as raised:
        build(compose([*ONE_EPOCH, *overrides]), str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message and "logger." in message, message


def test_captions_wrap_instead_of_being_cut():
    """Two prompts that share their first 25 characters stay distinguishable: whole words, wrapped."""
    from ddpo.logging import image_grid, wrap_caption

    first, second = (
        "00: three red squares above a blue circle | 0.50",
        "01: three red squares above a green star | 0.70",
    )
    assert first[4:29] == second[4:29]  # what the old hook's {prompt:.25} kept of the two prompts
    lines = wrap_caption(first, 21)
    assert " ".join(lines) == first and all(len(line) <= 21 for line in lines)
    long = wrap_caption("word " * 100, 20)
    assert len(long) == 4 and long[-1].endswith("...")
    tiles = [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]
    short_grid = image_grid(tiles, ["a", "b"], tile=128)
    long_grid = image_grid(tiles, [first, second], tile=128)  # 21 characters a line: three lines each
    assert long_grid.height > short_grid.height and long_grid.width == short_grid.width == 256
