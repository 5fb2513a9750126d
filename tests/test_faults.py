"""Faults end in one line and lose nothing: torn files, locks, non-finite values, broken checkpoints."""

import json
import logging
from pathlib import Path

import pytest

from ddpo.errors import DDPOError
from ddpo.logging import MetricsFile


def test_metrics_drop_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "reward_mean": 1.0}\n{"epoch": 1, "rew')
    with caplog.at_level(logging.WARNING):
        assert MetricsFile(str(tmp_path)).read() == [{"epoch": 0, "reward_mean": 1.0}]
    assert "cut off" in caplog.text
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')  # damage before the end: dropped, named by line
    with caplog.at_level(logging.WARNING):
        assert MetricsFile(str(tmp_path)).read() == [{"epoch": 0}, {"epoch": 2}]
    assert "metrics.jsonl line 2: dropped" in caplog.text


def test_metrics_are_strict_json(tmp_path):
    metrics = MetricsFile(str(tmp_path))
    metrics.append({"epoch": 0, "approx_kl": float("nan"), "loss": float("inf"), "reward_mean": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) == {
        "epoch": 0,
        "approx_kl": None,
        "loss": None,
        "reward_mean": 0.5,
    }


def test_starting_a_run_writes_no_empty_metrics_file(tmp_path):
    MetricsFile(str(tmp_path)).keep_epochs_before(0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_run_lock_stops_a_second_holder_naming_the_first(tmp_path):
    import subprocess
    import sys

    from ddpo.run_lock import RunLock
    from tests.conftest import ROOT

    with RunLock(str(tmp_path)):
        code = f"from ddpo.run_lock import RunLock\nRunLock({str(tmp_path)!r}).acquire()"
        other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "is in use by pid" in other.stderr, other.stderr
    RunLock(str(tmp_path)).acquire().release()  # released: free again


# -- end to end on the tiny model ---------------------------------------------------------------
import os  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from tests.conftest import TINY, read_metrics, run_cli, run_in_process, start_cli  # noqa: E402

CHECKPOINTS = "checkpoints"


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def three_checkpoints(tmp_path):
    """A 3-epoch tiny run with a checkpoint after every epoch."""
    run_dir = tmp_path / "run"
    run_in_process(run_dir, [*TINY, "num_epochs=3"])
    return run_dir


def checkpoint(run_dir, epochs):
    return run_dir / CHECKPOINTS / f"checkpoint_{epochs:05d}"


def test_a_pickle_in_a_checkpoint_is_never_unpickled(three_checkpoints, tmp_path):
    marker = tmp_path / "payload_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        with open(checkpoint(three_checkpoints, 3) / name, "wb") as handle:
            pickle.dump(Payload(marker), handle)
    run_in_process(three_checkpoints, [*TINY, "num_epochs=4"])
    assert not marker.exists(), "resuming ran code from a checkpoint"
    assert [r["epoch"] for r in read_metrics(three_checkpoints)] == [0, 1, 2, 3]
    # resume_from= reads another run's checkpoint the same way
    other = tmp_path / "other"
    run_in_process(other, [*TINY, "num_epochs=5", f"resume_from={checkpoint(three_checkpoints, 3)}"])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated_weights", "no_optimizer", "torn_optimizer", "garbage_state"])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(three_checkpoints, damage, caplog):
    newest = checkpoint(three_checkpoints, 3)
    if damage == "truncated_weights":
        path = newest / "trained_weights.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "no_optimizer":
        (newest / "optimizer.bin").unlink()
    elif damage == "torn_optimizer":
        path = newest / "optimizer.bin"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        (newest / "ddpo_state.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        run_in_process(three_checkpoints, [*TINY, "num_epochs=3"])
    assert str(newest) in caplog.text, caplog.text  # the warning names the damaged checkpoint
    assert "resumed from" not in caplog.text or str(checkpoint(three_checkpoints, 2)) in caplog.text
    # epoch 2 was redone from the checkpoint after epoch 2 (epochs_completed=2), once
    assert [r["epoch"] for r in read_metrics(three_checkpoints)] == [0, 1, 2]
    assert checkpoint(three_checkpoints, 1).is_dir(), "an older checkpoint was lost"


def test_no_loadable_checkpoint_stops_in_one_line_naming_them(three_checkpoints):
    for epochs in (1, 2, 3):
        (checkpoint(three_checkpoints, epochs) / "optimizer.bin").unlink()
    result = run_cli(three_checkpoints, [*TINY, "num_epochs=4"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint could be loaded") and "checkpoint_00001" in last, last
    assert all(checkpoint(three_checkpoints, e).is_dir() for e in (1, 2, 3)), "a checkpoint was deleted"


def test_a_missing_rng_file_resumes_with_a_warning(three_checkpoints, caplog):
    (checkpoint(three_checkpoints, 3) / "random_states_0.pkl").unlink()
    with caplog.at_level(logging.WARNING):
        run_in_process(three_checkpoints, [*TINY, "num_epochs=4"])
    assert "random_states_0.pkl is missing" in caplog.text
    assert [r["epoch"] for r in read_metrics(three_checkpoints)] == [0, 1, 2, 3]


def test_final_is_written_whole_or_rebuilt(three_checkpoints, monkeypatch):
    from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

    final = three_checkpoints / "final"
    shutil.rmtree(final)
    original_export = StableDiffusionDDPOPipeline.export

    def killed_while_writing_final(self, directory):  # checkpoints export fine; final/ dies half-way
        if "final" not in os.path.basename(directory):
            return original_export(self, directory)
        os.makedirs(directory, exist_ok=True)
        (Path(directory) / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionDDPOPipeline, "export", killed_while_writing_final)
    with pytest.raises(DDPOError, match="interrupted"):
        run_in_process(three_checkpoints, [*TINY, "num_epochs=4"])
    assert not final.exists(), "a partial final/ was published"
    monkeypatch.undo()
    run_in_process(three_checkpoints, [*TINY, "num_epochs=4"])  # "already complete": writes final/ again
    expected = (checkpoint(three_checkpoints, 4) / "pytorch_lora_weights.safetensors").read_bytes()
    assert (final / "pytorch_lora_weights.safetensors").read_bytes() == expected


def test_a_full_disk_removes_the_partial_checkpoint_and_stops_in_one_line(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # full fine-tuning: the tiny UNet and its optimizer state (~12 MB) do not fit in 1 MB
        result = run_cli(mount / "run", [*TINY, "use_lora=false", "num_epochs=1"])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the disk is full") and "checkpoint_00001.partial" in last, last
        assert not (mount / "run" / CHECKPOINTS / "checkpoint_00001.partial").exists()
        assert [r["epoch"] for r in read_metrics(mount / "run")] == [0]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_second_process_on_a_run_directory_stops_naming_the_first(tmp_path):
    from ddpo.run_lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(str(run_dir)):  # this process plays the first run
        result = run_cli(run_dir, [*TINY, "num_epochs=1"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"is in use by pid {os.getpid()}" in result.stderr.strip().splitlines()[-1]
    assert not (run_dir / "metrics.jsonl").exists()


def test_diverging_training_stops_before_saving_nan_weights(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*TINY, "num_epochs=3", "train.learning_rate=1e9", "use_lora=false"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: epoch ") and "lower train.learning_rate" in last, last
    assert not (run_dir / "final").exists()
    from safetensors.torch import load_file

    for saved in (run_dir / CHECKPOINTS).glob("*/unet/*.safetensors"):
        assert all(t.isfinite().all() for t in load_file(saved).values()), f"{saved} holds NaN weights"
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


@pytest.mark.parametrize(
    "signum, code, words",
    [
        pytest.param(signal.SIGINT, 130, "interrupted during epoch", marks=pytest.mark.slow),  # CI's budget
        (signal.SIGTERM, 143, "terminated (SIGTERM) during epoch"),
    ],
)
def test_ctrl_c_and_sigterm_end_in_one_line_and_resume(tmp_path, signum, code, words):
    run_dir = tmp_path / "run"
    process = start_cli(run_dir, [*TINY, "num_epochs=200"])
    try:
        deadline = time.monotonic() + 120
        while not checkpoint(run_dir, 2).is_dir() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and "rerun the same command" in last, last
    done = [r["epoch"] for r in read_metrics(run_dir)]
    resumed = run_cli(run_dir, [*TINY, f"num_epochs={len(done) + 1}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(len(done) + 1))
