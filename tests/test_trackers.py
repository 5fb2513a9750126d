"""Trackers: stable TensorBoard image tags, reward histogram and per-prompt table, one wandb run per
run directory (resumed on restart), and a sweep's wandb group and tags."""

from __future__ import annotations

import glob
import os
import struct
import time
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from ddpo.config import build
from tests.conftest import TINY, compose, read_metrics, run_in_process
from tests.scale_out import failure_report, multirun


@pytest.fixture
def clean_wandb_env(monkeypatch):
    # wandb may set WANDB_DIR in os.environ: keep it from leaking into later tests
    monkeypatch.setenv("WANDB_DIR", "unset")
    monkeypatch.delenv("WANDB_DIR")


@pytest.fixture
def wandb_inits(monkeypatch):
    """The keyword arguments of every wandb.init call (the real wandb.init still runs)."""
    import wandb

    calls, real_init = [], wandb.init

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    return calls


def wandb_run_record(path):
    """The run record (id, group, tags, resume) of a wandb run file ``run-<id>.wandb``.

    The file is a 7-byte header, then a LevelDB log of protobuf ``Record``s: 32 KiB blocks of chunks,
    each chunk ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)``.
    """
    from wandb.proto import wandb_internal_pb2

    data, offset, block, pending = Path(path).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", path
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


def event_accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # <run>/tensorboard holds the run's events (accelerate puts the hyperparameters in a subdirectory)
    directory = str(Path(run_dir) / "tensorboard")
    accumulator = EventAccumulator(directory, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def text_at(accumulator, tag: str) -> list[str]:
    return [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(f"{tag}/text_summary")]


def test_tensorboard_stable_image_tags_histogram_and_prompt_table(tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*TINY, "logger=tensorboard", "logger.prompt_table_every=2", "num_epochs=3"])
    steps = [r["global_step"] for r in read_metrics(run_dir)]
    accumulator = event_accumulator(run_dir)
    tags = accumulator.Tags()

    # the default hook logs the 2 images of the last batch: 2 tags, each with one image per epoch
    assert sorted(tags["images"]) == ["images/00", "images/01"]
    for tag in tags["images"]:
        assert [event.step for event in accumulator.Images(tag)] == steps
    captions = text_at(accumulator, "images/captions")
    assert len(captions) == 3 and all("images/00: " in c and "images/01: " in c and " | " in c for c in captions)

    # the reward histogram of every epoch, over its 4 samples
    histograms = accumulator.Histograms("reward")
    assert [h.step for h in histograms] == steps
    assert all(h.histogram_value.num == 4 for h in histograms)

    # the per-prompt table at epochs 0 and 2 (prompt_table_every=2): counts add up to the epoch's samples
    tables = accumulator.Tensors("reward_by_prompt/text_summary")
    assert [t.step for t in tables] == [steps[0], steps[2]]
    for table in text_at(accumulator, "reward_by_prompt"):
        header, _, *rows = table.splitlines()
        assert header == "| prompt | count | mean | std |"
        assert sum(int(row.split(" | ")[1]) for row in rows) == 4


def test_wandb_run_resumes_the_same_run_id(tmp_path, monkeypatch, clean_wandb_env, wandb_inits):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*TINY, "logger=wandb", "num_epochs=1"])
    time.sleep(1.1)  # wandb names an offline run's directory by its start second: keep the two runs' apart
    run_in_process(run_dir, [*TINY, "logger=wandb", "num_epochs=2"])  # the restart: resumes after epoch 1
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]

    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert [(c["id"], c["resume"]) for c in wandb_inits] == [(run_id, "allow")] * 2
    offline_runs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))
    assert len(offline_runs) == 2 and all(path.endswith(f"-{run_id}") for path in offline_runs), offline_runs
    for path in offline_runs:
        record = wandb_run_record(os.path.join(path, f"run-{run_id}.wandb"))
        assert (record.run_id, record.resume) == (run_id, True)
    # epoch 0 (the first run) logged the per-prompt table as a wandb Table, and both runs a histogram
    assert glob.glob(os.path.join(offline_runs[0], "files", "media", "table", "reward_by_prompt_*.table.json"))
    for path in offline_runs:
        assert b'"histogram"' in Path(path, f"run-{run_id}.wandb").read_bytes()


def hydra_node(mode, task):
    return OmegaConf.create(
        {"mode": mode, "sweep": {"dir": "multirun/2025-01-01/12-00-00.000001"}, "overrides": {"task": task}}
    )


def test_sweep_labels_from_the_hydra_config():
    from ddpo.config import sweep_labels

    long = "prompt.path=/" + "x" * 80
    labels = sweep_labels(hydra_node(RunMode.MULTIRUN, ["seed=1", "reward=jpeg_compressibility", long]))
    assert labels == {
        "group": "multirun/2025-01-01/12-00-00.000001",
        "tags": ["seed=1", "reward=jpeg_compressibility", long[:64]],
    }
    assert sweep_labels(hydra_node(RunMode.RUN, ["seed=1"])) == {}


def test_explicit_logger_group_and_tags_win(tmp_path, monkeypatch, clean_wandb_env, wandb_inits):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = {"group": "multirun/x", "tags": ["seed=1"]}
    cfg = compose([*TINY, "logger=wandb", "logger.group=mine"])
    _, components = build(cfg, str(tmp_path / "run"), sweep=sweep)
    components.tracker.finish()
    assert (wandb_inits[0]["group"], wandb_inits[0]["tags"]) == ("mine", ["seed=1"])  # tags: the sweep's

    cfg = compose([*TINY, "logger=wandb", "logger.tags=[a,b]"])
    _, components = build(cfg, str(tmp_path / "run2"), sweep=sweep)
    components.tracker.finish()
    assert (wandb_inits[1]["group"], wandb_inits[1]["tags"]) == ("multirun/x", ["a", "b"])


def test_multirun_job_has_the_sweep_group_and_its_overrides_as_tags(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = multirun(sweep_dir, [*TINY, "num_epochs=1", "logger=wandb", "seed=7"], timeout=120)
    assert result.returncode == 0, failure_report(result, sweep_dir)

    (wandb_file,) = glob.glob(str(sweep_dir / "0" / "wandb" / "offline-run-*" / "run-*.wandb"))
    record = wandb_run_record(wandb_file)
    assert record.run_group == str(sweep_dir)
    assert {"seed=7", "logger=wandb", "model=tiny", "num_epochs=1"} <= set(record.tags)


def test_new_algorithm_metrics_reach_the_tracker(tmp_path):
    """GRPO with a KL penalty: kl_ref and the loop's metrics are TensorBoard scalars like every metric."""
    run_dir = tmp_path / "run"
    run_in_process(
        run_dir,
        [
            *TINY,
            "logger=tensorboard",
            "num_epochs=2",
            "algorithm=grpo",
            "algorithm.group_size=2",
            "algorithm.kl_coef=1.0",
        ],
    )
    accumulator = event_accumulator(run_dir)
    steps = [r["global_step"] for r in read_metrics(run_dir)]
    for tag in ("kl_ref", "reward_mean", "approx_kl"):
        assert [event.step for event in accumulator.Scalars(tag)] == steps, tag


def test_each_evaluation_reaches_tensorboard_once(tmp_path):
    """eval.every=1 over 2 epochs: every eval_* scalar at steps [0, after epoch 1, after epoch 2], once each
    (the last evaluation was logged twice at the last step: from the evaluation and from the epoch's record)."""
    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    overrides = [*TINY, "logger=tensorboard", "num_epochs=2", "eval.every=1", "eval.seeds=1", "eval.batch_size=2"]
    run_in_process(run_dir, [*overrides, "prompt=from_file", f"prompt.path={prompts}"])
    steps = [r["global_step"] for r in read_metrics(run_dir)]
    accumulator = event_accumulator(run_dir)
    eval_tags = [t for t in accumulator.Tags()["scalars"] if t.startswith("eval_")]
    assert "eval_reward_mean" in eval_tags
    for tag in eval_tags:
        assert [event.step for event in accumulator.Scalars(tag)] == [0, *steps], tag
